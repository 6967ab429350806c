"""Dynamic weight average (DWA): weights from the rate at which each task's loss falls."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl.balancing.weightings.base import LossWeighting, all_reduce_sum_


class DWA(LossWeighting):
    r"""Dynamic weight average, Liu, Johns & Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019.

    With :math:`\bar L_t(e)` the average training loss of task :math:`t` over epoch :math:`e`,
    the weights used during epoch :math:`e` are

    .. math::

        r_t = \frac{\bar L_t(e-1)}{\bar L_t(e-2)}, \qquad
        w_t = T \, \frac{\exp(r_t / \tau)}{\sum_k \exp(r_k / \tau)},

    so tasks whose loss decreases slowly get more weight. During the first two epochs (no
    history yet) :math:`w_t = 1`. The weights are constant within an epoch and detached.

    Epoch averages are accumulated from the losses passed to ``forward`` in training mode; the
    training loop must call :meth:`on_train_epoch_end` once per epoch. Under DDP the averages are
    summed across ranks, so every rank uses the same weights.

    Args:
        num_tasks: number of tasks ``T``.
        temperature: :math:`\tau` (paper: 2); larger is closer to equal weighting.
    """

    def __init__(self, num_tasks: int, temperature: float = 2.0) -> None:
        super().__init__(num_tasks)
        if temperature <= 0:
            raise ValueError(f"balancer.method.temperature must be > 0, got {temperature}.")
        self.temperature = float(temperature)
        # Running sum and count of this epoch's losses.
        self.register_buffer("epoch_loss_sum", torch.zeros(num_tasks))
        self.register_buffer("epoch_loss_count", torch.zeros(()))
        # history[0] = average of the last finished epoch, history[1] = the one before.
        self.register_buffer("history", torch.ones(2, num_tasks))
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))

    def forward(self, losses: Tensor) -> Tensor:
        """``[T]`` losses -> ``[T]`` weights (detached); accumulates the losses when training."""
        self._check_losses(losses)
        if self.training:
            with torch.no_grad():
                self.epoch_loss_sum += losses.detach().to(self.epoch_loss_sum)
                self.epoch_loss_count += 1
        ratio = self.history[0] / self.history[1].clamp_min(torch.finfo(self.history.dtype).tiny)
        weights = self.num_tasks * torch.softmax(ratio / self.temperature, dim=0)
        # torch.where rather than an `if` on a device tensor: no host sync per step.
        weights = torch.where(self.epochs_seen >= 2, weights, torch.ones_like(weights))
        return weights.to(device=losses.device, dtype=losses.dtype)

    @torch.no_grad()
    def on_train_epoch_end(self) -> None:
        """Close the epoch: its average loss becomes ``history[0]``; resets the accumulators."""
        all_reduce_sum_(self.epoch_loss_sum)
        all_reduce_sum_(self.epoch_loss_count)
        if float(self.epoch_loss_count) > 0:
            self.history[1] = self.history[0]
            self.history[0] = self.epoch_loss_sum / self.epoch_loss_count
            self.epochs_seen += 1
        self.epoch_loss_sum.zero_()
        self.epoch_loss_count.zero_()

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, temperature={self.temperature}"
