"""DB-MTL: dual-balancing multi-task learning (gradient part)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtl.balancing.aggregators.base import GradientAggregator


class DBMTL(GradientAggregator):
    r"""Dual balancing of Lin et al., "Dual-Balancing for Multi-Task Learning", arXiv 2308.12029,
    2023.

    Loss-scale balancing: use the gradients of :math:`\log L_t`, i.e. :math:`J_t / L_t`.
    Gradient-magnitude balancing: keep their moving average, from a zero buffer, at call
    :math:`k = 0, 1, \dots`

    .. math::
        \hat g_t^{(k)} = \nabla \log L_t^{(k)} + \beta_k
        \big(\hat g_t^{(k-1)} - \nabla \log L_t^{(k)}\big), \qquad
        \beta_k = \frac{\beta}{(k+1)^{\sigma}}, \qquad \hat g_t^{(-1)} = 0,

    and rescale each to the largest norm:
    :math:`g = \sum_t \frac{\max_s \|\hat g_s\|}{\|\hat g_t\|} \hat g_t`.
    This is the authors' code (LibMTL's ``DB_MTL``, whose 1-based step counter gives
    :math:`\beta/(k+1)^\sigma`), including its defaults :math:`\beta = 0.9`, :math:`\sigma = 0`
    (a constant coefficient). The first update is therefore :math:`(1-\beta)` times the rescaled
    log-gradients (no bias correction).

    Needs the task losses. The average is a ``[T, P]`` buffer (allocated at the first call), so ``J``
    must keep the same columns from step to step: use it over the shared parameters
    (``balancer.engine.space=params``), not over a per-batch representation. ``last_weights`` is
    None: the update mixes past Jacobians.

    Args:
        num_tasks: number of tasks ``T``.
        beta: coefficient :math:`\beta` of the moving average (LibMTL default 0.9).
        beta_sigma: decay exponent :math:`\sigma` of the coefficient (LibMTL default 0).
        eps: guard on the losses and the norms.
    """

    needs_losses = True
    grad_ema: Tensor

    def __init__(
        self, num_tasks: int, beta: float = 0.9, beta_sigma: float = 0.0, eps: float = 1e-8
    ) -> None:
        super().__init__(num_tasks)
        self.beta = beta
        self.beta_sigma = beta_sigma
        self.eps = eps
        self.register_buffer("grad_ema", torch.zeros(num_tasks, 0))

    def aggregate(self, J: Tensor, losses: Tensor | None) -> tuple[Tensor, None]:
        assert losses is not None
        log_grads = J / (losses[:, None] + self.eps)
        if self.grad_ema.numel() == 0:
            previous = torch.zeros_like(log_grads)
        elif self.grad_ema.shape != J.shape:
            raise ValueError(
                f"DBMTL keeps a moving average of the Jacobian of shape {tuple(self.grad_ema.shape)} "
                f"but got {tuple(J.shape)}: use it with balancer.engine.space=params so the columns "
                f"stay fixed."
            )
        else:
            previous = self.grad_ema.to(J)
        coef = self.beta / float(self.step + 1) ** self.beta_sigma
        ema = log_grads + coef * (previous - log_grads)
        self.grad_ema = ema.to(self.grad_ema.dtype).clone()
        norms = ema.norm(dim=1)
        scale = norms.max() / (norms + self.eps)
        return scale @ ema, None

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # The EMA's width P is only known once a Jacobian has been seen: take it from the checkpoint.
        key = prefix + "grad_ema"
        if key in state_dict:
            self.grad_ema = torch.empty_like(state_dict[key], device=self.grad_ema.device)
        super()._load_from_state_dict(state_dict, prefix, *args)
