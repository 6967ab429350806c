"""ExcessMTL: task weights driven by estimated excess risks."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtl.balancing.aggregators.base import GradientAggregator


class ExcessMTL(GradientAggregator):
    r"""ExcessMTL of He et al., "Robust Multi-Task Learning with Excess Risks", ICML 2024.

    Distributionally robust weighting by *excess* risk (the distance of each task to its own
    optimum) rather than by loss, so that tasks with large irreducible noise do not take over. The
    excess risk of task ``t`` is estimated from a second-order expansion around its optimum,
    :math:`\mathcal E_t \approx g_t^\top H_t^{-1} g_t` (up to a factor 1/2 that the normalisation
    below cancels), with the Hessian replaced by the diagonal AdaGrad preconditioner of the task's
    own gradient history:

    .. math::
        A_t^{(k)} = A_t^{(k-1)} + g_t^{(k)} \odot g_t^{(k)}, \qquad
        \mathcal E_t^{(k)} = \sum_i \frac{\big(g_{t,i}^{(k)}\big)^2}{\sqrt{A_{t,i}^{(k)} + \epsilon}} .

    The estimates are divided by their values at the first call, :math:`r_t = \mathcal E_t^{(k)} /
    \mathcal E_t^{(0)}`, and the weights follow exponentiated-gradient ascent on the robust
    objective, renormalised to sum ``T`` as in LibMTL (so that equal weights are ones, as for the
    sum of the rows):

    .. math:: w_t \leftarrow T\,\frac{w_t\, e^{\eta r_t}}{\sum_s w_s\, e^{\eta r_s}}, \qquad w^{(0)} = \mathbf 1,
              \qquad g = \sum_t w_t g_t .

    As in LibMTL (modified from the authors' code), the first call only records
    :math:`\mathcal E^{(0)}` (the weights stay ones), later calls update the weights before using
    them, and :math:`\eta` defaults to ``1e-2``. The update is done in log space (same result, no
    overflow). Deviation: a task whose first estimate is zero (no gradient at the first call) takes
    its reference from its first non-zero estimate, and has :math:`r_t = 0` until then (LibMTL
    divides by zero).

    The preconditioner is a ``[T, P]`` buffer allocated at the first call, so ``J`` must keep the
    same columns from step to step (``balancer.engine.space=params``).

    Args:
        num_tasks: number of tasks ``T``.
        robust_step_size: :math:`\eta`.
        eps: :math:`\epsilon` inside the square root (LibMTL: ``1e-7``).
    """

    grad_sq_sum: Tensor
    initial_risk: Tensor
    task_weights: Tensor

    def __init__(self, num_tasks: int, robust_step_size: float = 1e-2, eps: float = 1e-7) -> None:
        super().__init__(num_tasks)
        self.robust_step_size = robust_step_size
        self.eps = eps
        self.register_buffer("grad_sq_sum", torch.zeros(num_tasks, 0))
        self.register_buffer("initial_risk", torch.zeros(num_tasks))
        self.register_buffer("task_weights", torch.ones(num_tasks))

    def aggregate(self, J: Tensor, losses: Tensor | None) -> tuple[Tensor, Tensor]:
        sq = J * J
        if self.grad_sq_sum.numel() == 0:
            acc = sq
        elif self.grad_sq_sum.shape != J.shape:
            raise ValueError(
                f"ExcessMTL accumulates squared gradients in a buffer of shape "
                f"{tuple(self.grad_sq_sum.shape)} but got {tuple(J.shape)}: use it with "
                f"balancer.engine.space=params so the columns stay fixed."
            )
        else:
            acc = self.grad_sq_sum.to(J) + sq
        self.grad_sq_sum = acc.to(self.grad_sq_sum.dtype).clone()
        risk = (sq / (acc + self.eps).sqrt()).sum(dim=1)
        initial = self.initial_risk.to(J)
        initial = torch.where((initial <= 0) & (risk > 0), risk, initial)
        if self.step > 0:
            ratio = torch.where(initial > 0, risk / initial.clamp_min(torch.finfo(J.dtype).tiny), 0.0)
            logits = self.task_weights.to(J).log() + self.robust_step_size * ratio
            self.task_weights.copy_((self.num_tasks * torch.softmax(logits, dim=0)).to(self.task_weights))
        self.initial_risk.copy_(initial.to(self.initial_risk))
        weights = self.task_weights.to(J)
        return weights @ J, weights

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # The buffer's width P is only known once a Jacobian has been seen: take it from the checkpoint.
        key = prefix + "grad_sq_sum"
        if key in state_dict:
            self.grad_sq_sum = torch.empty_like(state_dict[key], device=self.grad_sq_sum.device)
        super()._load_from_state_dict(state_dict, prefix, *args)
