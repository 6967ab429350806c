"""The Jacobian engine: per-task gradients in both spaces, the way back to ``.grad``, DDP, AMP."""

from __future__ import annotations

import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import mtl.balancing.jacobian as jac
from mtl.balancing.jacobian import (
    all_reduce_gradients,
    gather_representation_jacobian,
    reduce_jacobian,
    representation_backward,
    resolve_method,
    task_jacobian,
    unscale,
    write_gradient,
)

T = 3
CHUNKS = [1, 2, None]


class TinyMTL(nn.Module):
    """MLP backbone (the shared representation is its output) and one linear head per task."""

    def __init__(self, num_tasks: int = T, d_in: int = 5, width: int = 4) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(d_in, 6), nn.Tanh(), nn.Linear(6, width), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(width, 2) for _ in range(num_tasks))

    def forward(self, x):
        rep = self.backbone(x)
        return [h(rep) for h in self.heads], rep

    def shared(self):
        return list(self.backbone.parameters())

    def losses(self, x, y):
        """``([T] mean-squared errors, representation)`` of a batch."""
        outs, rep = self(x)
        return torch.stack([F.mse_loss(o, y[:, t]) for t, o in enumerate(outs)]), rep


def make_problem(seed: int = 0, batch: int = 8, dtype=torch.float64):
    torch.manual_seed(seed)
    model = TinyMTL().to(dtype)
    x = torch.randn(batch, 5, dtype=dtype)
    y = torch.randn(batch, T, 2, dtype=dtype)
    return model, x, y


def flat_grads(params):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def manual_jacobian(losses, inputs):
    """Reference: one ``backward`` per task, reading ``.grad`` (``retain_grad`` for non-leaves)."""
    rows = []
    for t in range(losses.numel()):
        for x in inputs:
            x.grad = None
        losses[t].backward(retain_graph=True)
        rows.append(flat_grads(inputs))
    for x in inputs:
        x.grad = None
    return torch.stack(rows)


# ------------------------------------------------------------------------------ task_jacobian
@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_params_space_loop_batched_and_manual_agree(chunk_size):
    model, x, y = make_problem()
    losses, _ = model.losses(x, y)
    params = model.shared()
    expected = manual_jacobian(losses, params)
    J_loop = task_jacobian(losses, params, method="loop")
    J_batched = task_jacobian(losses, params, method="batched", chunk_size=chunk_size)
    P = sum(p.numel() for p in params)
    assert J_loop.shape == (T, P) and J_loop.dtype == torch.float64
    torch.testing.assert_close(J_loop, expected)
    torch.testing.assert_close(J_batched, expected)
    assert all(p.grad is None for p in params), "task_jacobian must not touch .grad"


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_representation_space_loop_batched_and_manual_agree(chunk_size):
    model, x, y = make_problem()
    losses, rep = model.losses(x, y)
    rep.retain_grad()
    expected = manual_jacobian(losses, [rep])
    J_loop = task_jacobian(losses, [rep], method="loop")
    J_batched = task_jacobian(losses, [rep], method="batched", chunk_size=chunk_size)
    assert J_loop.shape == (T, rep.numel())
    torch.testing.assert_close(J_loop, expected)
    torch.testing.assert_close(J_batched, expected)
    # Each row only involves its own head: row t is d L_t / d rep, with the head's weights.
    head = model.heads[1]
    out = head(rep)
    by_hand = (2 * (out - y[:, 1]) / out.numel()) @ head.weight
    torch.testing.assert_close(J_loop[1], by_hand.reshape(-1))


@pytest.mark.parametrize("method", ["loop", "batched", "auto"])
def test_sequence_of_scalar_losses(method):
    model, x, y = make_problem()
    losses, _ = model.losses(x, y)
    expected = task_jacobian(losses, model.shared(), method="loop")
    J = task_jacobian([losses[t] * 1.0 for t in range(T)], model.shared(), method=method)
    torch.testing.assert_close(J, expected)


