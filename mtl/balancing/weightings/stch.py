"""Smooth Tchebycheff scalarization (STCH): a smooth max of the task losses."""

from __future__ import annotations

from typing import ClassVar, Sequence

import torch
from torch import Tensor

from mtl.balancing.weightings.base import LossWeighting, all_reduce_sum_, per_task_list


class STCH(LossWeighting):
    r"""Smooth Tchebycheff scalarization, Lin, Zhang, Yang, Zhang & Zhang, "Smooth Tchebycheff
    Scalarization for Multi-Objective Optimization", ICML 2024.

    The Tchebycheff scalarization :math:`\max_t (f_t - z_t)` is smoothed with a log-sum-exp of
    smoothing parameter :math:`\mu`:

    .. math:: g_\mu(f) = T \mu \log \sum_t \exp\Big(\frac{f_t - z_t}{\mu}\Big),
        \qquad \frac{\partial g_\mu}{\partial f_t} = T\,\operatorname{softmax}
        \Big(\frac{f - z}{\mu}\Big)_t .

    (The factor :math:`T`, as in the authors' multi-task code, makes the weights sum to :math:`T`
    like equal weighting.) The returned weights are detached and chosen so that ``(w * L).sum()``
    has exactly the gradient of the objective below.

    ``normalize=False``: :math:`f_t = L_t` and :math:`z` = ``ideal_point`` (default 0), from the
    first step: :math:`w_t = T\,\operatorname{softmax}((L - z)/\mu)_t`.

    ``normalize=True`` (default; the authors' multi-task code): for epochs
    :math:`0, \dots, W` (:math:`W` = ``warmup_epochs``) the objective is :math:`\sum_t \log L_t`
    (:math:`w_t = 1/L_t`), and during epoch :math:`W` the losses are averaged into a nadir vector
    :math:`n`. From epoch :math:`W+1` on, :math:`f_t = \log(L_t / n_t)` with ideal point 0, so

    .. math:: w_t = T\,\operatorname{softmax}\Big(\frac{\log(L/n)}{\mu}\Big)_t \Big/ L_t .

    (A ``1e-20`` is added inside the logs, as in the official code.) The training loop must call
    :meth:`on_train_epoch_end` once per epoch; the epoch counter and nadir sums are buffers.

    Args:
        num_tasks: number of tasks ``T``.
        mu: smoothing parameter :math:`\mu` (official default 1.0); smaller is closer to the max.
        warmup_epochs: :math:`W`, number of log-loss epochs before the nadir epoch (official
            ``STCH_warmup_epoch`` default 4). Only used when ``normalize``.
        normalize: use the log-normalised form with warm-up and nadir vector.
        ideal_point: :math:`z` (``balancer.method.ideal_point``), only used when not
            ``normalize``; default all 0.
    """

    _eps: ClassVar[float] = 1e-20

    def __init__(
        self,
        num_tasks: int,
        mu: float = 1.0,
        warmup_epochs: int = 4,
        normalize: bool = True,
        ideal_point: Sequence[float] | None = None,
    ) -> None:
        super().__init__(num_tasks)
        if mu <= 0:
            raise ValueError(f"balancer.method.mu must be > 0, got {mu}.")
        if warmup_epochs < 0:
            raise ValueError(f"balancer.method.warmup_epochs must be >= 0, got {warmup_epochs}.")
        self.mu = float(mu)
        self.warmup_epochs = int(warmup_epochs)
        self.normalize = bool(normalize)
        self.register_buffer(
            "ideal_point",
            per_task_list(ideal_point, num_tasks, "balancer.method.ideal_point", 0.0),
            persistent=False,
        )
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))
        self.register_buffer("nadir_sum", torch.zeros(num_tasks))
        self.register_buffer("nadir_count", torch.zeros(()))

    @property
    def nadir(self) -> Tensor:
        """``[T]`` average losses of the nadir epoch (ones before it has any)."""
        count = self.nadir_count
        average = self.nadir_sum / count.clamp_min(1)
        return torch.where(count > 0, average, torch.ones_like(self.nadir_sum))

    def forward(self, losses: Tensor) -> Tensor:
        """``[T]`` losses -> ``[T]`` weights (detached); see the class docstring for the rule."""
        self._check_losses(losses)
        l = losses.detach()
        t = self.num_tasks
        if not self.normalize:
            z = self.ideal_point.to(l)
            return t * torch.softmax((l - z) / self.mu, dim=0)

        if self.training:
            # Accumulate during the nadir epoch; torch.where-style masking avoids a host sync.
            in_nadir_epoch = (self.epoch == self.warmup_epochs).to(self.nadir_sum)
            self.nadir_sum += in_nadir_epoch * l.to(self.nadir_sum)
            self.nadir_count += in_nadir_epoch
        warm_weights = 1.0 / (l + self._eps)
        nadir = self.nadir.to(l)
        soft = torch.softmax(torch.log(l / nadir + self._eps) / self.mu, dim=0)
        stch_weights = t * soft / (l + self._eps * nadir)
        return torch.where(self.epoch <= self.warmup_epochs, warm_weights, stch_weights)

    @torch.no_grad()
    def on_train_epoch_end(self) -> None:
        """Advance the epoch counter; at the end of the nadir epoch, sum the nadir across ranks."""
        if self.normalize and int(self.epoch) == self.warmup_epochs:
            all_reduce_sum_(self.nadir_sum)
            all_reduce_sum_(self.nadir_count)
        self.epoch += 1

    def extra_repr(self) -> str:
        return (
            f"num_tasks={self.num_tasks}, mu={self.mu}, warmup_epochs={self.warmup_epochs}, "
            f"normalize={self.normalize}"
        )
