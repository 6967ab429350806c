"""The Jacobian engine: per-task gradients for gradient aggregators, and the way back to ``.grad``.

A :class:`~mtl.balancing.aggregators.base.GradientAggregator` needs the task Jacobian ``J`` (``[T, P]``,
row ``t`` = gradient of task loss ``L_t``). This module computes it, reduces it across DDP ranks, and
turns the aggregated direction ``g`` (``[P]``) back into parameter gradients. Two spaces:

``params``
    ``inputs`` are the shared parameters; ``P`` is their total size. After aggregation,
    :func:`write_gradient` puts ``g`` into their ``.grad``.
``representation``
    ``inputs`` is ``[representation]``, the tensor every task reads (``[B, ...]``); ``P`` is its
    number of elements. Each row costs a backward through one head only, which is far cheaper than
    through the backbone. After aggregation, :func:`representation_backward` pushes ``g`` through
    the backbone once (the chain rule), filling the shared parameters' ``.grad``.

The task heads are not part of ``J``: the caller gives them the gradient of the summed loss, e.g.
``torch.autograd.backward(losses.sum(), inputs=head_params)``.

A training step puts these together in :func:`mtl.balancing.backward.balanced_backward`, the one
function that both the training module and the benchmarks call.

Everything stays on the inputs' device: no host copies and no synchronisation, so the engine can
run asynchronously on an accelerator (the aggregators themselves may copy the small ``T x T``
Gramian to the host).

How rows are computed (``method``):

* ``loop``: ``T`` calls of :func:`torch.autograd.grad`, retaining the graph between calls.
* ``batched``: one call per chunk of ``chunk_size`` rows with ``is_grads_batched=True``: autograd
  runs the backward once under ``vmap`` over the rows of the identity (``grad_outputs = I[a:b]``).
  Fewer, larger kernels; memory grows with the chunk (every intermediate gradient gets a leading
  ``[chunk]`` dimension), so ``chunk_size`` bounds it. If the batched call raises (an op without a
  batching rule, a custom ``autograd.Function`` whose backward is not vmap-compatible), the engine
  warns once per process and computes the remaining rows with the loop.
* ``auto``: currently ``loop`` on every device, because that is what measured faster once the loop
  starts each row from the task's own loss (see below). ``scripts/bench_balancers.py`` and a probe
  of ``task_jacobian`` alone on its CNN (batch 32, 64-d representation, linear heads), median ms:

  ========================  =========  ============  ==========  ==============
  where                      rep loop   rep batched   param loop  param batched
  ========================  =========  ============  ==========  ==============
  CPU, 1 thread, T=10          0.22        0.63          17           35
  CPU, 1 thread, T=40          0.86        7.7           65          164
  H100, T=10                   1.9         4.3           10.9          8.3
  H100, T=40                   7.5        34             39           65
  ========================  =========  ============  ==========  ==============

  The batched backward runs every op under ``vmap`` (dispatcher overhead on the host per op) and,
  since the losses are stacked, pushes a ``[chunk]``-batched gradient through *every* head for
  every row (``O(T^2)`` head work); only a large backbone in the params space at small ``T`` gains
  from its fewer, larger kernels. Pass ``method="batched"`` explicitly where it measures faster.

**The training step in the representation space** (:func:`mtl.balancing.balanced_backward` with
``method="auto"``) goes further: :func:`representation_jacobian` computes ``J`` *and* the heads'
gradients of ``sum_t L_t`` in one backward pass, reading each row off the edge by which its head
enters the representation (a hook on that node), where the heads' graphs are disjoint (checked;
otherwise the loop runs). The rows are the loop's to the bit. It replaces ``T`` backward calls plus
the heads' own backward by one, which is most of the representation space's overhead over EW: a
probe on the benchmark's CNN (1 thread, CPU time, median ms for ``J`` and the heads' gradients):

  ======  ==================  ==============================
  T        loop + heads bwd    one pass (representation_jacobian)
  ======  ==================  ==============================
  10           1.44                 0.97
  40           4.23                 2.52
  100         10.6                  6.37
  ======  ==================  ==============================

(EW's whole backward at T = 100 is 9.1 ms; the rest of the one pass is the Python walk over the
heads' graphs and one hook call per head.)

When ``losses`` was built by ``torch.stack`` of per-task scalars (the usual case), the loop starts
each row's backward at loss ``t``'s own graph edge rather than at ``losses[t]``: differentiating
``losses[t]`` would go through the stack's backward, which hands a zero gradient to every other
task and so runs all ``T`` heads' backward for every row.

DDP: see :func:`reduce_jacobian` (params space) and :func:`gather_representation_jacobian`
(representation space). Mixed precision: see :func:`unscale`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge

__all__ = [
    "METHODS",
    "SPACES",
    "JacobianEngine",
    "all_reduce_gradients",
    "gather_representation_jacobian",
    "reduce_jacobian",
    "representation_backward",
    "representation_jacobian",
    "resolve_method",
    "task_jacobian",
    "unscale",
    "write_gradient",
]

#: Accepted values of ``method`` in :func:`task_jacobian`.
METHODS = ("auto", "loop", "batched")
#: Where the task gradients are taken: over the shared parameters or the shared representation.
SPACES = ("params", "representation")

_warned_batched_fallback = False


def resolve_method(method: str, device: torch.device | str) -> str:
    """The concrete method (``loop`` or ``batched``) that ``method`` means on ``device``.

    ``auto`` is ``loop`` on every device for now: measured faster on CPU and on an H100 in both
    spaces except the params space at small ``T`` on the GPU (table in the module docstring).
    ``device`` is taken so that the rule can depend on it again without changing callers.
    """
    if method not in METHODS:
        raise ValueError(f"Jacobian method must be one of {METHODS}, got '{method}'.")
    torch.device(device)  # validates the argument
    return "loop" if method == "auto" else method


@dataclass(frozen=True)
class JacobianEngine:
    """How a gradient aggregator's task Jacobian is computed: one object in the balancer config.

    Args:
        space: ``params`` (rows over the shared parameters) or ``representation`` (rows over the
            shared representation, the tensor every head reads; far cheaper, see the module
            docstring).
        method: ``auto``, ``loop`` or ``batched`` (see :func:`task_jacobian`).
        chunk_size: rows per batched call (None: all tasks at once).
    """

    space: str = "params"
    method: str = "auto"
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ValueError(f"balancer.engine.space must be one of {SPACES}, got '{self.space}'.")
        if self.method not in METHODS:
            raise ValueError(f"balancer.engine.method must be one of {METHODS}, got '{self.method}'.")
        if self.chunk_size is not None and int(self.chunk_size) < 1:
            raise ValueError(f"balancer.engine.chunk_size must be a positive int or null, got {self.chunk_size}.")

    def jacobian(self, losses: Tensor, inputs: Sequence[Tensor], retain_graph: bool = True) -> Tensor:
        """``[T, P]`` rows ``dL_t / d inputs`` (see :func:`task_jacobian`)."""
        return task_jacobian(losses, inputs, self.method, self.chunk_size, retain_graph=retain_graph)


def task_jacobian(
    losses: Tensor | Sequence[Tensor],
    inputs: Sequence[Tensor],
    method: str = "auto",
    chunk_size: int | None = None,
    retain_graph: bool = True,
) -> Tensor:
    """Per-task gradients of ``losses`` with respect to ``inputs``, as the rows of one matrix.

    Args:
        losses: ``[T]`` task losses (or a sequence of ``T`` scalar tensors), attached to the graph.
            A loss that does not require grad (a constant, e.g. a task without labels in the batch)
            gives a row of zeros.
        inputs: tensors to differentiate with respect to, shapes ``s_1, ..., s_k``: the shared
            parameters (``space=params``) or ``[representation]`` (``space=representation``).
            An input that a loss does not depend on, or that does not require grad, gives zeros
            in that row's columns.
        method: ``loop``, ``batched`` or ``auto`` (see the module docstring).
        chunk_size: rows per batched call (``batched`` only); None computes all ``T`` rows at once.
            Peak memory of the batched backward grows linearly with it.
        retain_graph: keep the graph after the last row, so that it can be backpropagated again
            (the representation-space step needs the backbone's part of it, the heads step the
            heads' part). False frees the buffers of the traversed part of the graph.

    Returns:
        ``J``: ``[T, P]`` with ``P = sum_i prod(s_i)``; row ``t`` is ``dL_t/d inputs`` with every
        input flattened (row-major) and concatenated in order. On the inputs' device, in their
        (promoted) dtype: the gradients' own dtype, e.g. bfloat16 for a bfloat16 representation
        (aggregators upcast to float32 themselves).
    """
    inputs = list(inputs)
    if not inputs:
        raise ValueError("task_jacobian needs at least one input tensor to differentiate against.")
    if isinstance(losses, Tensor):
        loss_list = None
        loss_vec = losses if losses.dim() == 1 else losses.reshape(-1)
    else:
        loss_list = [l.reshape(()) for l in losses]
        if not loss_list:
            raise ValueError("task_jacobian needs at least one loss.")
        loss_vec = None
    num_tasks = loss_vec.numel() if loss_vec is not None else len(loss_list)
    if num_tasks == 0:
        raise ValueError("task_jacobian needs at least one loss, got an empty tensor.")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}.")

    device = inputs[0].device
    dtype = inputs[0].dtype
    for x in inputs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    sizes = [x.numel() for x in inputs]
    J = torch.zeros(num_tasks, sum(sizes), device=device, dtype=dtype)

    # Only inputs that require grad can be differentiated against; the others stay zero.
    diff_idx = [i for i, x in enumerate(inputs) if x.requires_grad]
    if not diff_idx:
        return J
    diff_inputs = [inputs[i] for i in diff_idx]
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    columns = [(offsets[i], offsets[i + 1]) for i in diff_idx]

    def loss_at(t: int) -> Tensor | GradientEdge | None:
        if loss_list is not None:
            return loss_list[t]
        if stack_edges is not None:
            node, nr = stack_edges[t]
            if node is None:
                return None  # a constant was stacked: zero row
            if type(node).__name__ != "AccumulateGrad":
                return GradientEdge(node, nr)
        return loss_vec[t]

    stack_edges = _stack_edges(loss_vec) if loss_vec is not None else None

    rows_done = 0
    if resolve_method(method, device) == "batched":
        if loss_vec is None:
            loss_vec = torch.stack(loss_list)
        rows_done = _batched_rows(
            loss_vec, diff_inputs, columns, J, chunk_size or num_tasks, retain_graph
        )
    if rows_done < num_tasks:
        edge_seed = None
        if stack_edges is not None:
            edge_seed = torch.ones((), device=loss_vec.device, dtype=loss_vec.dtype)
        _loop_rows(loss_at, diff_inputs, columns, J, rows_done, num_tasks, retain_graph, edge_seed)
    return J


def _stack_edges(loss_vec: Tensor) -> list[tuple] | None:
    """The graph edges of the scalars that ``torch.stack`` assembled into ``loss_vec``, if it was.

    Differentiating ``loss_vec[t]`` goes through the stack's backward, which hands a (zero) gradient
    to *every* task's loss and so runs all ``T`` heads' backward for each row: ``O(T^2)`` work in
    the loop. Starting from the edge of loss ``t`` itself runs only its own head.
    """
    node = loss_vec.grad_fn
    if (
        loss_vec.dim() != 1
        or type(node).__name__ != "StackBackward0"
        or getattr(node, "_saved_dim", None) != 0
        or len(node.next_functions) != loss_vec.numel()
    ):
        return None
    return list(node.next_functions)


def _loop_rows(loss_at, diff_inputs, columns, J, start, stop, retain_graph, edge_seed) -> None:
    """Fill rows ``start:stop`` of ``J`` with one ``autograd.grad`` call per row (``edge_seed``: the
    scalar ``1`` that starts the backward from a stacked loss's own edge)."""
    for t in range(start, stop):
        loss = loss_at(t)
        keep = retain_graph or t < stop - 1
        if isinstance(loss, GradientEdge):
            grads = torch.autograd.grad(
                loss, diff_inputs, grad_outputs=edge_seed, retain_graph=keep, allow_unused=True
            )
        elif loss is None or not loss.requires_grad:
            continue
        else:
            grads = torch.autograd.grad(loss, diff_inputs, retain_graph=keep, allow_unused=True)
        for (a, b), g in zip(columns, grads):
            if g is not None:
                J[t, a:b].copy_(g.reshape(-1))


def _batched_rows(loss_vec, diff_inputs, columns, J, chunk, retain_graph) -> int:
    """Fill ``J`` chunk by chunk with batched ``autograd.grad`` calls; returns the rows done.

    Stops at the first chunk whose call raises (the caller finishes with the loop), after a
    one-time warning. The first chunk always retains the graph, so that a failure there leaves
    the graph intact for the loop.
    """
    global _warned_batched_fallback
    T = loss_vec.numel()
    if not loss_vec.requires_grad:
        return T  # every row is zero
    eye = torch.eye(T, device=loss_vec.device, dtype=loss_vec.dtype)
    for a in range(0, T, chunk):
        b = min(a + chunk, T)
        keep = retain_graph or a == 0 or b < T
        try:
            grads = torch.autograd.grad(
                loss_vec,
                diff_inputs,
                grad_outputs=eye[a:b],
                retain_graph=keep,
                allow_unused=True,
                is_grads_batched=True,
            )
        except (RuntimeError, NotImplementedError) as err:
            if not _warned_batched_fallback:
                _warned_batched_fallback = True
                warnings.warn(
                    "task_jacobian(method='batched'): the batched backward failed "
                    f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                    "falling back to one backward per task. Use method='loop' to silence this.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return a
        for (c0, c1), g in zip(columns, grads):
            if g is not None:
                J[a:b, c0:c1].copy_(g.reshape(b - a, -1))
    return T


def representation_jacobian(
    losses: Tensor,
    representations: Sequence[Tensor],
    task_params: Sequence[Tensor],
    seed: Tensor | None = None,
) -> Tensor | None:
    """The representation-space Jacobian and the task parameters' gradients in one backward pass.

    Where every task's loss reaches the representation through a part of the graph of its own (its
    head), the gradient that task ``t``'s head sends into the representation *is* row ``t`` of
    ``J``. So instead of ``T`` backward calls (one per row) and then one more for the heads'
    gradient of ``sum_t L_t``, one backward of ``sum_t L_t`` (stopped at the representation) does
    both: a hook on each head's last node (the node with an edge into the representation) copies
    what flows along that edge into its task's row. The rows are the loop's to the bit: each head's
    backward is the same computation, started from the same seed.

    The structure is checked, not assumed: ``losses`` must be a ``torch.stack`` of per-task scalars
    and no graph node between a loss and the representation may be reached from two losses
    (parameter leaves may be shared). Otherwise (a head that reads another task's output, a loss
    that reaches the backbone around the representation, ...) this returns None and the caller
    uses :func:`task_jacobian` (nothing has been computed then).

    Args:
        losses: ``[T]`` unscaled task losses (their graph is read, not differentiated).
        representations: the shared representations (``[B, ...]`` each), attached to the graph.
        task_params: the task-specific parameters; the gradient of ``seed * sum_t L_t`` is
            accumulated into their ``.grad`` (by the backward pass itself, so gradient hooks run).
        seed: the gradient each loss starts from (0-dim; the fp16 loss scale), default 1.

    Returns:
        ``J [T, P]``, as :func:`task_jacobian` gives it for the losses times ``seed``; or None (see
        above). The graph is retained.
    """
    edges = _stack_edges(losses) if isinstance(losses, Tensor) else None
    if edges is None:
        return None
    reps = list(representations)
    sizes = [r.numel() for r in reps]
    dtype = reps[0].dtype
    for r in reps[1:]:
        dtype = torch.promote_types(dtype, r.dtype)
    T = len(edges)
    rep_of: dict = {}
    for i, r in enumerate(reps):
        if (r.is_leaf or r.retains_grad) and r.grad is not None:
            return None  # the backward below would accumulate into it (and it is reset after)
        if r.requires_grad:
            e = get_gradient_edge(r)
            if (e.node, e.output_nr) in rep_of:
                return None
            rep_of[(e.node, e.output_nr)] = i
    # Walk each task's graph from its loss to the representations, recording the boundary edges.
    leaf = torch._C._functions.AccumulateGrad
    owner: dict = {}
    by_node: dict = {}  # boundary node -> [(edge index, representation index, task)]
    for t, (node, _) in enumerate(edges):
        if node is None:
            continue  # a constant was stacked: zero row
        if type(node) is leaf:
            return None
        todo = [node]
        while todo:
            n = todo.pop()
            o = owner.get(n)
            if o is not None:
                if o != t:
                    return None  # a node shared by two tasks: the rows cannot be told apart
                continue
            owner[n] = t
            for i, (nxt, nxt_nr) in enumerate(n.next_functions):
                if nxt is None:
                    continue
                r = rep_of.get((nxt, nxt_nr))
                if r is not None:
                    by_node.setdefault(n, []).append((i, r, t))
                elif type(nxt) is not leaf:  # a leaf (parameter) may be shared
                    todo.append(nxt)
    device = reps[0].device
    wanted = [p for p in task_params if p.requires_grad]
    diff_reps = [r for r in reps if r.requires_grad]
    captured: list[tuple] = []  # (task, representation index, gradient)

    def capture(targets):
        def hook(grad_inputs, grad_outputs):
            for i, r, t in targets:
                if grad_inputs[i] is not None:
                    captured.append((t, r, grad_inputs[i]))

        return hook

    if owner and (wanted or diff_reps):
        handles = [n.register_hook(capture(targets)) for n, targets in by_node.items()]
        try:
            grad = torch.ones(T, device=losses.device, dtype=losses.dtype)
            if seed is not None:
                grad = grad * seed.reshape(()).to(device=losses.device, dtype=losses.dtype)
            # From the stacked losses, as the heads' backward of sum_t L_t would start. The
            # representations are inputs so that the edges into them are computed (and the
            # backward stops there); the sum of the rows they accumulate is dropped.
            torch.autograd.backward(losses, grad_tensors=grad, inputs=wanted + diff_reps, retain_graph=True)
        finally:
            for h in handles:
                h.remove()
            for r in diff_reps:
                r.grad = None
    tasks = [t for t, _, _ in captured]
    if len(reps) == 1 and len(set(tasks)) == len(tasks):
        # one edge per task (the common case): one stack, rows equal to the captured gradients
        rows = [None] * T
        for t, _, g in captured:
            rows[t] = g.reshape(-1)
        zero = torch.zeros(sizes[0], device=device, dtype=dtype)
        return torch.stack([zero if g is None else g for g in rows]).to(dtype)
    J = torch.zeros(T, sum(sizes), device=device, dtype=dtype)
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    for t, r, g in captured:
        J[t, offsets[r] : offsets[r + 1]].add_(g.reshape(-1))
    return J


def representation_backward(representation: Tensor, grad: Tensor, retain_graph: bool = False) -> None:
    """Backpropagate a gradient for the shared representation into the parameters that made it.

    Accumulates ``d(<grad, representation>)/d theta`` into ``theta.grad`` for every leaf ``theta``
    upstream of ``representation`` (the chain rule with the aggregated direction).

    Args:
        representation: the shared representation ``[B, ...]`` (``P`` elements), still attached
            to the graph.
        grad: ``[P]`` flat gradient (e.g. an aggregator's output, or this rank's slice of it under
            DDP); cast to the representation's dtype.
        retain_graph: keep the backbone's graph afterwards.
    """
    if grad.numel() != representation.numel():
        raise ValueError(
            f"representation_backward: grad has {grad.numel()} elements but the representation "
            f"{tuple(representation.shape)} has {representation.numel()}."
        )
    torch.autograd.backward(
        representation,
        grad.reshape(representation.shape).to(representation.dtype),
        retain_graph=retain_graph,
    )


def write_gradient(params: Sequence[Tensor], g: Tensor, accumulate: bool = True) -> None:
    """Split a flat gradient into the ``.grad`` of each parameter.

    The layout is the one :func:`task_jacobian` uses for the same ``params`` (in order, flattened,
    concatenated). Parameters that do not require grad are skipped (their slice is ignored), so a
    frozen parameter never gets a ``.grad`` that weight decay would act on.

    Args:
        params: parameters with shapes ``s_1, ..., s_k``.
        g: ``[P]`` with ``P = sum_i prod(s_i)``, on the parameters' device.
        accumulate: add to an existing ``.grad`` (True) or overwrite it (False). A missing ``.grad``
            is created either way (as a copy, never a view of ``g``).
    """
    params = list(params)
    total = sum(p.numel() for p in params)
    if g.dim() != 1 or g.numel() != total:
        raise ValueError(
            f"write_gradient: expected a flat gradient of {total} elements for {len(params)} "
            f"parameters, got shape {tuple(g.shape)}."
        )
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            if p.requires_grad:
                piece = g[offset : offset + n].view(p.shape)
                if p.grad is None:
                    p.grad = piece.to(device=p.device, dtype=p.dtype, copy=True)
                elif accumulate:
                    p.grad.add_(piece.to(device=p.grad.device, dtype=p.grad.dtype))
                else:
                    p.grad.copy_(piece)
            offset += n


# --------------------------------------------------------------------------------- distributed
def _world() -> tuple[int, int]:
    """``(rank, world_size)``, ``(0, 1)`` when not running distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def reduce_jacobian(J: Tensor) -> Tensor:
    """Params space under DDP: the Jacobian of the global losses, identical on every rank.

    Each rank's ``J`` holds the gradients of its *local* mean losses; the global loss of DDP is the
    mean over ranks of the local means (which is the mean over the concatenated global batch when
    every rank has the same local batch size), so the global Jacobian is the mean of the local
    ones: ``all_reduce(SUM) / world_size``. Every rank then aggregates the same ``J`` and writes the
    same ``g`` with :func:`write_gradient`: no further gradient reduction is needed (do not let DDP
    average the shared gradients again).

    Args:
        J: ``[T, P]`` local Jacobian (reduced in place).

    Returns:
        ``[T, P]`` global Jacobian (the same tensor). No-op when not distributed.
    """
    _, world = _world()
    if world > 1:
        dist.all_reduce(J, op=dist.ReduceOp.SUM)
        J.div_(world)
    return J


def gather_representation_jacobian(
    J_local: Tensor, local_sizes: Sequence[int] | None = None
) -> tuple[Tensor, slice]:
    """Representation space under DDP: the global Jacobian and this rank's columns of it.

    Each rank's representation holds its own examples, so the global Jacobian is the
    concatenation of the ranks' column blocks (rank order), not their sum. With local *mean*
    losses, the gradient of the global loss (the mean over ranks of the local means, as in
    :func:`reduce_jacobian`) with respect to rank ``r``'s representation is ``1 / world_size``
    times the local gradient, so the blocks are scaled by ``1 / world_size``. When every rank has
    the same local batch size this is exactly the Jacobian of the mean losses over the
    concatenated global batch.

    The caller aggregates the global ``J`` (identical on every rank: use seeded aggregators), calls
    :func:`representation_backward` with ``g[slice]`` only, and then **sums** the shared
    parameters' gradients across ranks (:func:`all_reduce_gradients`). If DDP's own hooks reduce
    them instead, note that DDP *averages*: pass ``g[slice] * world_size`` in that case.

    Args:
        J_local: ``[T, P_r]`` Jacobian with respect to this rank's representation.
        local_sizes: ``P_r`` of every rank, if known. When None they are all-gathered first (one
            small collective whose result is read on the host: a synchronisation point). Ranks may
            have different sizes (a smaller last batch).

    Returns:
        ``(J_global [T, sum_r P_r], slice)`` where ``J_global[:, slice]`` are this rank's columns.
        Not distributed: ``(J_local, slice(0, P_r))`` unchanged.
    """
    rank, world = _world()
    if world == 1:
        return J_local, slice(0, J_local.shape[1])
    T, P = J_local.shape
    if local_sizes is None:
        size = torch.tensor([P], device=J_local.device, dtype=torch.int64)
        all_sizes = [torch.empty_like(size) for _ in range(world)]
        dist.all_gather(all_sizes, size)
        sizes = [int(s) for s in torch.cat(all_sizes).tolist()]
    else:
        sizes = [int(s) for s in local_sizes]
        if len(sizes) != world or sizes[rank] != P:
            raise ValueError(
                f"local_sizes={sizes} must list world_size={world} sizes with this rank's ({rank}) "
                f"equal to J_local.shape[1]={P}."
            )
    width = max(sizes)
    block = J_local.detach()
    if P < width:  # all_gather needs equal shapes: pad, then trim
        block = torch.cat([block, block.new_zeros(T, width - P)], dim=1)
    block = block.contiguous()
    blocks = [torch.empty_like(block) for _ in range(world)]
    dist.all_gather(blocks, block)
    J_global = torch.cat([b[:, :n] for b, n in zip(blocks, sizes)], dim=1).div_(world)
    start = sum(sizes[:rank])
    return J_global, slice(start, start + P)


def all_reduce_gradients(params: Sequence[Tensor], average: bool = False) -> None:
    """Sum (or with ``average``, average) the ``.grad`` of ``params`` across ranks in place
    (no-op when not distributed). Averaging is what DDP does to the gradients of local mean losses,
    e.g. the heads' gradients when the module bypasses DDP's own reduction.

    For the representation space under DDP without DDP's own gradient hooks (see
    :func:`gather_representation_jacobian`). Parameters without ``.grad`` are skipped, so every
    rank must hold ``.grad`` for the same parameters.
    """
    _, world = _world()
    if world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    if average:
        flat.div_(world)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


# ----------------------------------------------------------------------------- mixed precision
def unscale(J: Tensor, scale: Tensor | float, zero_nonfinite: bool = False) -> tuple[Tensor, Tensor]:
    """Undo a loss scale (fp16 AMP) on a Jacobian, in float32, and flag overflow without syncing.

    With a ``torch.amp.GradScaler`` the losses are multiplied by the scale before differentiating,
    so ``J`` is scaled too and may hold inf/nan after an overflow. Aggregate only the unscaled
    float32 ``J``; the flag stays on the device (no ``.item()``), so the step can be skipped later
    by the scaler. A recipe that lets the scaler skip the step and lower its scale::

        scale = scaler._get_scale_async()            # tensor; scaler.get_scale() would sync
        J, finite = unscale(task_jacobian(losses * scale, params), scale, zero_nonfinite=True)
        g = aggregator(J, losses.detach())
        g = torch.where(finite, g, torch.full_like(g, float("inf")))   # poison an overflow step
        write_gradient(params, g * scale, accumulate=False)            # scaler.step unscales
        scaler.step(optimizer); scaler.update()

    (bfloat16 autocast needs no scaler: aggregate ``J`` directly.)

    Args:
        J: ``[T, P]`` Jacobian of the scaled losses, any floating dtype.
        scale: the loss scale, a float or a 0-dim/1-element tensor (on any device).
        zero_nonfinite: replace the whole ``J`` by zeros when it is not finite, so that
            aggregators solving on the host never see inf/nan (no synchronisation either).

    Returns:
        ``(J / scale`` as float32 ``[T, P]``, ``finite``: 0-dim bool tensor on ``J``'s device,
        True iff every entry of the scaled ``J`` was finite``)``.
    """
    J32 = J.to(torch.float32)
    finite = torch.isfinite(J32).all()
    if isinstance(scale, Tensor):
        inv = scale.detach().to(device=J.device, dtype=torch.float32).reshape(()).reciprocal()
    else:
        inv = 1.0 / float(scale)
    J32 = J32 * inv
    if zero_nonfinite:
        J32 = torch.where(finite, J32, torch.zeros((), device=J32.device, dtype=J32.dtype))
    return J32, finite
