"""MGDA: the min-norm point of the convex hull of the task gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl.balancing.aggregators.base import GradientAggregator, gramian, host
from mtl.balancing.solvers import min_norm_simplex

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


class MGDA(GradientAggregator):
    r"""Multiple-gradient descent of Sener and Koltun, "Multi-Task Learning as Multi-Objective
    Optimization", NeurIPS 2018 (MGDA-UB when ``J`` is taken over the shared representation).

    .. math::
        w = \arg\min_{w \in \Delta_T} \Big\|\sum_t w_t \hat g_t\Big\|^2
          = \arg\min_{w \in \Delta_T} w^\top \hat G w, \qquad g = \sum_t w_t g_t ,

    where :math:`\hat g_t = g_t / n_t` are the gradients normalised as in the authors' code
    (``normalization``: ``none`` :math:`n_t = 1`, ``l2`` :math:`n_t = \|g_t\|`, ``loss``
    :math:`n_t = L_t`, ``loss+`` :math:`n_t = L_t \|g_t\|`). As in that code the weights found on
    the normalised gradients are applied to the raw ones, and they sum to one.

    Solver: exact, on the Gramian (:func:`~mtl.balancing.solvers.min_norm_simplex`: block
    principal pivoting for ``T > 16``, the active set otherwise and as its fallback) instead of the
    paper's Frank-Wolfe iterations; both converge to the same point.

    Args:
        num_tasks: number of tasks ``T``.
        normalization: one of ``none`` (default), ``l2``, ``loss``, ``loss+``.
        eps: guard on the normalisers.
    """

    gramian_based = True

    def __init__(self, num_tasks: int, normalization: str = "none", eps: float = 1e-12) -> None:
        super().__init__(num_tasks)
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}.")
        self.normalization = normalization
        self.needs_losses = normalization in ("loss", "loss+")
        self.eps = eps

    def aggregate(self, J: Tensor, losses: Tensor | None) -> tuple[Tensor, Tensor]:
        G = host(gramian(J))
        n = torch.ones(G.shape[0], dtype=G.dtype)
        if self.normalization in ("l2", "loss+"):
            n = n * G.diagonal().clamp_min(0).sqrt()
        if self.normalization in ("loss", "loss+"):
            n = n * host(losses)
        inv = 1.0 / n.clamp_min(self.eps)
        w = min_norm_simplex(inv[:, None] * G * inv[None, :])
        return self.combine(w, J)
