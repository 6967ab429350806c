"""IMTL-G: impartial multi-task learning, gradient part."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl.balancing.aggregators.base import GradientAggregator, gramian, host


class IMTLG(GradientAggregator):
    r"""Gradient balancing of Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021 (IMTL-G).

    Find :math:`g = \sum_t \alpha_t g_t` with :math:`\sum_t \alpha_t = 1` whose projections on all
    unit gradients :math:`u_t = g_t / \|g_t\|` are equal. With :math:`D = [g_1 - g_t]_{t \ge 2}` and
    :math:`U = [u_1 - u_t]_{t \ge 2}` (both ``[T-1, P]``), the closed form is

    .. math:: \alpha_{2:T} = g_1 U^\top (D U^\top)^{-1}, \qquad \alpha_1 = 1 - \sum_{t \ge 2}\alpha_t .

    Everything is computed from the Gramian (:math:`DU^\top = A G N^{-1} A^\top`,
    :math:`g_1 U^\top = e_1^\top G N^{-1} A^\top` with :math:`A = [e_1 - e_t]` and
    :math:`N = \operatorname{diag}\|g_t\|`); a singular :math:`DU^\top` (collinear or zero gradients)
    uses the pseudo-inverse instead of failing.

    Args:
        num_tasks: number of tasks ``T``.
        eps: guard on the gradient norms.
    """

    def __init__(self, num_tasks: int, eps: float = 1e-12) -> None:
        super().__init__(num_tasks)
        self.eps = eps

    def aggregate(self, J: Tensor, losses: Tensor | None) -> tuple[Tensor, Tensor]:
        G = host(gramian(J))
        T = G.shape[0]
        if T == 1:
            return self.combine(torch.ones(1, dtype=G.dtype), J)
        norms = G.diagonal().clamp_min(0).sqrt()
        inv = torch.where(norms > self.eps, 1.0 / norms.clamp_min(self.eps), torch.zeros_like(norms))
        A = torch.zeros(T - 1, T, dtype=G.dtype)
        A[:, 0] = 1.0
        A[:, 1:] -= torch.eye(T - 1, dtype=G.dtype)
        GNA = G @ (inv[:, None] * A.T)  # [T, T-1] = G N^{-1} A^T
        lhs = GNA[0]  # g_1 U^T
        M = A @ GNA  # D U^T
        alpha_rest = torch.linalg.lstsq(M.T, lhs.unsqueeze(1)).solution.flatten()
        if not bool(torch.isfinite(alpha_rest).all()):
            alpha_rest = torch.linalg.pinv(M.T) @ lhs
        alpha = torch.cat([(1.0 - alpha_rest.sum()).reshape(1), alpha_rest])
        return self.combine(alpha, J)
