"""GradDrop: gradient sign dropout."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl.balancing.aggregators.base import GradientAggregator, seeded_generator


class GradDrop(GradientAggregator):
    r"""Gradient sign dropout of Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models
    with Gradient Sign Dropout", NeurIPS 2020.

    Per coordinate ``k`` the sign purity is

    .. math:: \mathcal{P}_k = \tfrac12\Big(1 + \frac{\sum_i J_{ik}}{\sum_i |J_{ik}|}\Big) \in [0, 1],

    one uniform :math:`U_k \sim \mathcal{U}(0, 1)` is drawn, and task ``i`` keeps its coordinate iff
    :math:`(\mathcal{P}_k > U_k \wedge J_{ik} > 0) \vee (\mathcal{P}_k < U_k \wedge J_{ik} < 0)`.
    With leak :math:`\ell`, :math:`g = \sum_i (\ell + (1-\ell) M_i) \odot J_i` (paper default
    :math:`\ell = 0`).

    Deviation: the paper applies the rule to gradients with respect to activations, multiplied by
    the sign of the activation and summed over the batch before computing :math:`\mathcal{P}`. Here
    it is the same per-coordinate rule applied directly to whatever ``J``'s columns are (parameters
    or the flattened representation). ``last_weights`` is None: the mask is per coordinate.

    Args:
        num_tasks: number of tasks ``T``.
        leak: fraction of every task's gradient that passes unmasked, in ``[0, 1]``.
        seed: seed of the dropout draws (with the step count), or None for the global RNG.
        eps: guard in the purity denominator.
    """

    def __init__(
        self, num_tasks: int, leak: float = 0.0, seed: int | None = None, eps: float = 1e-12
    ) -> None:
        super().__init__(num_tasks)
        if not 0.0 <= leak <= 1.0:
            raise ValueError(f"leak must be in [0, 1], got {leak}.")
        self.leak = leak
        self.seed = seed
        self.eps = eps

    def aggregate(self, J: Tensor, losses: Tensor | None) -> tuple[Tensor, None]:
        # Per coordinate only the signs matter: task i keeps J_ik iff J_ik > 0 and P_k > U_k, or
        # J_ik < 0 and P_k < U_k, so the masked sum is the sum of the positive entries, of the
        # negative entries, or zero. Two passes over J instead of a [T, P] mask and product.
        pos = J.clamp_min(0.0).sum(0)
        neg = J.clamp_max(0.0).sum(0)
        purity = 0.5 * (1.0 + (pos + neg) / ((pos - neg) + self.eps))
        gen = seeded_generator(self.seed, self.step, J.device)
        U = torch.rand(J.shape[1], device=J.device, dtype=J.dtype, generator=gen)
        # Masks as 0/1 factors (exact: x * 1 + y * 0 = x), cheaper than torch.where on CPU.
        kept = pos * (purity > U).to(J.dtype) + neg * (purity < U).to(J.dtype)
        if self.leak == 0.0:
            return kept, None
        if self.leak == 1.0:
            return J.sum(0), None
        return self.leak * (pos + neg) + (1.0 - self.leak) * kept, None
