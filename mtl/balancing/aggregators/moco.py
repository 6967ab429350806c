"""MoCo: multi-objective gradient correction by tracking the task gradients."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtl.balancing.aggregators.base import GradientAggregator, gramian, host
from mtl.balancing.solvers import project_simplex

LAMBDA_UPDATES = ("projection", "softmax")


class MoCo(GradientAggregator):
    r"""MoCo of Fernando et al., "Mitigating Gradient Bias in Multi-objective Learning: A Provably
    Convergent Approach", ICLR 2023 (Algorithm 1).

    MGDA's weights computed from stochastic gradients are biased. MoCo tracks each task gradient
    with a moving average :math:`y_t` and moves the weights :math:`\lambda` by one projected
    gradient step on the MGDA objective of the tracked gradients, at call :math:`k = 1, 2, \dots`:

    .. math::
        y_t^{(k)} &= y_t^{(k-1)} - \beta_k \big(y_t^{(k-1)} - h_t^{(k)}\big), \qquad y^{(0)} = 0, \\
        \lambda^{(k)} &= \Pi_{\Delta_T}\Big(\lambda^{(k-1)} - \gamma_k
            \big(Y^{(k)} Y^{(k)\top} + \rho I\big)\lambda^{(k-1)}\Big), \qquad
            \lambda^{(0)} = \mathbf 1 / T, \\
        g &= Y^{(k)\top} \lambda^{(k)},

    with :math:`\beta_k = \beta / k^{\sigma_\beta}`, :math:`\gamma_k = \gamma / k^{\sigma_\gamma}`,
    :math:`Y` the ``[T, P]`` stack of the :math:`y_t` and :math:`\Pi_{\Delta_T}` the Euclidean
    projection onto the simplex. :math:`h_t` is the task gradient, rescaled as in the authors' code
    and LibMTL to :math:`h_t = L_t\, g_t / \|g_t\|` (``normalize=True``, which needs the losses) or
    the raw :math:`g_t` of the paper's algorithm (``normalize=False``).

    Defaults are LibMTL's: :math:`\beta = 0.5`, :math:`\sigma_\beta = 0.5`, :math:`\gamma = 0.1`,
    :math:`\sigma_\gamma = 0.5`, :math:`\rho = 0`. Deviation from LibMTL (and the authors' code),
    which replace the projection by :math:`\lambda \leftarrow \mathrm{softmax}(\lambda - \gamma_k
    (YY^\top + \rho I)\lambda)`: the paper's projection is the default here;
    ``lambda_update="softmax"`` reproduces theirs.

    ``Y`` is a ``[T, P]`` buffer allocated at the first call, so ``J`` must keep the same columns
    from step to step (``balancer.engine.space=params``). ``last_weights`` is None: the update is a
    combination of the tracked gradients, not of the rows of ``J``; :math:`\lambda` is the buffer
    ``lam``.

    Args:
        num_tasks: number of tasks ``T``.
        beta: step :math:`\beta` of the gradient tracking.
        beta_sigma: decay exponent :math:`\sigma_\beta`.
        gamma: step :math:`\gamma` of the weights.
        gamma_sigma: decay exponent :math:`\sigma_\gamma`.
        rho: ridge :math:`\rho \ge 0` of the weight subproblem.
        normalize: rescale each task gradient to norm :math:`L_t` before tracking.
        lambda_update: ``"projection"`` (paper) or ``"softmax"`` (LibMTL, authors' code).
        eps: guard on the gradient norms.
    """

    tracked: Tensor
    lam: Tensor

    def __init__(
        self,
        num_tasks: int,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
        normalize: bool = True,
        lambda_update: str = "projection",
        eps: float = 1e-8,
    ) -> None:
        super().__init__(num_tasks)
        if lambda_update not in LAMBDA_UPDATES:
            raise ValueError(f"lambda_update must be one of {LAMBDA_UPDATES}, got {lambda_update!r}.")
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}.")
        self.beta, self.beta_sigma = beta, beta_sigma
        self.gamma, self.gamma_sigma = gamma, gamma_sigma
        self.rho = rho
        self.normalize = normalize
        self.needs_losses = normalize
        self.lambda_update = lambda_update
        self.eps = eps
        self.register_buffer("tracked", torch.zeros(num_tasks, 0))
        self.register_buffer("lam", torch.full((num_tasks,), 1.0 / num_tasks))

    def aggregate(self, J: Tensor, losses: Tensor | None) -> tuple[Tensor, None]:
        h = J
        if self.normalize:
            assert losses is not None
            h = J * (losses / (J.norm(dim=1) + self.eps))[:, None]
        if self.tracked.numel() == 0:
            previous = torch.zeros_like(h)
        elif self.tracked.shape != J.shape:
            raise ValueError(
                f"MoCo tracks the task gradients in a buffer of shape {tuple(self.tracked.shape)} but "
                f"got {tuple(J.shape)}: use it with balancer.engine.space=params so the columns stay "
                f"fixed."
            )
        else:
            previous = self.tracked.to(J)
        k = float(self.step + 1)
        Y = previous - self.beta / k**self.beta_sigma * (previous - h)
        self.tracked = Y.to(self.tracked.dtype).clone()
        G = host(gramian(Y))
        lam = host(self.lam)
        T = G.shape[0]
        step = self.gamma / k**self.gamma_sigma * (G + self.rho * torch.eye(T, dtype=G.dtype)) @ lam
        if self.lambda_update == "projection":
            lam = project_simplex(lam - step)
        else:
            lam = torch.softmax(lam - step, dim=0)
        self.lam.copy_(lam.to(self.lam))
        return self.lam.to(J) @ Y, None

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # The buffer's width P is only known once a Jacobian has been seen: take it from the checkpoint.
        key = prefix + "tracked"
        if key in state_dict:
            self.tracked = torch.empty_like(state_dict[key], device=self.tracked.device)
        super()._load_from_state_dict(state_dict, prefix, *args)