@pytest.mark.parametrize("method", ["loop", "batched"])
def test_unused_inputs_and_constant_losses_give_zeros(method):
    torch.manual_seed(0)
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(2, 2, requires_grad=True)  # used by no loss
    c = torch.randn(4, requires_grad=True)  # used by the second loss only
    frozen = torch.randn(2)  # does not require grad
    losses = torch.stack([(a**2).sum() + frozen.sum(), (a * c[:3]).sum() + c[3], torch.tensor(5.0)])
    J = task_jacobian(losses, [a, b, c, frozen], method=method)
    assert J.shape == (3, 3 + 4 + 4 + 2)
    expected = torch.zeros(3, 13)
    expected[0, :3] = 2 * a.detach()
    expected[1, :3] = c.detach()[:3]
    expected[1, 7:10] = a.detach()
    expected[1, 10] = 1.0
    torch.testing.assert_close(J, expected)
    # A sequence whose losses do not require grad at all, and inputs that all are frozen.
    assert task_jacobian([torch.tensor(1.0), torch.tensor(2.0)], [a], method=method).abs().sum() == 0
    assert task_jacobian(losses, [frozen], method=method).shape == (3, 2)


@pytest.mark.parametrize("method", ["loop", "batched"])
def test_losses_not_built_by_stack(method):
    """A loss vector from one vectorised op, and a stack holding a leaf, take the generic path."""
    torch.manual_seed(0)
    a = torch.randn(3, requires_grad=True)
    A = torch.randn(4, 3)
    J = task_jacobian((A @ a) ** 2, [a], method=method)
    torch.testing.assert_close(J, 2 * (A @ a.detach())[:, None] * A)
    s = torch.tensor(2.0, requires_grad=True)
    J = task_jacobian(torch.stack([s * 3, s]), [s, a], method=method)
    torch.testing.assert_close(J, torch.tensor([[3.0, 0, 0, 0], [1.0, 0, 0, 0]]))


def test_stacked_losses_loop_runs_only_each_tasks_own_branch():
    """Row t of a ``torch.stack`` of losses must not run the other tasks' backward (O(T^2))."""
    calls = []

    class Count(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, t):
            ctx.t = t
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            calls.append(ctx.t)
            return grad, None

    a = torch.randn(3, requires_grad=True)
    losses = torch.stack([Count.apply(a, t).pow(2).sum() for t in range(4)])
    task_jacobian(losses, [a], method="loop")
    assert calls == [0, 1, 2, 3]


def test_retain_graph_false_frees_the_graph():
    model, x, y = make_problem()
    losses, _ = model.losses(x, y)
    task_jacobian(losses, model.shared(), method="loop", retain_graph=False)
    with pytest.raises(RuntimeError):
        losses.sum().backward()
    losses, _ = model.losses(x, y)
    task_jacobian(losses, model.shared(), method="loop", retain_graph=True)
    losses.sum().backward()  # still possible


def test_arguments_are_checked():
    a = torch.randn(2, requires_grad=True)
    with pytest.raises(ValueError, match="method"):
        task_jacobian(a, [a], method="vmap")
    with pytest.raises(ValueError, match="chunk_size"):
        task_jacobian(a, [a], chunk_size=0)
    with pytest.raises(ValueError, match="input"):
        task_jacobian(a, [])
    with pytest.raises(ValueError, match="loss"):
        task_jacobian([], [a])
    assert resolve_method("auto", "cpu") == "loop"
    assert resolve_method("auto", "cuda") == "loop"  # measured faster there too (module docstring)
    assert resolve_method("batched", "cpu") == "batched"


