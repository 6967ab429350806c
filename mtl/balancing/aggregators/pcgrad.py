"""PCGrad: projecting conflicting gradients (gradient surgery)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mtl.balancing.aggregators.base import GradientAggregator, gramian, host, seeded_generator


class PCGrad(GradientAggregator):
    r"""Gradient surgery of Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020.

    For each task ``i``, start from ``g_i^PC = g_i`` and visit the other tasks ``j != i`` in a random
    order; whenever ``g_i^PC . g_j < 0``, project onto the normal plane of ``g_j``:

    .. math:: g_i^{PC} \leftarrow g_i^{PC} - \frac{g_i^{PC} \cdot g_j}{\|g_j\|^2} g_j .

    The update is :math:`g = \sum_i g_i^{PC}` (Algorithm 1 of the paper). Every projection adds a
    multiple of a row of ``J``, so the whole procedure runs on the Gramian: ``g_i^PC = C_i J`` with
    ``C = I`` updated by ``C_i -= min(0, C_i G_{:j}) / G_jj e_j``, and the effective weights are
    ``C.sum(0)`` (recorded in ``last_weights``).

    Args:
        num_tasks: number of tasks ``T``.
        seed: seed of the task-order shuffle (with the step count), or None for the global RNG.
        eps: guard on ``||g_j||^2`` for all-zero task gradients.
    """

    gramian_based = True

    def __init__(self, num_tasks: int, seed: int | None = None, eps: float = 1e-20) -> None:
        super().__init__(num_tasks)
        self.seed = seed
        self.eps = eps

    def aggregate(self, J: Tensor, losses: Tensor | None) -> tuple[Tensor, Tensor]:
        G = host(gramian(J)).numpy()
        T = G.shape[0]
        gen = seeded_generator(self.seed, self.step, "cpu")
        orders = visiting_orders(T, gen)  # [T, T-1]: row i is task i's order of the other tasks
        C = np.eye(T)
        sq_norms = np.maximum(np.diag(G), self.eps)
        rows = np.arange(T)
        CG = C @ G  # kept equal to C G as C changes: CG[i, j] = g_i^PC . g_j
        # the T sequences are independent: advance them together, one visited task per step
        for k in range(T - 1):
            j = orders[:, k]
            dot = CG[rows, j]
            step = np.where(dot < 0, -dot / sq_norms[j], 0.0)
            C[rows, j] += step
            CG += step[:, None] * G[j]
        return self.combine(torch.from_numpy(C.sum(0)), J)


def visiting_orders(T: int, generator: torch.Generator | None) -> np.ndarray:
    """``[T, T - 1]``: for each task ``i`` (drawn in turn, one permutation each) the other tasks in a
    random order."""
    perms = [torch.randperm(T, generator=generator).numpy() for _ in range(T)]
    return np.stack([p[p != i] for i, p in enumerate(perms)]) if T > 1 else np.zeros((T, 0), dtype=np.int64)
