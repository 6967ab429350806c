"""FairGrad: alpha-fair resource allocation between tasks."""

from __future__ import annotations

from torch import Tensor

from mtl.balancing.aggregators.base import GradientAggregator, gramian, host
from mtl.balancing.solvers import power_balance


class FairGrad(GradientAggregator):
    r"""FairGrad of Ban and Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024.

    The update :math:`g = \sum_t w_t g_t` maximises the :math:`\alpha`-fair utility
    :math:`\sum_t (g_t^\top g)^{1-\alpha}/(1-\alpha)` over a ball; its weights solve

    .. math:: G w = w^{-1/\alpha} \quad(\text{elementwise}), \qquad w > 0 .

    :math:`\alpha = 1` is proportional fairness (the Nash-MTL equation), :math:`\alpha \to \infty`
    approaches max-min fairness. As in the official code, the update is clipped to norm
    ``max_norm`` (``0`` disables clipping).

    Deviation: the official code calls ``scipy.optimize.least_squares`` on the residual; here
    :func:`~mtl.balancing.solvers.power_balance` minimises the convex potential whose stationarity
    condition is that equation, by Newton's method (exact up to round-off).

    Args:
        num_tasks: number of tasks ``T``.
        alpha: fairness parameter :math:`\alpha > 0` (official default 1.0; the paper tunes it per
            benchmark).
        max_norm: clip the norm of the update to this value (official default 1.0; 0 = no clip).
    """

    def __init__(self, num_tasks: int, alpha: float = 1.0, max_norm: float = 1.0) -> None:
        super().__init__(num_tasks)
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}.")
        self.alpha = alpha
        self.max_norm = max_norm

    def aggregate(self, J: Tensor, losses: Tensor | None) -> tuple[Tensor, Tensor]:
        w = power_balance(host(gramian(J)), 1.0 / self.alpha)
        g, weights = self.combine(w, J)
        if self.max_norm > 0:
            factor = (self.max_norm / (g.norm() + 1e-6)).clamp(max=1.0)
            g, weights = g * factor, weights * factor
        return g, weights
