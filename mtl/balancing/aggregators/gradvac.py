"""Gradient Vaccine: align task gradients to an adaptive target cosine similarity."""

from __future__ import annotations


import numpy as np
import torch
from torch import Tensor

from mtl.balancing.aggregators.base import GradientAggregator, gramian, host, seeded_generator
from mtl.balancing.aggregators.pcgrad import visiting_orders


class GradVac(GradientAggregator):
    r"""Gradient Vaccine of Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models", ICLR 2021 (Algorithm 1).

    Each pair of tasks keeps an EMA target cosine :math:`\hat\phi_{ij}` (a buffer, initialised to 0).
    For each task ``i`` and the other tasks ``j`` in random order, with
    :math:`\phi_{ij} = \cos(g_i^{PC}, g_j)`: if :math:`\phi_{ij} < \hat\phi_{ij}`,

    .. math::
        g_i^{PC} \leftarrow g_i^{PC} + \frac{\|g_i^{PC}\| \left(\hat\phi_{ij}\sqrt{1-\phi_{ij}^2}
        - \phi_{ij}\sqrt{1-\hat\phi_{ij}^2}\right)}{\|g_j\| \sqrt{1-\hat\phi_{ij}^2}} \, g_j ,

    which makes :math:`\cos(g_i^{PC}, g_j) = \hat\phi_{ij}` exactly; then
    :math:`\hat\phi_{ij} \leftarrow (1-\beta)\hat\phi_{ij} + \beta\phi_{ij}` (for every visited pair).
    The update is :math:`g = \sum_i g_i^{PC}`. With :math:`\hat\phi = 0` this is PCGrad.

    Like :class:`PCGrad` it runs on the Gramian, so ``last_weights`` are the effective weights.
    Deviation: the paper applies the rule per parameter group (layer); here it is applied to the
    whole row of ``J`` (what it represents is the caller's choice), as LibMTL's default does.

    Args:
        num_tasks: number of tasks ``T``.
        beta: EMA rate of the targets; the paper uses ``1e-2``.
        seed: seed of the task-order shuffle (with the step count), or None for the global RNG.
        eps: numerical guard for zero-norm gradients.
    """

    gramian_based = True

    target: Tensor

    def __init__(
        self, num_tasks: int, beta: float = 1e-2, seed: int | None = None, eps: float = 1e-12
    ) -> None:
        super().__init__(num_tasks)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}.")
        self.beta = beta
        self.seed = seed
        self.eps = eps
        self.register_buffer("target", torch.zeros(num_tasks, num_tasks))

    def aggregate(self, J: Tensor, losses: Tensor | None) -> tuple[Tensor, Tensor]:
        G = host(gramian(J)).numpy()
        T = G.shape[0]
        target = host(self.target).numpy().copy()
        gen = seeded_generator(self.seed, self.step, "cpu")
        orders = visiting_orders(T, gen)
        C = np.eye(T)
        norms = np.sqrt(np.maximum(np.diag(G), 0.0))
        rows = np.arange(T)
        CG = C @ G  # kept equal to C G as C changes: row i of it gives g_i^PC . g_j for every j
        # the T sequences are independent: advance them together, one visited task per step
        for k in range(T - 1):
            j = orders[:, k]
            norm_i = np.sqrt(np.maximum(np.einsum("it,it->i", CG, C), 0.0))
            norm_j = norms[j]
            ok = (norm_i >= self.eps) & (norm_j >= self.eps)
            with np.errstate(divide="ignore", invalid="ignore"):
                phi = np.clip(CG[rows, j] / (norm_i * norm_j), -1.0, 1.0)
            phi_hat = target[rows, j]
            lift = ok & (phi < phi_hat)
            root_hat = np.sqrt(np.maximum(1.0 - phi_hat**2, self.eps))
            coef = norm_i * (phi_hat * np.sqrt(np.maximum(1.0 - phi**2, 0.0)) - phi * root_hat)
            step = np.where(lift, coef / (norm_j * root_hat), 0.0)
            C[rows, j] += step
            CG += step[:, None] * G[j]
            target[rows[ok], j[ok]] = ((1.0 - self.beta) * phi_hat + self.beta * phi)[ok]
        self.target.copy_(torch.from_numpy(target))
        return self.combine(torch.from_numpy(C.sum(0)), J)
