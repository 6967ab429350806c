"""Geometric loss strategy (GLS): minimise the geometric mean of the task losses."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl.balancing.weightings.base import LossWeighting


class GLS(LossWeighting):
    r"""Geometric loss strategy, Chennupati et al., "MultiNet++: Multi-Stream Feature Aggregation
    and Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019.

    The objective is the geometric mean :math:`G = (\prod_t L_t)^{1/T}`, whose gradient is

    .. math:: \nabla G = \sum_t \frac{G}{T L_t} \nabla L_t .

    So the returned weights are the detached :math:`w_t = G / (T L_t)`: ``(w * L).sum()`` has
    exactly the gradient of :math:`G` (and the value :math:`G` too). The mean is computed as
    :math:`\exp(\frac1T \sum_t \log L_t)` for stability. Losses must be positive; they are clamped
    at ``eps``.

    Args:
        num_tasks: number of tasks ``T``.
        eps: lower clamp on the losses.
    """

    def __init__(self, num_tasks: int, eps: float = 1e-12) -> None:
        super().__init__(num_tasks)
        self.eps = float(eps)

    def forward(self, losses: Tensor) -> Tensor:
        """``[T]`` positive losses -> ``[T]`` weights ``G / (T L_t)`` (detached)."""
        self._check_losses(losses)
        l = losses.detach().clamp_min(self.eps)
        log_l = torch.log(l)
        return torch.exp(log_l.mean() - log_l) / self.num_tasks
