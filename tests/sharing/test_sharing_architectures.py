"""Every sharing architecture on every backbone: forward, backward, shared parameters, new tasks."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mtl import MultiTaskModel, Task
from mtl.backbones import CNN, MLP, ResNet
from mtl.sharing import CGC, MMoE, MTAN, OMoE, PLE, CrossStitch, DSelectK, HardSharing

CONF = Path(__file__).resolve().parents[2] / "conf"

BACKBONES = {
    "mlp": (lambda: MLP(input_shape=(12,), hidden=(16, 8)), (12,)),
    "cnn": (lambda: CNN(input_shape=(1, 8, 8), channels=(4, 8)), (1, 8, 8)),
    "resnet": (lambda: ResNet(input_shape=(3, 16, 16), depth=10, width=8), (3, 16, 16)),
}

EXPERTS = {"expert_hidden": [8], "expert_out": 6}
ARCHITECTURES = {
    "hard": (HardSharing, {}),
    "cross_stitch": (CrossStitch, {}),
    "cross_stitch_per_channel": (CrossStitch, {"per_channel": True}),
    "mtan": (MTAN, {}),
    "mmoe": (MMoE, {"num_experts": 3, **EXPERTS}),
    "omoe": (OMoE, {"num_experts": 3, **EXPERTS}),
    "cgc": (CGC, {"num_shared_experts": 2, "num_task_experts": 1, **EXPERTS}),
    "ple": (PLE, {"num_levels": 3, "num_shared_experts": 1, "num_task_experts": 2, **EXPERTS}),
    "dselect_k": (DSelectK, {"num_experts": 4, "k": 2, "entropy_reg": 0.01, **EXPERTS}),
}
#: Architectures whose SharedFeatures.representation is a tensor (the backbone output).
WITH_REPRESENTATION = {"hard", "mmoe", "omoe", "cgc", "ple", "dselect_k"}


def make_tasks(n: int, offset: int = 0) -> list[Task]:
    return [Task(f"task{i}", kind="multiclass", num_classes=3) for i in range(offset, offset + n)]


def make_model(arch: str, backbone: str, num_tasks: int) -> tuple[MultiTaskModel, torch.Tensor]:
    cls, options = ARCHITECTURES[arch]
    build, shape = BACKBONES[backbone]
    model = MultiTaskModel(build(), make_tasks(num_tasks), sharing=functools.partial(cls, **options))
    return model, torch.randn(3, *shape)


def task_losses(model: MultiTaskModel, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    outputs, rep = model.forward_with_representation(x)
    y = torch.arange(x.shape[0]) % 3
    return {t: model.tasks[t].loss(out, y) for t, out in outputs.items()}, rep


def reached(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> list[bool]:
    """Whether ``loss``'s graph reaches each parameter (a dead ReLU can still give a zero gradient)."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [g is not None for g in grads]


@pytest.mark.parametrize("num_tasks", [2, 5])
@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_forward_backward_every_parameter_gets_a_gradient(arch: str, backbone: str, num_tasks: int) -> None:
    torch.manual_seed(0)
    model, x = make_model(arch, backbone, num_tasks)
    losses, rep = task_losses(model, x)
    assert set(losses) == set(model.task_names)
    features = model.sharing(x).features
    assert all(f.shape == (3, model.sharing.out_features) for f in features.values())
    total = sum(losses.values())
    reg = model.sharing.regularization()
    if reg is not None:
        total = total + reg
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert (rep is not None) == (arch in WITH_REPRESENTATION)


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_shared_parameters_are_the_ones_every_task_reaches(arch: str, backbone: str) -> None:
    """Shared parameters get gradient from every task; the others (heads aside) from one task."""
    torch.manual_seed(0)
    model, x = make_model(arch, backbone, 3)
    losses, _ = task_losses(model, x)
    params = [p for p in model.sharing.parameters()]
    shared = {id(p) for p in model.sharing.shared_parameters()}
    assert shared, "an architecture with a backbone always shares something"
    by_task = {t: reached(loss, params) for t, loss in losses.items()}
    names = {id(p): n for n, p in model.sharing.named_parameters()}
    for i, p in enumerate(params):
        count = sum(by_task[t][i] for t in losses)
        if id(p) in shared:
            assert count == len(losses), f"shared {names[id(p)]} reached by {count} tasks"
        else:
            assert count == 1, f"task-specific {names[id(p)]} reached by {count} tasks"


@pytest.mark.parametrize("backbone", ["mlp", "resnet"])
@pytest.mark.parametrize("arch", sorted(WITH_REPRESENTATION))
def test_representation_is_exact(arch: str, backbone: str) -> None:
    """The gradient through the representation equals the true gradient on the backbone."""
    torch.manual_seed(0)
    model, x = make_model(arch, backbone, 2)
    losses, rep = task_losses(model, x)
    assert rep is not None and rep.shape == (3, model.backbone.out_features)
    params = list(model.backbone.parameters())
    for loss in losses.values():
        g_rep = torch.autograd.grad(loss, rep, retain_graph=True)[0]
        assert g_rep.shape == rep.shape
        direct = torch.autograd.grad(loss, params, retain_graph=True)
        through = torch.autograd.grad(rep, params, grad_outputs=g_rep, retain_graph=True)
        for a, b in zip(direct, through):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("arch", ["cross_stitch", "mtan"])
def test_no_representation_for_column_and_attention_architectures(arch: str) -> None:
    model, x = make_model(arch, "cnn", 2)
    assert model.sharing(x).representation is None


@pytest.mark.parametrize("name", ["hard", "cross_stitch", "mtan", "mmoe", "omoe", "cgc", "ple", "dselect_k"])
def test_configs_instantiate(name: str) -> None:
    from hydra.utils import instantiate

    cfg = OmegaConf.load(CONF / "sharing" / f"{name}.yaml")
    factory = instantiate(cfg)
    model = MultiTaskModel(MLP(input_shape=(12,), hidden=(16,)), make_tasks(2), sharing=factory)
    assert model(torch.randn(2, 12))["task1"].shape == (2, 3)


def test_resnet_config_instantiates() -> None:
    from hydra.utils import instantiate

    cfg = OmegaConf.load(CONF / "backbone" / "resnet.yaml")
    cfg.width = 8
    cfg.depth = 10
    backbone = instantiate(cfg)
    assert isinstance(backbone, ResNet) and backbone.out_features == 64
