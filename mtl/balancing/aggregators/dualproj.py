"""DualProj: projection of the mean gradient onto the dual cone."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl.balancing.aggregators.base import GradientAggregator, gramian, host
from mtl.balancing.aggregators.upgrad import normalize_and_regularize
from mtl.balancing.solvers import dual_cone_weights_batched


class DualProj(GradientAggregator):
    r"""DualProj of Quinton and Rey, "Jacobian Descent for Multi-Objective Optimization",
    arXiv 2406.16700, 2024.

    Project the mean gradient onto the dual cone of the rows, :math:`\{x : Jx \ge 0\}`:

    .. math:: g = \pi_J\Big(\frac1T \sum_t g_t\Big) = v^\top J, \qquad
              v = \arg\min_{v \ge \mathbf 1/T} v^\top G v .

    Same normalisation, ridge and solver as :class:`~mtl.balancing.aggregators.upgrad.UPGrad`.
    If the mean does not conflict with any row it is returned unchanged.

    Args:
        num_tasks: number of tasks ``T``.
        reg_eps: ridge added to the trace-normalised Gramian (TorchJD default ``1e-4``).
    """

    gramian_based = True

    def __init__(self, num_tasks: int, reg_eps: float = 1e-4) -> None:
        super().__init__(num_tasks)
        if reg_eps < 0:
            raise ValueError(f"reg_eps must be >= 0, got {reg_eps}.")
        self.reg_eps = reg_eps

    def aggregate(self, J: Tensor, losses: Tensor | None) -> tuple[Tensor, Tensor]:
        G = normalize_and_regularize(host(gramian(J)), self.reg_eps)
        T = G.shape[0]
        v = dual_cone_weights_batched(torch.full((1, T), 1.0 / T, dtype=G.dtype), G)[0]
        return self.combine(v, J)
