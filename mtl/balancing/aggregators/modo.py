"""MoDo: multi-objective gradient with double sampling."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl.balancing.aggregators.base import GradientAggregator, gramian, host
from mtl.balancing.solvers import project_simplex


class MoDo(GradientAggregator):
    r"""MoDo of Chen, Fernando, Ying and Chen, "Three-Way Trade-Off in Multi-Objective Learning:
    Optimization, Generalization and Conflict-Avoidance", NeurIPS 2023 (Algorithm 1).

    The MGDA weights are learned by stochastic projected gradient descent on
    :math:`\tfrac12\|\nabla F(x)\lambda\|^2 + \tfrac\rho2\|\lambda\|^2` over the simplex, one step per
    iteration, and the model moves along the weighted gradient:

    .. math::
        \lambda^{(k)} = \Pi_{\Delta_T}\Big(\lambda^{(k-1)} - \gamma \big(J_1 J_2^\top
            + \rho I\big)\lambda^{(k-1)}\Big), \qquad \lambda^{(0)} = \mathbf 1 / T, \qquad
        g = J_3^\top \lambda^{(k)} ,

    where the paper's :math:`J_1, J_2, J_3` are the Jacobians of three independent mini-batches
    ("double sampling": :math:`\mathbb E[J_1 J_2^\top] = \nabla F \nabla F^\top` is unbiased).

    What this implementation does instead: the aggregator interface receives one Jacobian per
    step, so the same ``J`` is used for all three, :math:`J_1 J_2^\top = J_3 J_3^\top = G`. That
    makes the weight step a deterministic function of ``J``, but :math:`\mathbb E[G]` is the
    Gramian of the expected gradients *plus* the covariance of the gradient noise, the bias that
    double sampling removes. LibMTL keeps the paper's scheme (its trainer draws three batches for
    MoDo and passes losses of shape ``[3, T]``), so on noisy gradients the two differ; getting
    three Jacobians per step would need a different backward (three batches, three Jacobians),
    which :func:`~mtl.balancing.balanced_backward` does not do.

    Defaults are LibMTL's (:math:`\gamma = 10^{-3}`, :math:`\rho = 0.1`). :math:`\lambda` is the
    buffer ``lam``; ``last_weights`` is :math:`\lambda` too.

    Args:
        num_tasks: number of tasks ``T``.
        gamma: step :math:`\gamma` of the weights.
        rho: ridge :math:`\rho \ge 0`.
    """

    gramian_based = True

    lam: Tensor

    def __init__(self, num_tasks: int, gamma: float = 1e-3, rho: float = 0.1) -> None:
        super().__init__(num_tasks)
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}.")
        self.gamma = gamma
        self.rho = rho
        self.register_buffer("lam", torch.full((num_tasks,), 1.0 / num_tasks))

    def aggregate(self, J: Tensor, losses: Tensor | None) -> tuple[Tensor, Tensor]:
        G = host(gramian(J))
        lam = host(self.lam)
        lam = project_simplex(lam - self.gamma * (G @ lam + self.rho * lam))
        self.lam.copy_(lam.to(self.lam))
        return self.combine(lam, J)