class _NotVmappable(torch.autograd.Function):
    """Identity whose backward reads a Python number, which ``vmap`` cannot batch."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float(grad.detach().abs().sum().item() >= 0)


@pytest.mark.parametrize("chunk_size", [1, None])
def test_batched_falls_back_to_loop_with_one_warning(monkeypatch, chunk_size):
    monkeypatch.setattr(jac, "_warned_batched_fallback", False)
    model, x, y = make_problem()
    outs, rep = model(x)
    rep = _NotVmappable.apply(rep)
    losses = torch.stack([F.mse_loss(h(rep), y[:, t]) for t, h in enumerate(model.heads)])
    expected = task_jacobian(losses, model.shared(), method="loop")
    with pytest.warns(RuntimeWarning, match="falling back"):
        J = task_jacobian(losses, model.shared(), method="batched", chunk_size=chunk_size)
    torch.testing.assert_close(J, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second failure is silent
        J2 = task_jacobian(losses, model.shared(), method="batched", chunk_size=chunk_size)
    torch.testing.assert_close(J2, expected)


# ---------------------------------------------------------------------- the way back to .grad
def test_write_gradient_round_trip():
    model, x, y = make_problem()
    params = model.shared()
    losses, _ = model.losses(x, y)
    J = task_jacobian(losses, params)
    g = J.sum(0)
    write_gradient(params, g)  # .grad is None: created
    torch.testing.assert_close(flat_grads(params), g)
    assert params[0].grad.data_ptr() != g.data_ptr()
    losses.sum().backward()  # equal weighting through autograd gives the same
    torch.testing.assert_close(flat_grads(params), 2 * g)
    write_gradient(params, g)  # accumulate
    torch.testing.assert_close(flat_grads(params), 3 * g)
    grad0 = params[0].grad
    write_gradient(params, -g, accumulate=False)  # overwrite, in place
    torch.testing.assert_close(flat_grads(params), -g)
    assert params[0].grad is grad0
    with pytest.raises(ValueError, match="flat gradient"):
        write_gradient(params, g[:-1])


def test_write_gradient_skips_frozen_parameters():
    a = nn.Parameter(torch.zeros(2))
    b = nn.Parameter(torch.zeros(3), requires_grad=False)
    c = nn.Parameter(torch.zeros(1, 2))
    write_gradient([a, b, c], torch.arange(7.0))
    assert b.grad is None
    torch.testing.assert_close(a.grad, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(c.grad, torch.tensor([[5.0, 6.0]]))


def test_representation_backward_is_the_chain_rule():
    model, x, y = make_problem()
    params = model.shared()
    _, rep = model(x)
    g = torch.randn(rep.numel(), dtype=rep.dtype)
    expected = torch.autograd.grad((g.view_as(rep) * rep).sum(), params, retain_graph=True)
    representation_backward(rep, g)
    torch.testing.assert_close(flat_grads(params), torch.cat([e.reshape(-1) for e in expected]))
    with pytest.raises(ValueError, match="elements"):
        representation_backward(rep, g[:-1])


def test_representation_space_equal_weighting_matches_summed_loss():
    """Aggregating the representation Jacobian with equal weights reproduces ``sum(L).backward()``."""
    model, x, y = make_problem()
    params = model.shared()
    losses, rep = model.losses(x, y)
    losses.sum().backward(retain_graph=True)
    expected = flat_grads(params).clone()
    for p in params:
        p.grad = None
    J = task_jacobian(losses, [rep])
    representation_backward(rep, J.sum(0))
    torch.testing.assert_close(flat_grads(params), expected)


# ----------------------------------------------------------------------------------------- AMP
def test_unscale_divides_and_flags_overflow_without_sync():
    J = torch.tensor([[2.0, 4.0], [6.0, 8.0]], dtype=torch.float16)
    J32, finite = unscale(J, torch.tensor(2.0))
    assert J32.dtype == torch.float32 and isinstance(finite, torch.Tensor) and finite.dim() == 0
    torch.testing.assert_close(J32, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert bool(finite)
    J[0, 1] = float("inf")
    J32, finite = unscale(J, 2.0)
    assert not bool(finite) and not torch.isfinite(J32).all()
    J32, finite = unscale(J, 2.0, zero_nonfinite=True)
    assert not bool(finite) and J32.abs().sum() == 0


# ------------------------------------------------------------------------------- DDP, 1 process
def test_distributed_helpers_are_no_ops_without_a_process_group():
    J = torch.randn(3, 5)
    assert reduce_jacobian(J) is J
    J_global, sl = gather_representation_jacobian(J)
    assert J_global is J and sl == slice(0, 5)
    p = nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    all_reduce_gradients([p])
    torch.testing.assert_close(p.grad, torch.ones(2))


# ------------------------------------------------------------------------------- DDP, 2 processes
WORLD = 2
GLOBAL_BATCH = (4, 3)  # local batch sizes of rank 0 and 1 for the uneven case


def _aggregator():
    try:
        from mtl.balancing.aggregators import UPGrad

        return UPGrad(T)
    except Exception:  # the aggregators package is optional for this test
        return lambda J, losses=None: J.mean(0)


def _single_process_reference(model, x, y):
    """``(params-space J, representation-space param grad)`` on the whole global batch."""
    params = model.shared()
    losses, rep = model.losses(x, y)
    J_params = task_jacobian(losses, params, method="loop")
    J_rep = task_jacobian(losses, [rep], method="loop")
    g = _aggregator()(J_rep, losses.detach())
    for p in params:
        p.grad = None
    representation_backward(rep, g)
    grad = flat_grads(params).clone()
    for p in params:
        p.grad = None
    return J_params, J_rep, grad


def _ddp_worker(rank: int, port: int) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        torch.set_num_threads(1)
        model, x, y = make_problem(seed=1, batch=8)
        params = model.shared()
        J_params_ref, J_rep_ref, grad_ref = _single_process_reference(model, x, y)
        lo, hi = rank * 4, (rank + 1) * 4
        xl, yl = x[lo:hi], y[lo:hi]

        # params space: every rank ends with the Jacobian of the global mean loss.
        losses, rep = model.losses(xl, yl)
        J = reduce_jacobian(task_jacobian(losses, params, method="batched"))
        torch.testing.assert_close(J, J_params_ref)

        # representation space: gather, aggregate the global J, backprop the local slice, sum.
        J_local = task_jacobian(losses, [rep], method="loop")
        for sizes in (None, [J_local.shape[1]] * WORLD):
            J_global, sl = gather_representation_jacobian(J_local, local_sizes=sizes)
            assert sl == slice(rank * J_local.shape[1], (rank + 1) * J_local.shape[1])
            torch.testing.assert_close(J_global, J_rep_ref)
        g = _aggregator()(J_global, reduce_jacobian(losses.detach().clone()))
        for p in params:
            p.grad = None
        representation_backward(rep, g[sl], retain_graph=True)
        all_reduce_gradients(params)
        torch.testing.assert_close(flat_grads(params), grad_ref, rtol=1e-5, atol=1e-6)

        # uneven local batches (4 and 3 examples): columns land in rank order.
        lo = 0 if rank == 0 else GLOBAL_BATCH[0]
        hi = lo + GLOBAL_BATCH[rank]
        losses_u, rep_u = model.losses(x[lo:hi], y[lo:hi])
        J_u, sl_u = gather_representation_jacobian(task_jacobian(losses_u, [rep_u]))
        width = rep_u.shape[1]
        assert J_u.shape == (T, sum(GLOBAL_BATCH) * width)
        assert sl_u == slice(lo * width, hi * width)
        torch.testing.assert_close(J_u[:, sl_u], task_jacobian(losses_u, [rep_u]) / WORLD)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed gloo unavailable"
)
def test_ddp_two_processes_match_single_process():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    torch.multiprocessing.spawn(_ddp_worker, args=(_free_port(),), nprocs=WORLD, join=True)


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("space", ["params", "representation"])
def test_cuda_bf16_batched_matches_loop(space):
    torch.manual_seed(0)
    model = TinyMTL().cuda()
    x = torch.randn(16, 5, device="cuda")
    y = torch.randn(16, T, 2, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses, rep = model.losses(x, y)
    inputs = model.shared() if space == "params" else [rep]
    J_auto = task_jacobian(losses, inputs, method="batched", chunk_size=2)
    J_loop = task_jacobian(losses, inputs, method="loop")
    assert J_auto.device.type == "cuda"
    assert J_auto.dtype == (torch.float32 if space == "params" else torch.bfloat16)
    torch.testing.assert_close(J_auto.float(), J_loop.float(), rtol=2e-2, atol=1e-3)
    J32, finite = unscale(J_auto, torch.tensor(1.0, device="cuda"))
    assert finite.device.type == "cuda" and bool(finite)


@pytest.mark.parametrize("T", [2, 5, 30])
def test_dual_cone_backends_agree(T):
    """The compiled quadprog backend and the built-in active set solve the same QPs."""
    pytest.importorskip("quadprog")
    from mtl.balancing.solvers import dual_cone_weights_batched

    gen = torch.Generator().manual_seed(T)
    J = torch.randn(T, 50, generator=gen, dtype=torch.float64)
    J[0] = -J[1]  # a conflicting pair, so that constraints bind
    G = J @ J.T / (J @ J.T).trace() + 1e-4 * torch.eye(T, dtype=torch.float64)
    U = torch.eye(T, dtype=torch.float64) / T
    a = dual_cone_weights_batched(U, G, backend="active_set")
    q = dual_cone_weights_batched(U, G, backend="quadprog")
    torch.testing.assert_close(a, q, atol=1e-10, rtol=0)
    assert (q >= U).all()
    # a singular Gramian (a zero row, no ridge) falls back to the active set under "auto"
    J[2:3] = 0
    S = J @ J.T / (J @ J.T).trace()
    torch.testing.assert_close(dual_cone_weights_batched(U, S), dual_cone_weights_batched(U, S, backend="active_set"), atol=1e-9, rtol=0)
