"""FairGrad: alpha-fair resource allocation between tasks."""

from __future__ import annotations

from torch import Tensor

from mtl.balancing.aggregators.base import GradientAggregator, gramian, host
from mtl.balancing.solvers import bargaining_weights


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

    Fallback where the equation has no positive solution (see
    :func:`~mtl.balancing.solvers.bargaining_weights`): a task with a zero gradient gets weight 0
    and the others are solved for alone; if the solution's update has cosine below ``min_cos``
    with some task gradient (a Pareto-stationary point such as rows ``g`` and ``-g``, where the
    weights diverge), the update is zero and so are the weights. ``scipy``'s bounded least squares
    in the official code instead stops wherever its tolerances stop it (large weights).

    Args:
        num_tasks: number of tasks ``T``.
        alpha: fairness parameter :math:`\alpha > 0` (official default 1.0; the paper tunes it per
            benchmark).
        max_norm: clip the norm of the update to this value (official default 1.0; 0 = no clip).
        min_cos: smallest cosine between the update and every task gradient below which the
            point is treated as Pareto-stationary (no update).
    """

    gramian_based = True

    def __init__(
        self, num_tasks: int, alpha: float = 1.0, max_norm: float = 1.0, min_cos: float = 1e-3
    ) -> None:
        super().__init__(num_tasks)
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}.")
        if not 0.0 <= min_cos < 1.0:
            raise ValueError(f"min_cos must be in [0, 1), got {min_cos}.")
        self.alpha = alpha
        self.max_norm = max_norm
        self.min_cos = min_cos

    def aggregate(self, J: Tensor, losses: Tensor | None) -> tuple[Tensor, Tensor]:
        w = bargaining_weights(host(gramian(J)), 1.0 / self.alpha, min_cos=self.min_cos)
        g, weights = self.combine(w, J)
        if self.max_norm > 0:
            factor = (self.max_norm / (g.norm() + 1e-6)).clamp(max=1.0)
            g, weights = g * factor, weights * factor
        return g, weights
