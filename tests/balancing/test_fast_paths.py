"""The fast paths of the balanced backward against the paths they replace.

* :func:`mtl.balancing.jacobian.representation_jacobian` (the representation-space Jacobian and
  the heads' gradients in one backward pass) against :func:`task_jacobian`'s loop plus a separate
  backward of the summed loss: identical, to the bit, where the heads' graphs are disjoint, and
  None (so that the loop runs) where they are not.
* The block principal pivoting solver of ``dual_cone_weights_batched`` (``auto``) against the
  active set and quadprog, and against the KKT conditions, for T = 1 .. 100.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mtl.balancing.solvers as solvers
from mtl.balancing import aggregators
from mtl.balancing.aggregators.base import gramian, host
from mtl.balancing.aggregators.upgrad import normalize_and_regularize
from mtl.balancing.backward import balanced_backward
from mtl.balancing.jacobian import JacobianEngine, representation_jacobian, task_jacobian
from mtl.balancing.solvers import dual_cone_weights_batched


class Heads(nn.Module):
    """A tanh MLP backbone and ``T`` heads (linear, or two layers), losses stacked per task."""

    def __init__(self, T: int, width: int = 6, deep: bool = False, dtype=torch.float64) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, width), nn.Tanh())
        make = (lambda: nn.Sequential(nn.Linear(width, 4), nn.ReLU(), nn.Linear(4, 3))) if deep else (lambda: nn.Linear(width, 3))
        self.heads = nn.ModuleList(make() for _ in range(T))
        self.to(dtype)

    def losses(self, x, y):
        rep = self.backbone(x)
        return torch.stack([F.cross_entropy(h(rep), y[t]) for t, h in enumerate(self.heads)]), rep


def problem(T: int, deep: bool = False, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    model = Heads(T, deep=deep, dtype=dtype)
    x = torch.randn(7, 5, dtype=dtype)
    y = torch.randint(0, 3, (T, 7))
    return model, x, y


def head_grads(model):
    return [None if p.grad is None else p.grad.clone() for p in model.heads.parameters()]


@pytest.mark.parametrize("T", [1, 2, 5, 13])
@pytest.mark.parametrize("deep", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_representation_jacobian_is_the_loop_to_the_bit(T, deep, dtype):
    model, x, y = problem(T, deep, dtype)
    heads = list(model.heads.parameters())
    losses, rep = model.losses(x, y)
    J_loop = task_jacobian(losses, [rep], method="loop")
    torch.autograd.backward(losses.sum(), inputs=heads, retain_graph=True)
    ref = head_grads(model)
    model.zero_grad(set_to_none=True)
    J = representation_jacobian(losses, [rep], heads)
    assert J is not None and J.dtype == J_loop.dtype and J.shape == J_loop.shape
    assert torch.equal(J, J_loop)
    for g, r in zip(head_grads(model), ref):
        assert torch.equal(g, r)
    # the graph is retained, and the representation keeps no .grad
    assert rep.grad is None if not rep.is_leaf else True
    representation_backward_works = torch.autograd.grad(rep.sum(), list(model.backbone.parameters()))
    assert all(g is not None for g in representation_backward_works)


def test_representation_jacobian_seed_constant_losses_and_accumulation():
    model, x, y = problem(4)
    heads = list(model.heads.parameters())
    rep = model.backbone(x)
    each = [F.cross_entropy(h(rep), y[t]) for t, h in enumerate(model.heads)]
    each[1] = torch.tensor(0.5, dtype=rep.dtype)  # a task without labels in the batch
    losses = torch.stack(each)
    scale = torch.tensor(1024.0)
    J_loop = task_jacobian(losses * scale, [rep], method="loop")
    torch.autograd.backward((losses * scale).sum(), inputs=heads, retain_graph=True)
    ref = head_grads(model)
    # existing .grad is accumulated into, as a backward pass would
    for p in heads:
        p.grad = torch.ones_like(p)
    J = representation_jacobian(losses, [rep], heads, seed=scale)
    torch.testing.assert_close(J, J_loop, rtol=1e-15, atol=0)
    assert not J[1].any()
    for p, r in zip(heads, ref):
        torch.testing.assert_close(p.grad, torch.ones_like(p) if r is None else r + 1.0, rtol=1e-14, atol=0)


def test_representation_jacobian_several_representations_and_leaves():
    torch.manual_seed(1)
    z1 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    heads = [nn.Linear(3, 1).double() for _ in range(3)]
    # each head reads both representations (two boundary edges per task)
    losses = torch.stack([(h(z1).pow(2).mean() + h(z2).tanh().sum()) for h in heads])
    params = [p for h in heads for p in h.parameters()]
    J_loop = task_jacobian(losses, [z1, z2], method="loop")
    J = representation_jacobian(losses, [z1, z2], params)
    torch.testing.assert_close(J, J_loop, rtol=1e-14, atol=0)
    assert z1.grad is None and z2.grad is None


def test_representation_jacobian_refuses_shared_graphs():
    model, x, y = problem(3)
    heads = list(model.heads.parameters())
    rep = model.backbone(x)
    outs = [h(rep) for h in model.heads]
    # task 2 reads task 0's output: its row and task 0's cannot be told apart
    losses = torch.stack([F.cross_entropy(outs[0], y[0]), F.cross_entropy(outs[1], y[1]), F.cross_entropy(outs[2] + outs[0], y[2])])
    assert representation_jacobian(losses, [rep], heads) is None
    # losses that also reach the backbone around the representation (skip connections): a row is
    # still what flows into the representation, so one such task is fine; two share the backbone's
    # nodes, which is refused (conservatively)
    hidden = model.backbone[1](model.backbone[0](x))
    rep = model.backbone[3](model.backbone[2](hidden))
    losses = torch.stack([F.cross_entropy(model.heads[0](rep), y[0]), F.cross_entropy(model.heads[1](rep) + hidden[:, :3], y[1])])
    J_loop = task_jacobian(losses, [rep], method="loop")
    assert torch.equal(representation_jacobian(losses, [rep], heads), J_loop)
    model.zero_grad(set_to_none=True)
    losses = torch.stack([F.cross_entropy(h(rep) + hidden[:, :3], y[t]) for t, h in enumerate(model.heads)])
    assert representation_jacobian(losses, [rep], heads) is None
    # losses that were not stacked
    losses, rep = model.losses(x, y)
    assert representation_jacobian(losses * 2.0, [rep], heads) is None
    assert all(p.grad is None for p in heads)  # nothing was computed


@pytest.mark.parametrize("name", ["UPGrad", "PCGrad", "NashMTL", "MGDA", "CAGrad", "DualProj", "IMTLG"])
@pytest.mark.parametrize("extras", [False, True])
def test_balanced_backward_fused_matches_loop(name, extras):
    T = 6
    grads = {}
    for method in ("auto", "loop"):
        model, x, y = problem(T, deep=True)
        agg = getattr(aggregators, name)(num_tasks=T)
        losses, rep = model.losses(x, y)
        kwargs = {}
        if extras:
            heads = list(model.heads.parameters())
            kwargs = dict(
                loss_scale=torch.tensor(8.0, dtype=torch.float64),
                task_term=sum(p.pow(2).sum() for p in heads[:2]),
                extra_term=sum(p.abs().sum() for p in model.parameters()),
            )
        stats = balanced_backward(
            losses, agg, list(model.backbone.parameters()), list(model.heads.parameters()),
            engine=JacobianEngine(space="representation", method=method), representations=[rep], **kwargs,
        )
        grads[method] = ([p.grad.clone() for p in model.parameters()], stats)
    (a, sa), (b, sb) = grads["auto"], grads["loop"]
    for ga, gb in zip(a, b):
        torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sa.grad_norms, sb.grad_norms, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------ solver
def gramians(T: int, seed: int):
    """Gramians of several kinds: Gaussian, conflicting rows, rank-deficient (T > P), duplicated
    and zero rows; each trace-normalised plus UPGrad's ridge, and one without a ridge."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for kind in range(5):
        P = 3 if kind == 2 else 50
        J = torch.randn(T, P, generator=gen, dtype=torch.float64)
        if kind == 1 and T > 1:
            J[1 : max(2, T // 2)] -= 1.5 * J[0]
        if kind == 3 and T > 2:
            J[2] = J[1]
            J[T - 1] = 0.0
        G = J @ J.T
        G = normalize_and_regularize(G, 0.0 if kind == 4 else 1e-4)
        out.append(G)
    return out


def kkt_residual(U: torch.Tensor, V: torch.Tensor, G: torch.Tensor) -> float:
    """Largest violation of the KKT conditions of ``min_{v >= u} v^T G v``, relative to ``max G_ii``:
    ``v >= u``, ``G v >= 0`` (the multipliers) and ``(v - u) * (G v) = 0``."""
    Y = V @ G.T
    s = float(G.diagonal().abs().max())
    primal = float((U - V).clamp_min(0).max())
    dual = float((-Y).clamp_min(0).max()) / s
    comp = float(((V - U) * Y).abs().max()) / s
    return max(primal, dual, comp)


@pytest.mark.parametrize("T", [1, 2, 3, 5, 10, 17, 40, 100])
def test_pivoting_solver_matches_active_set_and_kkt(T):
    for seed in range(1 if T >= 40 else 2):  # the active set is slow at T = 100
        for G in gramians(T, 100 * T + seed):
            for U in (torch.eye(T, dtype=G.dtype) / T, torch.full((1, T), 1.0 / T, dtype=G.dtype)):
                V = dual_cone_weights_batched(U, G)
                A = dual_cone_weights_batched(U, G, backend="active_set")
                torch.testing.assert_close(V, A, rtol=1e-9, atol=1e-12)
                assert (V >= U).all()
                assert kkt_residual(U, V, G) < 1e-9


@pytest.mark.parametrize("T", [2, 10, 40, 100])
def test_pivoting_solver_matches_quadprog(T):
    pytest.importorskip("quadprog")
    for G in gramians(T, T)[:4]:  # quadprog needs a positive definite G
        U = torch.eye(T, dtype=G.dtype) / T
        torch.testing.assert_close(
            dual_cone_weights_batched(U, G), dual_cone_weights_batched(U, G, backend="quadprog"), rtol=1e-10, atol=1e-13
        )


@pytest.mark.parametrize("T", [2, 10, 40, 100])
def test_upgrad_and_dualproj_unchanged(T):
    """UPGrad and DualProj with the new default solver give what they gave with quadprog (the
    default before) and with the active set."""
    gen = torch.Generator().manual_seed(T)
    for trial in range(3):
        J = torch.randn(T, 64, generator=gen)
        if T > 1:
            J[1 : max(2, T // 3)] -= (1.0 + trial) * J[0]
        for cls in (aggregators.UPGrad, aggregators.DualProj):
            agg = cls(T)
            g = agg(J)
            G = normalize_and_regularize(host(gramian(J)), agg.reg_eps)  # as the aggregator does
            U = torch.eye(T, dtype=G.dtype) / T if cls is aggregators.UPGrad else torch.full((1, T), 1.0 / T, dtype=G.dtype)
            for backend in ("active_set",) + (("quadprog",) if solvers._quadprog is not None else ()):
                w = dual_cone_weights_batched(U, G, backend=backend).sum(0)
                torch.testing.assert_close(agg.last_weights, w.float(), rtol=1e-6, atol=1e-9)
                torch.testing.assert_close(g, w.float() @ J, rtol=1e-6, atol=1e-6)


def test_pivoting_falls_back_and_follows_murtys_rule(monkeypatch):
    """Rows that do not converge within max_iter go to the active set; the single-exchange rule
    (after three full exchanges that do not help) still ends at the optimum."""
    T = 30
    for G in gramians(T, 7):
        G_np = G.numpy()
        Q = (np.eye(T) / T) @ G_np
        ref = solvers._active_set_batched(G_np, Q, 1e-10, 3 * T + 20)
        X = solvers._pivoting_qp_batched(G_np, Q, 1e-10, 1)  # one step: most rows fall back
        np.testing.assert_allclose(X, ref, rtol=1e-9, atol=1e-12)
        # a bad start (every variable free) makes the pivoting work for it
        s = float(np.abs(np.diag(G_np)).max())
        Hs = 0.5 * (G_np + G_np.T) / s + solvers._RIDGE * np.eye(T)
        Qs = Q / s
        thresh = 1e-10 * (1.0 + np.abs(Qs).max(axis=1))
        X, ok = solvers._pivoting_batched(Hs, Qs, thresh, 3 * T + 20, F=np.ones((T, T), dtype=bool))
        assert ok.all()
        np.testing.assert_allclose(X, ref, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("T", [3, 8, 16])
def test_small_pivoting_with_murtys_rule_only(monkeypatch, T):
    """The small-T loop with no full exchanges (Murty's single-index rule from the first step)
    still reaches the optimum."""
    monkeypatch.setattr(solvers, "_FULL_EXCHANGES", 0)
    for G in gramians(T, 11):
        U = torch.eye(T, dtype=G.dtype) / T
        torch.testing.assert_close(
            dual_cone_weights_batched(U, G), dual_cone_weights_batched(U, G, backend="active_set"), rtol=1e-9, atol=1e-12
        )


@pytest.mark.parametrize("T", [2, 10, 40])
def test_sdmgrad_numpy_loop_matches_the_torch_loop(T):
    """SDMGrad's inner loop runs in NumPy; the torch loop it replaced gives the same weights."""
    from mtl.balancing.solvers import project_simplex

    gen = torch.Generator().manual_seed(T)
    agg = aggregators.SDMGrad(T)
    w_ref = torch.full((T,), 1.0 / T, dtype=torch.float64)
    for step in range(4):
        J = torch.randn(T, 30, generator=gen)
        J[1 : max(2, T // 3)] -= J[0]
        g = agg(J)
        G = host(gramian(J))
        G = G / (G.diagonal().clamp_min(0).sqrt().mean() ** 2 + 1e-8)
        G_mean, buf, w = G.mean(dim=1), None, w_ref
        for _ in range(agg.niter):
            grad = G @ w + agg.lam * G_mean
            buf = grad if buf is None else agg.momentum * buf + grad
            w = project_simplex(w - agg.lr * buf)
        w_ref = w
        torch.testing.assert_close(agg.w.double(), w_ref.to(agg.w).double(), rtol=1e-6, atol=1e-7)
        weights = ((w_ref + agg.lam / T) / (1.0 + agg.lam)).float()
        torch.testing.assert_close(g, weights @ J, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T", [17, 40, 100])
def test_min_norm_simplex_pivoting_matches_the_active_set(T):
    """MGDA's solver at T > 16 (pivoting from the full face) gives the active set's weights,
    including where the pivoting declines (rank-deficient Gramians, a zero row)."""
    from mtl.balancing.solvers import min_norm_simplex, simplex_qp

    gen = torch.Generator().manual_seed(T)
    for kind in range(5):
        J = torch.randn(T, 10 if kind == 2 else 300, generator=gen, dtype=torch.float64)
        if kind == 1:
            J[1 : T // 2] -= 2.0 * J[0]  # the optimum leaves some tasks out
        if kind == 3:
            J[0] *= 1e-3
        if kind == 4:
            J[3] = 0.0
        G = J @ J.T
        w = min_norm_simplex(G)
        ref = simplex_qp(G, torch.zeros(T, dtype=G.dtype))
        torch.testing.assert_close(w, ref, rtol=1e-9, atol=1e-12)
        assert float(w.sum()) == pytest.approx(1.0) and (w >= 0).all()
