"""Aligned-MTL: align the principal components of the task gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl.balancing.aggregators.base import GradientAggregator, gramian, host

SCALE_MODES = ("min", "median", "rmse")


class AlignedMTL(GradientAggregator):
    r"""Aligned-MTL of Senushkin et al., "Independent Component Alignment for Multi-Task
    Learning", CVPR 2023.

    Replace the task gradients by the closest (Procrustes) set of orthogonal gradients with equal
    norms, which makes the linear system of gradients perfectly conditioned. With the
    eigendecomposition of the Gramian :math:`G = V \Lambda V^\top` restricted to its numerical rank
    (eigenvalues above :math:`\lambda_{\max} \cdot T \cdot \epsilon_{\text{float32}}`),

    .. math::
        B = \sigma \, V \Lambda^{-1/2} V^\top, \qquad \hat J = B J, \qquad g = \sum_t \hat J_t
          = (B \mathbf 1)^\top J,

    where the scale :math:`\sigma` is the smallest singular value of ``J``,
    :math:`\sqrt{\lambda_{\min}}` (``scale_mode="min"``, the paper's default), the median one
    (``"median"``), or :math:`\sqrt{\operatorname{mean}\lambda}` (``"rmse"``). For orthogonal rows of
    equal norm :math:`B = I` and the result is the sum of the rows. The task pre-weights of the
    paper are all one here (weighting belongs to the loss-weighting balancers).

    Args:
        num_tasks: number of tasks ``T``.
        scale_mode: ``min`` (default), ``median`` or ``rmse``.
    """

    gramian_based = True

    def __init__(self, num_tasks: int, scale_mode: str = "min") -> None:
        super().__init__(num_tasks)
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}.")
        self.scale_mode = scale_mode

    def aggregate(self, J: Tensor, losses: Tensor | None) -> tuple[Tensor, Tensor]:
        G = host(gramian(J))
        T = G.shape[0]
        lam, V = torch.linalg.eigh(G)
        tol = lam.max().clamp_min(0) * T * torch.finfo(torch.float32).eps
        keep = lam > tol
        if not bool(keep.any()):
            return self.combine(torch.zeros(T, dtype=G.dtype), J)
        lam, V = lam[keep], V[:, keep]
        if self.scale_mode == "min":
            sigma = lam.min().sqrt()
        elif self.scale_mode == "median":
            sigma = lam.sqrt().median()
        else:
            sigma = lam.mean().sqrt()
        B = sigma * (V * lam.rsqrt()) @ V.T
        return self.combine(B.sum(1), J)
