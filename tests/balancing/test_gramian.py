"""The Gramian engine: G by chunks, the surrogate factor, and the same update as the Jacobian engine."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mtl.balancing as balancing
from mtl.balancing import GramianEngine, JacobianEngine, balanced_backward
from mtl.balancing.gramian import gramian_by_chunks, gramian_factor, parameter_chunks
from mtl.balancing.jacobian import task_jacobian

GRAMIAN_BASED = sorted(
    name for name in balancing.__all__
    if isinstance(getattr(balancing, name), type) and getattr(getattr(balancing, name), "gramian_based", False)
)


def net(T: int) -> tuple[nn.Module, list[nn.Parameter], list[nn.Parameter], torch.Tensor]:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh())
    heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(T))
    x, y = torch.randn(32, 6), torch.randn(T, 32)
    h = trunk(x)
    losses = torch.stack([((head(h).squeeze(1) - y[t]) ** 2).mean() for t, head in enumerate(heads)])
    return trunk, list(trunk.parameters()), list(heads.parameters()), losses


def test_parameter_chunks_respect_the_size():
    params = [torch.zeros(n) for n in (3, 4, 10, 2, 2)]
    chunks = parameter_chunks(params, 6)
    assert [[p.numel() for p in c] for c in chunks] == [[3], [4], [10], [2, 2]]
    assert sum(len(c) for c in chunks) == len(params)


@pytest.mark.parametrize("chunk_size", [1, 50, 10**6])
def test_gramian_by_chunks_equals_j_jt(chunk_size):
    _, shared, _, losses = net(4)
    J = task_jacobian(losses, shared).double()
    G = gramian_by_chunks(losses, shared, chunk_size)
    torch.testing.assert_close(G, J @ J.T, rtol=1e-6, atol=1e-9)
    R = gramian_factor(G)
    torch.testing.assert_close(R.double() @ R.double().T, G, rtol=1e-5, atol=1e-6)


def run(engine, name: str, T: int = 4, attach: bool = False):
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.LayerNorm(8), nn.Tanh())
    if attach:
        engine.attach(trunk)
    heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(T))
    x, y = torch.randn(32, 6), torch.randn(T, 32)
    h = trunk(x)
    losses = torch.stack([((head(h).squeeze(1) - y[t]) ** 2).mean() for t, head in enumerate(heads)])
    shared, own = list(trunk.parameters()), list(heads.parameters())
    stats = balanced_backward(losses, getattr(balancing, name)(num_tasks=T), shared, own, engine=engine)
    return torch.cat([p.grad.flatten() for p in shared + own]), stats


@pytest.mark.parametrize("attach", [False, True], ids=["by_chunks", "per_layer"])
@pytest.mark.parametrize("name", GRAMIAN_BASED)
def test_gramian_engine_gives_the_jacobian_engines_update(name, attach):
    gj, sj = run(JacobianEngine(), name)
    gg, sg = run(GramianEngine(chunk_size=100), name, attach=attach)
    torch.testing.assert_close(gg, gj, rtol=2e-3, atol=1e-5)
    torch.testing.assert_close(sg.grad_norms, sj.grad_norms, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(sg.cosines, sj.cosines, rtol=1e-4, atol=1e-5)


def test_per_layer_gramian_of_linear_layers_equals_j_jt():
    from mtl.balancing.gramian import linear_layers_gramian

    engine = GramianEngine()
    torch.manual_seed(1)
    trunk = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    engine.attach(trunk)
    x = torch.randn(4, 2, 5)  # a sequence dimension: every position is an example of the layer
    out = trunk(x)
    losses = torch.stack([out[..., i].pow(2).mean() for i in range(3)] + [out.sum()])
    G, covered = linear_layers_gramian(losses, engine.take_records())
    assert len(covered) == 4
    J = task_jacobian(losses, list(trunk.parameters())).double()
    torch.testing.assert_close(G, J @ J.T, rtol=1e-5, atol=1e-6)


def test_gramian_engine_refuses_methods_that_need_the_jacobian():
    _, shared, heads, losses = net(3)
    with pytest.raises(ValueError, match="GradDrop does not update along a weighting.*JacobianEngine"):
        balanced_backward(losses, balancing.GradDrop(3), shared, heads, engine=GramianEngine())
    with pytest.raises(ValueError, match="params space only"):
        GramianEngine(space="representation")
