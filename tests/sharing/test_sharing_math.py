"""Hand-checkable properties: parameter counts, cross-stitch mixing, gate distributions, DSelect-k."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from mtl import MultiTaskModel, Task
from mtl.backbones import CNN, MLP, ResNet
from mtl.sharing import CGC, MMoE, MTAN, OMoE, PLE, CrossStitch, DSelectK
from mtl.sharing.dselect_k import DSelectKGate, smooth_step


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def mlp_params(widths: list[int]) -> int:
    """Parameters of a chain of Linear layers ``widths[0] -> widths[1] -> ...`` (with biases)."""
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


NAMES = ["a", "b", "c"]


# ---------------------------------------------------------------------------------- cross-stitch
@pytest.mark.parametrize("per_channel", [False, True])
def test_cross_stitch_parameter_count(per_channel: bool) -> None:
    backbone = ResNet(input_shape=(3, 16, 16), depth=10, width=8)
    per_backbone = count(backbone)
    sharing = CrossStitch(backbone, NAMES, per_channel=per_channel)
    T, S = len(NAMES), len(backbone.stage_channels)
    units = T * T * (sum(backbone.stage_channels) if per_channel else S)
    assert count(sharing) == T * per_backbone + units


def test_cross_stitch_initial_mixing() -> None:
    sharing = CrossStitch(MLP((4,), (5, 6)), ["a", "b", "c", "d", "e"])
    for alpha in sharing.units:
        expected = torch.full((5, 5), 0.1 / 4)
        expected.fill_diagonal_(0.9)
        torch.testing.assert_close(alpha.detach(), expected)
        torch.testing.assert_close(alpha.detach().sum(1), torch.ones(5))


@pytest.mark.parametrize("backbone", ["mlp", "resnet"])
def test_cross_stitch_identity_is_independent_networks(backbone: str) -> None:
    torch.manual_seed(0)
    if backbone == "mlp":
        net, x = MLP((6,), (8, 8, 4)), torch.randn(4, 6)
    else:
        net, x = ResNet(input_shape=(3, 16, 16), depth=10, width=8), torch.randn(4, 3, 16, 16)
    independent = [copy.deepcopy(net) for _ in NAMES]
    sharing = CrossStitch(net, NAMES, alpha_same=1.0, alpha_other=0.0)
    # Give every column different weights, the same in the independent copies.
    with torch.no_grad():
        for t, copy_t in zip(NAMES, independent):
            for p, q in zip(sharing.column(t).parameters(), copy_t.parameters()):
                p.add_(torch.randn_like(p) * 0.1)
                q.copy_(p)
    features = sharing(x).features
    for t, copy_t in zip(NAMES, independent):
        torch.testing.assert_close(features[t], copy_t(x))
    # No gradient flows between columns.
    loss = features["a"].sum()
    grads = torch.autograd.grad(loss, list(sharing.column("b").parameters()), allow_unused=True)
    assert all(g is None or bool((g == 0).all()) for g in grads)


def test_cross_stitch_per_channel_mixing_by_hand() -> None:
    torch.manual_seed(0)
    alpha = torch.rand(2, 2, 3)
    hs = torch.randn(2, 4, 3, 5, 5)
    mixed = CrossStitch._mix(alpha, hs)
    expected = alpha[0, 0].view(1, 3, 1, 1) * hs[0] + alpha[0, 1].view(1, 3, 1, 1) * hs[1]
    torch.testing.assert_close(mixed[0], expected)


# ---------------------------------------------------------------------------------- MoE family
IN, HIDDEN, OUT = 8, [7], 5
EXPERT = mlp_params([IN, *HIDDEN, OUT])


def test_mmoe_and_omoe_parameter_counts() -> None:
    backbone = MLP((4,), (IN,))
    E, T = 3, len(NAMES)
    mmoe = MMoE(backbone, NAMES, num_experts=E, expert_hidden=HIDDEN, expert_out=OUT)
    assert count(mmoe) - count(backbone) == E * EXPERT + T * (IN * E + E)
    omoe = OMoE(MLP((4,), (IN,)), NAMES, num_experts=E, expert_hidden=HIDDEN, expert_out=OUT)
    assert count(omoe) - count(backbone) == E * EXPERT + (IN * E + E)
    assert mmoe.out_features == omoe.out_features == OUT


def test_cgc_and_ple_parameter_counts() -> None:
    backbone = MLP((4,), (IN,))
    ms, mt, T = 2, 3, len(NAMES)
    cgc = CGC(backbone, NAMES, num_shared_experts=ms, num_task_experts=mt, expert_hidden=HIDDEN, expert_out=OUT)
    gates = T * (IN * (ms + mt) + ms + mt)
    assert count(cgc) - count(backbone) == (ms + T * mt) * EXPERT + gates
    ple = PLE(MLP((4,), (IN,)), NAMES, num_levels=2, num_shared_experts=ms, num_task_experts=mt,
              expert_hidden=HIDDEN, expert_out=OUT)
    inner_expert = mlp_params([OUT, *HIDDEN, OUT])
    level0 = (ms + T * mt) * EXPERT + gates + IN * (ms + T * mt) + ms + T * mt  # + shared gate
    level1 = (ms + T * mt) * inner_expert + T * (OUT * (ms + mt) + ms + mt)
    assert count(ple) - count(backbone) == level0 + level1


def test_mmoe_gates_are_distributions_and_mix_the_experts() -> None:
    torch.manual_seed(0)
    mmoe = MMoE(MLP((4,), (IN,)), NAMES, num_experts=3, expert_hidden=HIDDEN, expert_out=OUT)
    x = torch.randn(6, 4)
    shared = mmoe(x)
    weights = mmoe.expert_weights(shared.representation)
    for t in NAMES:
        assert weights[t].shape == (6, 3)
        assert bool((weights[t] >= 0).all())
        torch.testing.assert_close(weights[t].sum(-1), torch.ones(6))
        expected = sum(weights[t][:, e : e + 1] * mmoe.experts[e](shared.representation) for e in range(3))
        torch.testing.assert_close(shared.features[t], expected)
    # Different gates: different features; OMoE: the same features for every task.
    assert not torch.allclose(shared.features["a"], shared.features["b"])
    omoe = OMoE(MLP((4,), (IN,)), NAMES, num_experts=3, expert_hidden=HIDDEN, expert_out=OUT)
    feats = omoe(x).features
    torch.testing.assert_close(feats["a"], feats["c"])


# ---------------------------------------------------------------------------------- DSelect-k
def test_smooth_step() -> None:
    z = torch.tensor([-2.0, -0.5, 0.0, 0.25, 0.5, 3.0])
    s = smooth_step(z, gamma=1.0)
    torch.testing.assert_close(s, torch.tensor([0.0, 0.0, 0.5, 0.5 + 0.375 - 2 * 0.25**3, 1.0, 1.0]))


@pytest.mark.parametrize("per_example", [True, False])
def test_dselect_k_gate_is_a_distribution(per_example: bool) -> None:
    torch.manual_seed(0)
    gate = DSelectKGate(in_features=6, num_experts=8, k=3, per_example=per_example)
    weights, selectors = gate(torch.randn(5, 6))
    assert weights.shape == (5, 8) and selectors.shape == (5, 3, 8)
    assert bool((weights >= 0).all())
    torch.testing.assert_close(weights.sum(-1), torch.ones(5))
    torch.testing.assert_close(selectors.sum(-1), torch.ones(5, 3))
    # At initialisation every selector is close to uniform (z near 0, S(z) near 1/2).
    assert torch.allclose(selectors, torch.full_like(selectors, 1 / 8), atol=0.06)


def test_dselect_k_saturated_selectors_pick_at_most_k_experts() -> None:
    torch.manual_seed(0)
    gate = DSelectKGate(in_features=6, num_experts=8, k=2)
    with torch.no_grad():
        gate.z_logits.weight.zero_()
        gate.z_logits.bias.copy_(torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, -1.0]))  # experts 5 and 0
    weights, _ = gate(torch.randn(4, 6))
    torch.testing.assert_close(weights.sum(-1), torch.ones(4))
    assert set(torch.nonzero(weights[0]).flatten().tolist()) == {0, 5}


def test_dselect_k_training_converges_to_at_most_k_experts() -> None:
    """Trained with entropy regularization, every selector saturates (binary), and stays so."""
    torch.manual_seed(0)
    n, k = 8, 2
    gate = DSelectKGate(in_features=1, num_experts=n, k=k, per_example=False)
    experts = torch.randn(n, 4)
    target = 0.5 * experts[3] + 0.5 * experts[6]
    opt = torch.optim.Adam(gate.parameters(), lr=0.05)

    def step() -> torch.Tensor:
        weights, selectors = gate(torch.zeros(1, 1))
        entropy = -(selectors * torch.log(selectors + 1e-6)).sum()
        loss = ((weights @ experts - target) ** 2).sum() + 3.0 * entropy
        opt.zero_grad()
        loss.backward()
        opt.step()
        return weights.detach()

    saturated = lambda: bool((gate.z_logits.abs() >= gate.gamma / 2).all())  # noqa: E731
    for _ in range(500):
        step()
        if saturated():
            break
    assert saturated(), "selectors did not converge"
    weights = step()
    assert gate.z_logits.grad is not None and bool((gate.z_logits.grad == 0).all())  # permanent
    assert int((weights > 0).sum()) <= k
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))


def test_dselect_k_regularization() -> None:
    torch.manual_seed(0)
    sharing = DSelectK(MLP((4,), (IN,)), NAMES, num_experts=4, k=2, expert_hidden=HIDDEN, expert_out=OUT,
                       entropy_reg=0.5)
    assert float(sharing.regularization()) == 0.0  # before any forward pass
    sharing(torch.randn(3, 4))
    reg = sharing.regularization()
    # Near-uniform selectors: entropy ~ log(4) per selector, k selectors per task.
    assert reg.dim() == 0 and reg.requires_grad
    assert reg.item() == pytest.approx(0.5 * len(NAMES) * 2 * torch.log(torch.tensor(4.0)).item(), rel=0.01)
    reg.backward()
    assert all(g.z_logits.weight.grad is not None for g in sharing.gates.values())
    sharing.eval()
    sharing(torch.randn(3, 4))
    assert float(sharing.regularization()) == 0.0  # evaluation keeps no graph
    # Not a power of 2: the reachability term (>= k per task) is always there.
    odd = DSelectK(MLP((4,), (IN,)), NAMES, num_experts=5, k=2, expert_hidden=HIDDEN, expert_out=OUT)
    odd(torch.randn(3, 4))
    assert odd.regularization().item() >= len(NAMES) * 2


def test_dselect_k_through_the_model_with_five_experts() -> None:
    tasks = [Task(t, num_classes=2) for t in NAMES]
    model = MultiTaskModel(CNN((1, 8, 8), (4,)), tasks, sharing=functools.partial(DSelectK, num_experts=5, k=3))
    out = model(torch.randn(2, 1, 6, 6))
    assert out["c"].shape == (2, 2)


# ---------------------------------------------------------------------------------- MTAN
def test_mtan_infers_feature_maps_and_masks_are_in_unit_interval() -> None:
    torch.manual_seed(0)
    assert MTAN(CNN((1, 8, 8), (4, 8)), NAMES).feature_maps
    assert not MTAN(MLP((4,), (8, 8)), NAMES).feature_maps
    sharing = MTAN(ResNet((3, 16, 16), depth=10, width=8), NAMES)
    stages = sharing.backbone.forward_stages(torch.randn(2, 3, 16, 16))
    mask = sharing.attention["a"][0](stages[0])
    assert mask.shape == stages[0].shape and bool(((mask > 0) & (mask < 1)).all())
    # One attention module per stage and task, one shared block between consecutive stages.
    assert len(sharing.attention["b"]) == 4 and len(sharing.to_next) == 3
    with pytest.raises(ValueError, match="feature_maps"):
        MTAN(CNN((1, 8, 8), (4, 8)), NAMES, feature_maps=False)(torch.randn(2, 1, 8, 8))
