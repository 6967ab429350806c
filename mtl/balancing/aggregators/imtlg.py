"""IMTL-G: impartial multi-task learning, gradient part."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mtl.balancing.aggregators.base import GradientAggregator, gramian, host


class IMTLG(GradientAggregator):
    r"""Gradient balancing of Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021 (IMTL-G).

    Find :math:`g = \sum_t \alpha_t g_t` with :math:`\sum_t \alpha_t = 1` whose projections on all
    unit gradients :math:`u_t = g_t / \|g_t\|` are equal. With :math:`D = [g_1 - g_t]_{t \ge 2}` and
    :math:`U = [u_1 - u_t]_{t \ge 2}` (both ``[T-1, P]``), the paper's closed form is

    .. math:: \alpha_{2:T} = g_1 U^\top (D U^\top)^{-1}, \qquad \alpha_1 = 1 - \sum_{t \ge 2}\alpha_t .

    Equivalently (and this is how it is computed), with the unit Gramian
    :math:`\hat G = N^{-1} G N^{-1}` (:math:`N = \operatorname{diag}\|g_t\|`): the direction with unit
    projection on every :math:`u_t` is :math:`v = \sum_t c_t u_t` with :math:`c = \hat G^{-1}\mathbf 1`,
    and :math:`\alpha = \beta / \mathbf 1^\top\beta` with :math:`\beta = N^{-1} c`. Both forms give the
    same (unique) answer when the gradients are linearly independent.

    Linearly dependent gradients (rank-deficient ``J``, e.g. rows :math:`g_1, g_2, g_1 + g_2`):
    equal projections are then generally impossible except by :math:`g = 0` (for that example
    :math:`u_3^\top g = c (\|g_1\| + \|g_2\|)/\|g_1 + g_2\| \ne c` unless :math:`c = 0`), which the
    closed form returns up to round-off. This implementation uses the minimum-norm least-squares
    solution of the conditions :math:`u_t^\top v = 1` instead, :math:`c = \hat G^{+}\mathbf 1`
    (pseudo-inverse), with the same normalisation :math:`\sum_t\alpha_t = 1`. The projections are
    then as equal as the geometry allows (exactly equal whenever equal projections exist, e.g.
    duplicated directions); for the example above :math:`\alpha = (1/3, 1/3, 1/3)` when
    :math:`g_1 \perp g_2` are unit vectors. Zero gradients get zero weight. The pseudo-inverse drops
    the eigenvalues of :math:`\hat G` below :math:`\lambda_{\max}\,\epsilon_{\text{float32}}
    \max(4, \sqrt P)`, a margin over the round-off of the float32 Gramian (measured: about
    :math:`10^{-7}\lambda_{\max}` for ``P <= 1e4``, :math:`10^{-5}\lambda_{\max}` for ``P = 1e6`` on
    CPU); where every eigenvalue is above it the result is the paper's closed form. Near that
    boundary the two differ: the closed form tends to :math:`g \to 0` as the rows become
    dependent, this one to the least-squares direction.

    Note: for ``T >= 3`` nothing in the rule forces the common projection to be positive:
    :math:`\mathbf 1^\top\beta` can be negative (about 1% of Gaussian Jacobians, more when the
    row norms differ widely), and then every task's projection is negative. This follows the
    paper's rule; it is not a non-conflicting method in general.

    Args:
        num_tasks: number of tasks ``T``.
        eps: guard on the gradient norms.
    """

    gramian_based = True

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
        lam, V = torch.linalg.eigh(inv[:, None] * G * inv[None, :])
        tol = lam.max().clamp_min(0) * max(4.0, math.sqrt(J.shape[1])) * torch.finfo(torch.float32).eps
        keep = lam > tol
        V = V[:, keep]
        c = (V / lam[keep]) @ (V.T @ torch.ones(T, dtype=G.dtype))  # pinv(G_unit) 1
        beta = inv * c
        total = beta.sum()
        if not bool(total.abs() > 1e-12 * beta.abs().sum()):
            return self.combine(torch.zeros(T, dtype=G.dtype), J)
        return self.combine(beta / total, J)
