"""Learning to Branch (mtl.sharing.ltb.LTB): shapes, gradients, branching probabilities, the
temperature schedule, the final discrete tree, and the shared-parameter / representation contract."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mtl import MultiTaskModel, Task
from mtl.backbones import CNN, MLP
from mtl.sharing.hard import HardSharing
from mtl.sharing.ltb import LTB, Tree

CONF = Path(__file__).resolve().parents[2] / "conf"
NAMES = ["a", "b", "c"]


def mlp() -> MLP:
    return MLP(input_shape=(6,), hidden=(5, 4, 3))


def losses_of(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # a loss that reaches every feature (a sum of squares keeps every ReLU path in the graph)
    return {t: (f**2).sum() + f.sum() for t, f in features.items()}


# ---------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("backbone", ["mlp", "cnn"])
def test_shapes_and_node_counts(backbone: str) -> None:
    torch.manual_seed(0)
    if backbone == "mlp":
        net, x = mlp(), torch.randn(7, 6)
    else:
        net, x = CNN(input_shape=(1, 8, 8), channels=(4, 8)), torch.randn(7, 1, 8, 8)
    S = len(net.stages)
    assert LTB(net, NAMES).nodes == [2] * S  # the default does not depend on the tasks
    ltb = LTB(net, NAMES, nodes=3)
    assert ltb.nodes == [3] * S and ltb.out_features == net.out_features
    assert [len(ltb.stage_nodes(s)) for s in range(S)] == [3] * S
    assert ltb.stage_nodes(0)[0] is net.stages[0]  # node 0 is the backbone passed in
    assert [tuple(p.shape) for p in ltb.branch_logits] == [(3, 3)] * (S - 1)
    assert all(leaf.logits.shape == (3,) for leaf in ltb.leaves.values())
    for mode in (True, False):
        ltb.train(mode)
        out = ltb(x)
        assert set(out.features) == set(NAMES)
        assert all(f.shape == (7, net.out_features) for f in out.features.values())
        assert out.representation is None  # no single-node trunk by default
    assert set(ltb(x, ["b"]).features) == {"b"}
    with pytest.raises(KeyError, match="no leaf"):
        ltb(x, ["z"])


def test_parameter_count_and_widths() -> None:
    net = mlp()
    per_stage = [sum(p.numel() for p in st.parameters()) for st in net.stages]
    ltb = LTB(net, NAMES, nodes=[1, 2, 4])
    logits = 2 * 1 + 4 * 2 + len(NAMES) * 4
    assert sum(p.numel() for p in ltb.parameters()) == sum(n * c for n, c in zip([1, 2, 4], per_stage)) + logits
    with pytest.raises(ValueError, match="sharing.nodes"):
        LTB(mlp(), NAMES, nodes=[2, 2])
    with pytest.raises(ValueError, match="min_temperature"):
        LTB(mlp(), NAMES, temperature=0.1, min_temperature=1.0)


def test_single_node_everywhere_is_hard_sharing() -> None:
    torch.manual_seed(0)
    net, x = mlp(), torch.randn(5, 6)
    ltb = LTB(net, NAMES, nodes=[1, 1, 1])
    out = ltb(x)
    for f in out.features.values():
        torch.testing.assert_close(f, HardSharing(net, NAMES)(x).representation)
    assert out.representation is not None and ltb.trunk == 3
    torch.testing.assert_close(out.representation, net(x))


# ---------------------------------------------------------------------------------- the mixing, by hand
def test_eval_mixing_by_hand() -> None:
    """Eval mode: child i reads sum_j softmax(theta_i / tau)_j x_j, the tasks likewise."""
    torch.manual_seed(0)
    net, x = MLP(input_shape=(3,), hidden=(4, 2)), torch.randn(5, 3)
    ltb = LTB(net, ["a", "b"], nodes=[2, 2], temperature=2.0, min_temperature=2.0).eval()
    with torch.no_grad():
        for p in ltb.parameters():
            p.copy_(torch.randn_like(p))
    theta = ltb.branch_logits[0].detach()
    s0 = [node(x) for node in ltb.stage_nodes(0)]  # both stage-0 nodes read the input
    d = torch.softmax(theta / 2.0, dim=-1)
    s1 = [node(d[i, 0] * s0[0] + d[i, 1] * s0[1]) for i, node in enumerate(ltb.stage_nodes(1))]
    out = ltb(x).features
    for t in ("a", "b"):
        w = torch.softmax(ltb.leaves[t].logits.detach() / 2.0, dim=-1)
        torch.testing.assert_close(out[t], w[0] * s1[0] + w[1] * s1[1])


def test_warmup_averages_the_parents() -> None:
    ltb = LTB(mlp(), NAMES, warmup_steps=2).train()
    logits = torch.tensor([[3.0, -1.0, 0.0]])
    torch.testing.assert_close(ltb.branch_weights(logits), torch.full((1, 3), 1 / 3))
    ltb.steps.fill_(2)
    assert not torch.allclose(ltb.branch_weights(logits), torch.full((1, 3), 1 / 3))


# ---------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("backbone", ["mlp", "cnn"])
def test_gradients_reach_every_parameter(backbone: str, hard: bool) -> None:
    torch.manual_seed(0)
    if backbone == "mlp":
        net, x = mlp(), torch.randn(8, 6)
    else:
        net, x = CNN(input_shape=(1, 8, 8), channels=(4, 8)), torch.randn(8, 1, 8, 8)
    ltb = LTB(net, NAMES, hard=hard).train()
    sum(losses_of(ltb(x).features).values()).backward()
    missing = [n for n, p in ltb.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in ltb.parameters())
    # the branching logits learn: the relaxed (or straight-through) sample is differentiable
    for name, p in ltb.named_parameters():
        if "logits" in name:
            assert p.grad.abs().sum() > 0, name


def test_hard_samples_are_one_hot_in_the_forward_pass() -> None:
    torch.manual_seed(0)
    ltb = LTB(mlp(), NAMES, hard=True).train()
    logits = torch.randn(3, 3, requires_grad=True)
    w = ltb.branch_weights(logits)
    assert set(w.detach().flatten().tolist()) <= {0.0, 1.0} and torch.equal(w.detach().sum(1), torch.ones(3))
    (w * torch.randn(3, 3)).sum().backward()
    assert logits.grad.abs().sum() > 0  # straight-through: the relaxed sample's gradient


# ---------------------------------------------------------------------------------- branching probabilities
def test_initial_branching_probabilities_are_uniform() -> None:
    ltb = LTB(mlp(), NAMES, nodes=[2, 2, 4])
    stages, tasks = ltb.branching_probabilities()
    torch.testing.assert_close(stages[0], torch.full((2, 2), 0.5))
    torch.testing.assert_close(stages[1], torch.full((4, 2), 0.5))
    for p in tasks.values():
        torch.testing.assert_close(p, torch.full((4,), 0.25))


def test_samples_follow_the_branching_probabilities_at_low_temperature() -> None:
    """Gumbel-max: at a low temperature each sample is (nearly) one-hot and picks parent j with
    probability softmax(theta)_j."""
    torch.manual_seed(0)
    ltb = LTB(mlp(), NAMES).train()
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().expand(20000, 3).contiguous()  # 20,000 independent children
    w = ltb.branch_weights(logits, torch.tensor(1e-3))
    assert (w.max(1).values > 0.99).float().mean() > 0.99
    freq = torch.bincount(w.argmax(1), minlength=3).float() / 20000
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    # at a high temperature the sample is spread over the parents
    spread = ltb.branch_weights(logits[:1000], torch.tensor(50.0))
    assert spread.max(1).values.max() < 0.5


def test_low_temperature_eval_is_the_discrete_tree() -> None:
    torch.manual_seed(0)
    net, x = mlp(), torch.randn(4, 6)
    ltb = LTB(net, ["a", "b"], nodes=[2, 3, 2], temperature=5.0, min_temperature=1e-3, anneal_steps=10)
    with torch.no_grad():
        ltb.branch_logits[0].copy_(torch.tensor([[0.3, 0.0], [0.0, 0.2], [0.1, 0.0]]))
        ltb.branch_logits[1].copy_(torch.tensor([[0.0, 0.0, 0.4], [0.5, 0.0, 0.0]]))
        ltb.leaves["a"].logits.copy_(torch.tensor([0.2, 0.0]))
        ltb.leaves["b"].logits.copy_(torch.tensor([0.0, 0.1]))
    expected = Tree(stages=[[0, 1, 0], [2, 0]], tasks={"a": 0, "b": 1})
    assert ltb.tree() == expected
    ltb.eval()
    # the start of the schedule: near-uniform weights
    assert ltb.branch_weights(ltb.branch_logits[0].detach()).max() < 0.6
    ltb.steps.fill_(10)  # the end of the schedule: tau = 1e-3
    w = ltb.branch_weights(ltb.branch_logits[0].detach())
    torch.testing.assert_close(w, torch.nn.functional.one_hot(torch.tensor([0, 1, 0]), 2).float())

    def along_tree() -> dict[str, torch.Tensor]:
        s0 = [n(x) for n in ltb.stage_nodes(0)]
        s1 = [n(s0[p]) for n, p in zip(ltb.stage_nodes(1), expected.stages[0])]
        s2 = [n(s1[p]) for n, p in zip(ltb.stage_nodes(2), expected.stages[1])]
        return {t: s2[p] for t, p in expected.tasks.items()}

    with torch.no_grad():
        for t, f in along_tree().items():
            torch.testing.assert_close(ltb(x).features[t], f)
    # fix_tree commits to it in training mode too; the logits then get no gradient
    ltb.steps.zero_()
    assert ltb.fix_tree() == expected
    ltb.train()
    out = ltb(x).features
    for t, f in along_tree().items():
        torch.testing.assert_close(out[t], f)
    sum(losses_of(out).values()).backward()
    for name, p in ltb.named_parameters():
        if "logits" in name:
            assert p.grad is None or not p.grad.any(), name


# ---------------------------------------------------------------------------------- temperature schedule
def test_temperature_schedule_and_step_counting() -> None:
    ltb = LTB(mlp(), NAMES, temperature=4.0, min_temperature=0.25, anneal_steps=8)
    x = torch.randn(2, 6)
    assert float(ltb.temperature()) == pytest.approx(4.0)
    ltb.steps.fill_(4)
    assert float(ltb.temperature()) == pytest.approx(math.sqrt(4.0 * 0.25))  # geometric midpoint
    ltb.steps.fill_(8)
    assert float(ltb.temperature()) == pytest.approx(0.25)
    ltb.steps.fill_(100)
    assert float(ltb.temperature()) == pytest.approx(0.25)
    ltb.steps.zero_()
    ltb.train()
    ltb(x)
    ltb(x)
    with torch.no_grad():
        ltb(x)  # e.g. FAMO's loss after the step: not a training step
    ltb.eval()
    ltb(x)
    assert int(ltb.steps) == 2
    assert float(LTB(mlp(), NAMES, anneal_steps=0).temperature()) == pytest.approx(0.5)


def test_state_dict_resumes_the_schedule_and_the_tree() -> None:
    torch.manual_seed(0)
    a = LTB(mlp(), NAMES).train()
    for _ in range(3):
        a(torch.randn(2, 6))
    a.fix_tree()
    b = LTB(mlp(), NAMES)
    b.load_state_dict(a.state_dict())
    assert int(b.steps) == 3 and bool(b.fixed)
    torch.testing.assert_close(b.temperature(), a.temperature())


# ---------------------------------------------------------------------------------- sharing contract
def test_shared_parameters_and_who_reaches_them() -> None:
    torch.manual_seed(0)
    ltb = LTB(mlp(), NAMES).train()
    own = {id(p) for p in ltb.leaves.parameters()}
    shared = {id(p) for p in ltb.shared_parameters()}
    assert shared == {id(p) for p in ltb.parameters()} - own
    losses = losses_of(ltb(torch.randn(6, 6)).features)
    params = list(ltb.parameters())
    names = {id(p): n for n, p in ltb.named_parameters()}
    reached = {
        t: [g is not None for g in torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)]
        for t, loss in losses.items()
    }
    for i, p in enumerate(params):
        count = sum(reached[t][i] for t in NAMES)
        assert count == (len(NAMES) if id(p) in shared else 1), names[id(p)]
    for t in NAMES:  # a task's leaf logits are reached by that task
        i = next(k for k, p in enumerate(params) if p is ltb.leaves[t].logits)
        assert reached[t][i]


def test_trunk_output_is_an_exact_representation() -> None:
    torch.manual_seed(0)
    net = mlp()
    ltb = LTB(net, NAMES, nodes=[1, 2, 3]).train()
    assert ltb.trunk == 1
    out = ltb(torch.randn(6, 6))
    rep = out.representation
    assert rep is not None and rep.shape == (6, net.stage_channels[0])
    trunk = list(net.stages[0].parameters())
    for loss in losses_of(out.features).values():
        g_rep = torch.autograd.grad(loss, rep, retain_graph=True)[0]
        direct = torch.autograd.grad(loss, trunk, retain_graph=True)
        through = torch.autograd.grad(rep, trunk, grad_outputs=g_rep, retain_graph=True)
        for u, v in zip(direct, through):
            torch.testing.assert_close(u, v)


def test_in_a_model_and_from_the_config() -> None:
    from hydra.utils import instantiate

    cfg = OmegaConf.load(CONF / "sharing" / "ltb.yaml")
    assert cfg._target_ == "mtl.sharing.LTB"
    tasks = [Task("a", num_classes=3), Task("b", kind="regression")]
    model = MultiTaskModel(CNN(input_shape=(1, 8, 8), channels=(4, 8)), tasks, sharing=instantiate(cfg))
    assert isinstance(model.sharing, LTB)
    out = model(torch.randn(2, 1, 8, 8))
    assert out["a"].shape == (2, 3) and out["b"].shape == (2, 1)
    partial = functools.partial(LTB, nodes=[1, 2], hard=True)
    model = MultiTaskModel(MLP(input_shape=(6,), hidden=(4, 4)), tasks, sharing=partial)
    assert model.sharing.hard and model.sharing.nodes == [1, 2]


def test_weights_load_into_a_stage_with_a_new_task(tmp_path) -> None:
    """A schedule's next stage with another task set: the tree loads, the new leaf starts uniform."""
    from mtl.transfer.loading import load_weights

    torch.manual_seed(0)
    make = lambda names: MultiTaskModel(  # noqa: E731
        MLP(input_shape=(6,), hidden=(4, 4)), [Task(t, num_classes=3) for t in names], sharing=LTB
    )
    before = make(["a", "b"])
    with torch.no_grad():
        before.sharing.branch_logits[0].add_(1.0)
    before.sharing.steps.fill_(7)
    torch.save(before.state_dict(), tmp_path / "w.pt")
    after = make(["a", "b", "c"])
    report = load_weights(after, tmp_path / "w.pt")
    assert "sharing.leaves.c.logits" in report.missing
    torch.testing.assert_close(after.sharing.branch_logits[0], before.sharing.branch_logits[0])
    assert int(after.sharing.steps) == 7  # the temperature schedule continues
    torch.testing.assert_close(after.sharing.leaves["c"].logits.detach(), torch.zeros(2))
