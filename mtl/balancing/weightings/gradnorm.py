"""GradNorm: learn task weights that equalise the gradient norms' training rates."""

from __future__ import annotations

from typing import ClassVar, Sequence

import torch
from torch import Tensor, nn

from mtl.balancing.weightings.base import LossWeighting


class GradNorm(LossWeighting):
    r"""GradNorm, Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for
    Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018.

    Learned weights :math:`w_t` (initialised to 1). With :math:`W` the parameters of the last
    shared layer, :math:`G_t = \lVert \nabla_W\, w_t L_t \rVert = w_t \lVert \nabla_W L_t \rVert`,
    :math:`\bar G = \operatorname{mean}_t G_t`, :math:`\tilde L_t = L_t / L_t(0)` (:math:`L_t(0)`:
    the losses of the first training step) and :math:`r_t = \tilde L_t / \operatorname{mean}_k
    \tilde L_k`, the weights minimise

    .. math:: L_\text{grad} = \sum_t \big| G_t - [\bar G\, r_t^{\alpha}] \big| ,

    with the bracketed target treated as a constant, and are differentiated *only* through
    :math:`L_\text{grad}` (the paper: the task loss does not train the weights). So a task whose
    gradient norm is above its target loses weight. After each update the weights are renormalised
    to sum to :math:`T` (done at the start of the next ``forward``, after clamping at a small
    positive value so that no task's loss changes sign).

    How the pieces reach the optimizer (one ordinary backward does everything):

    - ``forward(losses, shared_parameters)`` returns the *detached* weights, so
      ``(w * L).sum()`` trains the model with the current weights. It also computes
      :math:`\lVert \nabla_W L_t \rVert` for each task with ``torch.autograd.grad`` (one extra
      partial backward per task, ``retain_graph=True``, no ``create_graph``: since
      :math:`G_t = w_t \lVert\nabla_W L_t\rVert` is linear in :math:`w_t`, the norms can be
      detached and :math:`\partial L_\text{grad}/\partial w_t` is still exact) and caches them.
    - ``regularization(losses)`` returns :math:`L_\text{grad}`, which depends only on the weight
      parameter (its value is added to the logged total loss). Backpropagating the total loss
      therefore writes the model's gradient into the model's ``.grad`` and
      :math:`\partial L_\text{grad}/\partial w` into ``self.weights.grad``.

    The caller must (1) pass ``shared_parameters`` (the last shared layer's parameters that
    require grad), (2) call ``forward`` then ``regularization`` with the same losses in each
    training step, (3) put ``self.parameters()`` in the optimizer (no weight decay; the paper uses
    the model's learning rate). Outside training mode or without grad, ``forward`` just returns
    the weights and ``regularization`` returns 0.

    Args:
        num_tasks: number of tasks ``T``.
        alpha: asymmetry :math:`\alpha` (paper: 1.5 on NYUv2; 0.12 on the synthetic example).
    """

    needs_shared_parameters: ClassVar[bool] = True
    _min_weight: ClassVar[float] = 1e-4

    def __init__(self, num_tasks: int, alpha: float = 1.5) -> None:
        super().__init__(num_tasks)
        self.alpha = float(alpha)
        self.weights = nn.Parameter(torch.ones(num_tasks))
        self.register_buffer("initial_losses", torch.ones(num_tasks))
        self.register_buffer("has_initial_losses", torch.zeros((), dtype=torch.bool))
        # (grad norms [T], target [T]) from the last forward, consumed by regularization().
        self._pending: tuple[Tensor, Tensor] | None = None

    def forward(  # type: ignore[override]
        self, losses: Tensor, shared_parameters: Sequence[Tensor] | None = None
    ) -> Tensor:
        """``[T]`` losses -> ``[T]`` renormalised weights (detached).

        Args:
            losses: ``[T]`` task losses, attached to the graph.
            shared_parameters: parameters of the last shared layer.
        """
        self._check_losses(losses)
        with torch.no_grad():
            self.weights.clamp_(min=self._min_weight)
            self.weights.mul_(self.num_tasks / self.weights.sum())
        weights = self.weights.detach()
        self._pending = None
        if not (self.training and torch.is_grad_enabled() and losses.requires_grad):
            return weights.to(device=losses.device, dtype=losses.dtype)
        if shared_parameters is None:
            raise ValueError(
                "GradNorm needs the last shared layer's parameters: call "
                "weighting(losses, shared_parameters=[...]) (needs_shared_parameters is True)."
            )
        params = [p for p in shared_parameters if p.requires_grad]
        if not params:
            raise ValueError("GradNorm: none of the shared_parameters requires grad.")

        l = losses.detach().to(weights)
        with torch.no_grad():
            first = ~self.has_initial_losses
            self.initial_losses.copy_(torch.where(first, l, self.initial_losses))
            self.has_initial_losses.fill_(True)

        norms = []
        for t in range(self.num_tasks):
            grads = torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True)
            sq = [g.detach().float().pow(2).sum() for g in grads if g is not None]
            norms.append(torch.stack(sq).sum().sqrt() if sq else weights.new_zeros(()))
        grad_norms = torch.stack(norms).to(weights)  # ||grad_W L_t||, [T]

        with torch.no_grad():
            inverse_rate = l / self.initial_losses.clamp_min(torch.finfo(l.dtype).tiny)
            relative_rate = inverse_rate / inverse_rate.mean()
            target = (weights * grad_norms).mean() * relative_rate.pow(self.alpha)
        self._pending = (grad_norms, target)
        return weights.to(device=losses.device, dtype=losses.dtype)

    def regularization(self, losses: Tensor) -> Tensor:
        """:math:`L_\\text{grad}` from the last ``forward`` (graph only to ``self.weights``)."""
        if self._pending is None:
            return losses.new_zeros(())
        grad_norms, target = self._pending
        self._pending = None
        gradnorm_loss = (self.weights * grad_norms - target).abs().sum()
        return gradnorm_loss.to(device=losses.device, dtype=losses.dtype)

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, alpha={self.alpha}"
