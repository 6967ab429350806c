"""Nash-MTL: multi-task learning as a bargaining game."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl.balancing.aggregators.base import GradientAggregator, gramian, host
from mtl.balancing.solvers import bargaining_weights


class NashMTL(GradientAggregator):
    r"""Nash bargaining solution of Navon et al., "Multi-Task Learning as a Bargaining Game",
    ICML 2022.

    The update :math:`g = \sum_t \alpha_t g_t` maximises :math:`\sum_t \log(g_t^\top g)` over a ball;
    its weights are the positive solution of

    .. math:: G \alpha = 1 / \alpha \quad(\text{elementwise}), \qquad G = J J^\top,

    i.e. :math:`\alpha_t (G\alpha)_t = 1` for every task. For orthogonal gradients
    :math:`\alpha_t = 1/\|g_t\|`. As in the official code, the weights are recomputed every
    ``update_weights_every`` steps (the previous ones are reused in between and warm-start the
    solver) and the update is clipped to norm ``max_norm`` (``0`` disables clipping).

    Deviation: the official code reaches the solution by a sequence of convex programs (cvxpy,
    ``optim_niter=20``); here :func:`~mtl.balancing.solvers.power_balance` minimises the equivalent
    convex potential :math:`\tfrac12\alpha^\top G\alpha - \sum_t \log\alpha_t` by Newton's method,
    which solves the same equation to machine precision.

    Fallback where the equation has no positive solution (see
    :func:`~mtl.balancing.solvers.bargaining_weights`): a task with a zero gradient gets weight 0
    and the others bargain alone; if the solution's update has cosine below ``min_cos`` with some
    task gradient (a Pareto-stationary point such as rows ``g`` and ``-g``, where the weights
    diverge), the update is zero and so are the weights (reused as such until the next
    recomputation when ``update_weights_every > 1``). So the weights stay bounded,
    :math:`\alpha_t \le 1 / (\text{min\_cos}\,\sqrt T\,\|g_t\|)`. The official code keeps the
    previous weights when its convex program is infeasible.

    Args:
        num_tasks: number of tasks ``T``.
        update_weights_every: recompute :math:`\alpha` every this many steps (official default 1).
        max_norm: clip the norm of the update to this value (official default 1.0; 0 = no clip).
        min_cos: smallest cosine between the update and every task gradient below which the
            point is treated as Pareto-stationary (no update).
    """

    gramian_based = True

    prev_alpha: Tensor

    def __init__(
        self, num_tasks: int, update_weights_every: int = 1, max_norm: float = 1.0, min_cos: float = 1e-3
    ) -> None:
        super().__init__(num_tasks)
        if update_weights_every < 1:
            raise ValueError(f"update_weights_every must be >= 1, got {update_weights_every}.")
        if not 0.0 <= min_cos < 1.0:
            raise ValueError(f"min_cos must be in [0, 1), got {min_cos}.")
        self.update_weights_every = update_weights_every
        self.max_norm = max_norm
        self.min_cos = min_cos
        self.register_buffer("prev_alpha", torch.ones(num_tasks))

    def aggregate(self, J: Tensor, losses: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.step % self.update_weights_every == 0:
            G = host(gramian(J))
            warm = host(self.prev_alpha) if self.step > 0 else None
            alpha = bargaining_weights(G, 1.0, warm, min_cos=self.min_cos)
            self.prev_alpha.copy_(alpha.to(self.prev_alpha))
        weights = self.prev_alpha.to(device=J.device, dtype=J.dtype)
        g = weights @ J
        if self.max_norm > 0:
            factor = (self.max_norm / (g.norm() + 1e-6)).clamp(max=1.0)
            g, weights = g * factor, weights * factor
        return g, weights
