"""ConFIG: conflict-free inverse gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl.balancing.aggregators.base import GradientAggregator, gramian, host


class ConFIG(GradientAggregator):
    r"""Conflict-free update of Liu et al., "ConFIG: Towards Conflict-free Training of Physics
    Informed Neural Networks", ICLR 2025.

    With the unit gradients stacked as :math:`\mathcal U = [g_t / \|g_t\|]_t` (``[T, P]``), the
    direction is the one with the same cosine to every gradient,

    .. math::
        v = \mathcal U^{+} \mathbf 1, \qquad \hat v = v / \|v\|, \qquad
        g = \Big(\sum_t g_t^\top \hat v\Big) \hat v ,

    i.e. the length is the sum of the projections of the gradients on :math:`\hat v`. When the
    gradients are linearly independent, :math:`u_t^\top v = 1` for every ``t``.
    Computed in task space: :math:`\mathcal U^+ \mathbf 1 = \mathcal U^\top c` with
    :math:`c = \hat G^{+}\mathbf 1` and :math:`\hat G = N^{-1} G N^{-1}`; the pseudo-inverse drops
    eigenvalues below :math:`\lambda_{\max} \cdot T \cdot \epsilon_{\text{float32}}` (the Gramian is
    accumulated in float32). Zero gradients get a zero unit vector.

    Args:
        num_tasks: number of tasks ``T``.
        eps: guard on norms.
    """

    gramian_based = True

    def __init__(self, num_tasks: int, eps: float = 1e-12) -> None:
        super().__init__(num_tasks)
        self.eps = eps

    def aggregate(self, J: Tensor, losses: Tensor | None) -> tuple[Tensor, Tensor]:
        G = host(gramian(J))
        T = G.shape[0]
        norms = G.diagonal().clamp_min(0).sqrt()
        inv = torch.where(norms > self.eps, 1.0 / norms.clamp_min(self.eps), torch.zeros_like(norms))
        G_unit = inv[:, None] * G * inv[None, :]
        lam, V = torch.linalg.eigh(G_unit)
        tol = lam.max().clamp_min(0) * T * torch.finfo(torch.float32).eps
        lam_inv = torch.where(lam > tol, 1.0 / lam.clamp_min(self.eps), torch.zeros_like(lam))
        c = (V * lam_inv) @ (V.T @ torch.ones(T, dtype=G.dtype))
        v_weights = inv * c  # v = J^T (N^{-1} c)
        v_norm = (v_weights @ G @ v_weights).clamp_min(0).sqrt()
        if not bool(v_norm > self.eps):
            return self.combine(torch.zeros(T, dtype=G.dtype), J)
        unit_weights = v_weights / v_norm
        length = (G @ unit_weights).sum()
        return self.combine(length * unit_weights, J)
