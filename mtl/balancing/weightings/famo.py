"""FAMO: fast adaptive multitask optimization, balancing the rate of loss improvement."""

from __future__ import annotations

from typing import ClassVar, Sequence

import torch
from torch import Tensor

from mtl.balancing.weightings.base import LossWeighting, all_reduce_mean_, per_task_list


class FAMO(LossWeighting):
    r"""FAMO, Liu, Liang, Wang & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023.

    Task logits :math:`\xi \in \mathbb R^T` (initialised to 0) give
    :math:`z = \operatorname{softmax}(\xi)`. With :math:`D_t = L_t - m_t + \epsilon`
    (:math:`m` = ``min_losses``, lower bounds of the losses, default 0;
    :math:`\epsilon = 10^{-8}`), FAMO's model objective is

    .. math:: \frac{1}{c} \sum_t z_t \log D_t,
        \qquad c = \sum_t \frac{z_t}{D_t} \ (\text{detached}),

    whose gradient is :math:`\sum_t \frac{z_t}{c D_t} \nabla L_t`. So ``forward`` returns the
    detached weights

    .. math:: w_t = \frac{z_t / D_t}{\sum_k z_k / D_k}

    (they sum to 1): ``(w * L).sum()`` has exactly FAMO's gradient (its value differs from FAMO's
    objective, which is only a surrogate anyway).

    After the optimizer step, with :math:`L'` the losses *on the same batch* recomputed with the
    updated model, the logits take one Adam step (lr ``lr``, L2 weight decay ``gamma``, betas
    (0.9, 0.999), eps 1e-8, as in the official code) along

    .. math:: \delta = J_{\operatorname{softmax}}(\xi)^\top \big(\log D(L) - \log D(L')\big)
        = z \odot (\Delta - z^\top \Delta), \quad \Delta_t = \log D_t(L) - \log D_t(L'),

    so tasks whose log-loss decreased less than average gain weight. The logits and the Adam
    moments are buffers (not parameters): the model's optimizer must not touch them, and they are
    saved in ``state_dict()``.

    Caller contract: each training step calls ``forward(losses)`` (which remembers the detached
    losses), then after ``optimizer.step()`` recomputes the losses on the same batch under
    ``torch.no_grad()`` and calls ``after_optimizer_step(new_losses)``. With gradient accumulation
    the remembered losses are those of the last micro-batch, so recompute on that one. Under DDP
    the log-loss decrease is averaged across ranks so the logits stay identical. The official
    code also clips the shared gradient norm at 1.0: set that in the trainer
    (``gradient_clip_val``) if wanted.

    Args:
        num_tasks: number of tasks ``T``.
        lr: learning rate of the logits (paper/official: 0.025).
        gamma: weight decay of the logits (official default 0.01; the paper tunes it per
            benchmark, e.g. 0.001).
        min_losses: lower bounds :math:`m_t` of the losses (``balancer.method.min_losses``),
            default all 0.
    """

    needs_losses_after_step: ClassVar[bool] = True

    _beta1: ClassVar[float] = 0.9
    _beta2: ClassVar[float] = 0.999
    _adam_eps: ClassVar[float] = 1e-8
    _eps: ClassVar[float] = 1e-8

    def __init__(
        self,
        num_tasks: int,
        lr: float = 0.025,
        gamma: float = 0.01,
        min_losses: Sequence[float] | None = None,
    ) -> None:
        super().__init__(num_tasks)
        self.lr = float(lr)
        self.gamma = float(gamma)
        self.register_buffer(
            "min_losses",
            per_task_list(min_losses, num_tasks, "balancer.method.min_losses", 0.0),
            persistent=False,
        )
        self.register_buffer("logits", torch.zeros(num_tasks))
        self.register_buffer("exp_avg", torch.zeros(num_tasks))
        self.register_buffer("exp_avg_sq", torch.zeros(num_tasks))
        self.register_buffer("adam_step", torch.zeros((), dtype=torch.long))
        # Losses of the last training forward, compared with the post-step ones.
        self.register_buffer("prev_losses", torch.zeros(num_tasks))
        # A Python flag, not a buffer: reading a device tensor every step would force a sync.
        self._has_prev_losses = False

    def _log_gap(self, losses: Tensor) -> Tensor:
        return torch.log(losses - self.min_losses + self._eps)

    def forward(self, losses: Tensor) -> Tensor:
        """``[T]`` losses -> ``[T]`` weights ``(z/D) / sum(z/D)`` (detached)."""
        self._check_losses(losses)
        l = losses.detach().to(self.logits)
        if self.training:
            self.prev_losses.copy_(l)
            self._has_prev_losses = True
        z = torch.softmax(self.logits, dim=0)
        z_over_d = z / (l - self.min_losses + self._eps)
        weights = z_over_d / z_over_d.sum()
        return weights.to(device=losses.device, dtype=losses.dtype)

    @torch.no_grad()
    def after_optimizer_step(self, losses: Tensor) -> None:
        """One Adam step on the logits from the log-loss decrease on the same batch.

        Args:
            losses: ``[T]`` losses on the batch last passed to ``forward``, recomputed after the
                optimizer step (no graph needed).

        Raises:
            RuntimeError: if ``forward`` was not called in training mode since the last update.
        """
        self._check_losses(losses)
        if not self._has_prev_losses:
            raise RuntimeError(
                "FAMO.after_optimizer_step() needs the losses of a training forward first: call "
                "weighting(losses) in the training step, then after optimizer.step() recompute "
                "the losses on the same batch and call after_optimizer_step(new_losses)."
            )
        l_new = losses.detach().to(self.logits)
        decrease = all_reduce_mean_(self._log_gap(self.prev_losses) - self._log_gap(l_new))
        z = torch.softmax(self.logits, dim=0)
        grad = z * (decrease - (z * decrease).sum())
        grad = grad + self.gamma * self.logits  # Adam's (coupled) L2 weight decay

        self.adam_step += 1
        step = self.adam_step.to(self.logits.dtype)  # stays on device: no host sync
        self.exp_avg.mul_(self._beta1).add_(grad, alpha=1 - self._beta1)
        self.exp_avg_sq.mul_(self._beta2).addcmul_(grad, grad, value=1 - self._beta2)
        bias1 = 1 - torch.pow(self._beta1, step)
        bias2 = 1 - torch.pow(self._beta2, step)
        denom = (self.exp_avg_sq / bias2).sqrt_().add_(self._adam_eps)
        self.logits.sub_(self.lr * (self.exp_avg / bias1) / denom)
        self._has_prev_losses = False

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, lr={self.lr}, gamma={self.gamma}"
