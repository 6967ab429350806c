r"""The balanced backward: task losses in, aggregated gradients written into ``.grad``.

One plain function, :func:`balanced_backward`, does what a gradient aggregator's training step
needs after the forward pass; the training module calls it and so does
``scripts/bench_balancers.py``, so what is benchmarked is what trains.

With task losses :math:`L \in \mathbb{R}^T`, shared parameters :math:`\theta_s` (the backbone and
the shared parts of the sharing structure) and task-specific parameters :math:`\theta_t` (heads,
task gates):

1. ``J = engine.jacobian(L, inputs)``: ``[T, P]``, over :math:`\theta_s` (``space=params``) or over
   the shared representation ``r`` (``space=representation``).
2. Under DDP, ``J`` is made global (mean over ranks in the params space, column blocks gathered in
   the representation space, see :mod:`mtl.balancing.jacobian`); every rank aggregates the same
   ``J``.
3. ``g = aggregator(J, L)``, then :math:`\theta_s` gets ``g`` (params space) or
   :math:`\partial \langle g_r, r\rangle / \partial\theta_s` (representation space, ``g_r`` this
   rank's slice).
4. :math:`\theta_t` gets :math:`\partial \sum_t L_t / \partial \theta_t` (each head its own task's
   gradient), plus the gradient of ``task_term`` (a sharing structure's regularizer of its gates).
5. ``extra_term`` (fine-tuning regularizers, distillation) is outside the balancing: its gradient
   over every parameter is added as is.

Under fp16 mixed precision pass the GradScaler's ``loss_scale`` (a tensor, no host sync): the
losses are scaled before differentiating, the aggregator sees the unscaled float32 ``J``, the
gradients are written scaled (the scaler's step unscales them), and an overflow writes ``inf`` so
that the scaler skips the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from mtl.balancing.aggregators.base import GradientAggregator
from mtl.balancing.gramian import GramianEngine, gramian_by_chunks, gramian_factor, linear_layers_gramian
from mtl.balancing.jacobian import (
    _world,
    JacobianEngine,
    all_reduce_gradients,
    gather_representation_jacobian,
    reduce_jacobian,
    representation_backward,
    representation_jacobian,
    unscale,
    write_gradient,
)

__all__ = ["BackwardStats", "balanced_backward", "jacobian_statistics"]


@dataclass
class BackwardStats:
    """What a balanced backward reports, all on the losses' device (no host sync).

    Attributes:
        weights: ``[T]`` effective task weights (``g = w @ J``), or None for methods that do not
            combine the rows of ``J``.
        grad_norms: ``[T]`` norms of the task gradients (rows of the global ``J``).
        cosines: ``[T, T]`` pairwise cosines of the task gradients.
    """

    weights: Tensor | None
    grad_norms: Tensor
    cosines: Tensor


def jacobian_statistics(J: Tensor) -> tuple[Tensor, Tensor]:
    """``(norms [T], cosines [T, T])`` of the rows of ``J [T, P]``, in float32."""
    Jf = J.detach().float()
    norms = Jf.norm(dim=1)
    unit = Jf / norms.clamp_min(1e-12).unsqueeze(1)
    return norms, unit @ unit.T


def balanced_backward(
    losses: Tensor,
    aggregator: GradientAggregator,
    shared_params: Sequence[Tensor],
    task_params: Sequence[Tensor],
    engine: JacobianEngine | GramianEngine | None = None,
    representations: Sequence[Tensor] | None = None,
    loss_scale: Tensor | None = None,
    task_term: Tensor | None = None,
    extra_term: Tensor | None = None,
) -> BackwardStats:
    """Write the aggregated gradient of ``losses`` into ``.grad`` (see the module docstring).

    Args:
        losses: ``[T]`` task losses attached to the graph (a constant entry gives a zero row).
        aggregator: the :class:`~mtl.balancing.GradientAggregator`, built for ``T`` tasks.
        shared_params: the shared parameters that require grad (the rows of ``J`` in the params
            space; the parameters the representation's gradient reaches otherwise).
        task_params: the task-specific parameters that require grad (heads, task gates).
        engine: a :class:`~mtl.balancing.JacobianEngine` (space and Jacobian method; default: params
            space, ``auto``) or a :class:`~mtl.balancing.GramianEngine` (params space, never
            holding ``J``; for ``gramian_based`` aggregators, see :mod:`mtl.balancing.gramian`).
        representations: the shared representation of every forward pass (``[B, ...]`` each);
            required when ``engine.space == "representation"``.
        loss_scale: fp16 loss scale (0-dim tensor), or None.
        task_term: a scalar added to the task-specific parameters' objective only.
        extra_term: a scalar whose gradient over every parameter is added after the balancing.

    Returns:
        :class:`BackwardStats` of the global Jacobian.
    """
    engine = engine or JacobianEngine()
    shared_params, task_params = list(shared_params), list(task_params)
    if isinstance(engine, GramianEngine):
        return _gramian_backward(losses, aggregator, shared_params, task_params, engine, loss_scale, task_term, extra_term)
    representation = engine.space == "representation"
    if representation:
        reps = list(representations or [])
        if not reps or any(r is None for r in reps):
            raise ValueError(
                "balancer.engine.space=representation needs a shared representation, but the sharing "
                "structure gives none; use balancer.engine.space=params."
            )
        inputs = reps
    else:
        inputs = shared_params
    scaled = losses if loss_scale is None else losses * loss_scale
    fused = None
    if representation and engine.method == "auto":
        # J and the heads' gradients in one backward pass, where the heads' graphs are disjoint
        fused = representation_jacobian(losses, reps, task_params, seed=loss_scale)
    if fused is not None:
        J = fused
    else:
        J = engine.jacobian(scaled, inputs)
    finite = None
    if loss_scale is not None:
        J, finite = unscale(J, loss_scale, zero_nonfinite=True)
    if representation:
        J, mine = gather_representation_jacobian(J)
        g = aggregator(J, losses.detach())[mine]
    else:
        J = reduce_jacobian(J)
        g = aggregator(J, losses.detach())
    if loss_scale is not None:
        g = torch.where(finite, g * loss_scale, torch.full_like(g, float("inf")))
    # the graph is kept for the extra term, which may read the same outputs and representations
    keep = extra_term is not None and extra_term.requires_grad
    # heads (and task-specific sharing parts) get their own task's gradient: d(sum_t L_t)/d theta_t
    if fused is not None:
        if task_term is not None and task_term.requires_grad and task_params:
            term = task_term if loss_scale is None else task_term * loss_scale
            torch.autograd.backward(term, inputs=task_params, retain_graph=True)
        all_reduce_gradients(task_params, average=True)
    elif task_params:
        own = scaled.sum()
        if task_term is not None and task_term.requires_grad:
            own = own + (task_term if loss_scale is None else task_term * loss_scale)
        torch.autograd.backward(own, inputs=task_params, retain_graph=representation or keep)
        all_reduce_gradients(task_params, average=True)  # what DDP would do; its own hooks are off
    if representation:
        sizes = [r.numel() for r in reps]
        for rep, piece in zip(reps, torch.split(g, sizes)):
            representation_backward(rep, piece, retain_graph=keep or rep is not reps[-1])
        all_reduce_gradients(shared_params)
    else:
        write_gradient(shared_params, g)
    if keep:
        params = shared_params + task_params
        torch.autograd.backward(extra_term if loss_scale is None else extra_term * loss_scale, inputs=params)
        all_reduce_gradients(params, average=True)
    norms, cosines = jacobian_statistics(J)
    return BackwardStats(aggregator.last_weights, norms, cosines)


def _gramian_backward(
    losses: Tensor,
    aggregator: GradientAggregator,
    shared_params: list[Tensor],
    task_params: list[Tensor],
    engine: GramianEngine,
    loss_scale: Tensor | None,
    task_term: Tensor | None,
    extra_term: Tensor | None,
) -> BackwardStats:
    """:func:`balanced_backward` under the Gramian engine (see :mod:`mtl.balancing.gramian`)."""
    if not getattr(aggregator, "gramian_based", False):
        raise ValueError(
            f"{type(aggregator).__name__} does not update along a weighting of the task gradients that "
            f"depends on their Gramian only, so it cannot run under mtl.balancing.GramianEngine; use "
            f"balancer.engine._target_=mtl.balancing.JacobianEngine."
        )
    scaled = losses if loss_scale is None else losses * loss_scale
    shared_ids = {id(p) for p in shared_params}
    records = [r for r in engine.take_records() if id(r[0].weight) in shared_ids and r[0].weight.requires_grad]
    if _world()[1] > 1:
        records = []  # the per-layer statistics are local: under DDP every parameter goes by chunks
    G, covered = linear_layers_gramian(scaled, records)
    done = {id(p) for p in covered}
    G = G + gramian_by_chunks(scaled, [p for p in shared_params if id(p) not in done], engine.chunk_size, engine.method)
    finite = None
    if loss_scale is not None:
        finite = torch.isfinite(G).all()
        G = torch.where(finite, G / loss_scale.double() ** 2, torch.zeros((), dtype=G.dtype, device=G.device))
    aggregator(gramian_factor(G), losses.detach())
    weights = aggregator.last_weights.to(device=losses.device, dtype=losses.dtype)
    if finite is not None:
        weights = torch.where(finite, weights, torch.full_like(weights, float("inf")))  # poison: the scaler skips
    keep = extra_term is not None and extra_term.requires_grad
    if shared_params:
        torch.autograd.backward((weights * scaled).sum(), inputs=shared_params, retain_graph=True)
        all_reduce_gradients(shared_params, average=True)
    if task_params:
        own = scaled.sum()
        if task_term is not None and task_term.requires_grad:
            own = own + (task_term if loss_scale is None else task_term * loss_scale)
        torch.autograd.backward(own, inputs=task_params, retain_graph=keep)
        all_reduce_gradients(task_params, average=True)
    if keep:
        params = shared_params + task_params
        torch.autograd.backward(extra_term if loss_scale is None else extra_term * loss_scale, inputs=params)
        all_reduce_gradients(params, average=True)
    norms = G.diagonal().clamp_min(0).sqrt()
    cosines = G / (norms[:, None] * norms[None, :]).clamp_min(1e-24)
    return BackwardStats(aggregator.last_weights, norms.float(), cosines.float())
