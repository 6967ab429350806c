"""Dense models: feature-map backbones, dense heads, sharing architectures and balancers on dense tasks."""

from __future__ import annotations

import functools

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mtl import MultiTaskModel, Task
from mtl.backbones import CNN, ResNet
from mtl.balancing import GradientAggregator, JacobianEngine, LossWeighting, aggregators, balanced_backward
from mtl.heads import ASPPHead, ConvHead
from mtl.sharing import CGC, PLE, CrossStitch, DSelectK, HardSharing, MMoE, MTAN, OMoE

from pathlib import Path

from mtl.balancing import weightings

BALANCERS = Path(__file__).resolve().parents[2] / "conf" / "balancer"
AGGREGATORS = sorted(p.stem for p in BALANCERS.glob("*.yaml") if OmegaConf.load(p).method._target_.split(".")[-1] in aggregators.__all__)
WEIGHTINGS = sorted(p.stem for p in BALANCERS.glob("*.yaml") if OmegaConf.load(p).method._target_.split(".")[-1] in weightings.__all__)
SIZE = 16


def build(name: str, num_tasks: int = 3):
    return instantiate(OmegaConf.load(BALANCERS / f"{name}.yaml").method, num_tasks=num_tasks)


def dense_tasks() -> list[Task]:
    return [
        Task("seg", kind="segmentation", num_classes=3),
        Task("depth", kind="depth"),
        Task("normal", kind="normal"),
        Task("cls", num_classes=2),  # a vector task alongside
    ]


def batch(n: int = 2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, SIZE, SIZE, generator=g)
    seg = torch.randint(-1, 3, (n, SIZE, SIZE), generator=g)
    depth = torch.rand(n, 1, SIZE, SIZE, generator=g) + 0.5
    depth[:, :, :2] = 0.0
    normal = torch.nn.functional.normalize(torch.randn(n, 3, SIZE, SIZE, generator=g), dim=1)
    normal[:, :, -1] = 0.0
    return x, {"seg": seg, "depth": depth, "normal": normal, "cls": torch.arange(n) % 2}


def cnn() -> CNN:
    return CNN(input_shape=(3, SIZE, SIZE), channels=[4, 8, 8], max_pools=2)


def losses_of(model: MultiTaskModel, x, ys):
    outputs, rep = model.forward_with_representation(x)
    return {t: model.tasks[t].loss(outputs[t], ys[t]) for t in outputs}, outputs, rep


@pytest.mark.parametrize("sharing", [HardSharing, MTAN, CrossStitch])
def test_dense_heads_on_feature_maps_for_every_structure_that_serves_them(sharing):
    torch.manual_seed(0)
    model = MultiTaskModel(cnn(), dense_tasks(), sharing=sharing)
    assert isinstance(model.heads["seg"], ConvHead) and isinstance(model.heads["cls"], torch.nn.Linear)
    x, ys = batch()
    losses, outputs, rep = losses_of(model, x, ys)
    assert outputs["seg"].shape == (2, 3, SIZE, SIZE) and outputs["depth"].shape == (2, 1, SIZE, SIZE)
    assert outputs["normal"].shape == (2, 3, SIZE, SIZE) and outputs["cls"].shape == (2, 2)
    features = model.sharing(x).features
    assert features["seg"].shape == (2, 8, 4, 4) and features["cls"].shape == (2, 8)
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert (rep is not None) == (sharing is HardSharing)


def test_hard_sharing_representation_is_the_feature_map_and_exact():
    torch.manual_seed(0)
    model = MultiTaskModel(cnn(), dense_tasks())
    x, ys = batch()
    losses, _, rep = losses_of(model, x, ys)
    assert rep.shape == (2, 8, 4, 4)
    params = list(model.backbone.parameters())
    for loss in losses.values():
        g_rep = torch.autograd.grad(loss, rep, retain_graph=True)[0]
        direct = torch.autograd.grad(loss, params, retain_graph=True)
        through = torch.autograd.grad(rep, params, grad_outputs=g_rep, retain_graph=True)
        for a, b in zip(direct, through):
            torch.testing.assert_close(a, b)
    # vector tasks alone still get the pooled vector, as without dense tasks
    _, rep = model.forward_with_representation(x, ["cls"])
    assert rep.shape == (2, 8)


@pytest.mark.parametrize("sharing", [MMoE, OMoE, CGC, PLE, DSelectK])
def test_mixtures_of_experts_refuse_dense_tasks(sharing):
    with pytest.raises(ValueError, match=r"cannot serve tasks whose head reads a feature map .*sharing=hard"):
        MultiTaskModel(cnn(), dense_tasks(), sharing=sharing)
    with pytest.raises(ValueError, match="sharing.feature_maps=false"):
        MultiTaskModel(cnn(), dense_tasks(), sharing=functools.partial(MTAN, feature_maps=False))


def test_dense_head_option_and_vector_backbone_error():
    model = MultiTaskModel(cnn(), dense_tasks()[:1], dense_head=functools.partial(ASPPHead, rates=(1, 2), hidden=8))
    assert isinstance(model.heads["seg"], ASPPHead)
    assert model(torch.randn(2, 3, 20, 12))["seg"].shape == (2, 3, 20, 12)  # any input size
    from mtl.backbones import MLP

    model = MultiTaskModel(MLP(input_shape=(12,), hidden=[8]), [Task("d", kind="depth")])
    with pytest.raises(ValueError, match="convolutional backbone"):
        model(torch.randn(2, 12))


def test_resnet_output_stride_dilates_the_last_stages():
    net = ResNet(input_shape=(3, 64, 64), depth=10, width=4, small_input=False, output_stride=8)
    assert net.dilations == [1, 1, 2, 4]
    assert [o.shape[-1] for o in net.forward_stages(torch.randn(1, 3, 64, 64))] == [16, 8, 8, 8]
    plain = ResNet(input_shape=(3, 64, 64), depth=10, width=4, small_input=False)
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in plain.parameters())
    os16 = ResNet(input_shape=(3, 64, 64), depth=50, width=4, small_input=False, output_stride=16)
    assert os16.dilations == [1, 1, 1, 2] and os16.stage_channels == [16, 32, 64, 128]
    assert os16.forward_stages(torch.randn(1, 3, 64, 64))[-1].shape == (1, 128, 4, 4)
    assert sum(p.numel() for p in ResNet(depth=50, small_input=False).parameters()) == 23_508_032
    with pytest.raises(ValueError, match="power of 2 of at least 4"):
        ResNet(depth=10, small_input=False, output_stride=2)


def test_resnet_loads_torchvision_layout_weights(tmp_path):
    net = ResNet(input_shape=(3, 32, 32), depth=10, width=4, small_input=False)
    own = net.state_dict()
    inverse = {}
    for key in own:  # this backbone's keys written the torchvision way
        parts = key.split(".")
        if key.startswith("stages.0.0."):
            name = ("conv1." if parts[3] == "0" else "bn1.") + ".".join(parts[4:])
        elif key.startswith("stages.0.1."):
            name = "layer1." + ".".join(parts[3:])
        else:
            name = f"layer{int(parts[1]) + 1}." + ".".join(parts[2:])
        inverse[name.replace("shortcut.", "downsample.")] = torch.randn_like(own[key].float()).to(own[key].dtype)
    inverse["fc.weight"] = torch.zeros(10, 32)
    torch.save(inverse, tmp_path / "resnet10.pth")
    loaded = ResNet(input_shape=(3, 32, 32), depth=10, width=4, small_input=False, output_stride=8,
                    pretrained_path=str(tmp_path / "resnet10.pth"))
    assert torch.equal(loaded.stages[3][0].conv1.weight, inverse["layer4.0.conv1.weight"])
    assert torch.equal(loaded.stages[0][0][0].weight, inverse["conv1.weight"])
    with pytest.raises(ValueError, match="small_input=false"):
        ResNet(input_shape=(3, 32, 32), depth=10, width=4, pretrained_path=str(tmp_path / "resnet10.pth"))


def test_cnn_max_pools_keeps_resolution():
    net = CNN(input_shape=(3, 32, 32), channels=[4, 8, 8, 8], max_pools=2)
    assert [o.shape[-1] for o in net.forward_stages(torch.randn(1, 3, 32, 32))] == [16, 8, 8, 8]
    assert CNN(input_shape=(3, 32, 32), channels=[4, 8], max_pools=0).forward_stages(torch.randn(1, 3, 32, 32))[-1].shape[-1] == 32


def _dense_model() -> MultiTaskModel:
    torch.manual_seed(0)
    return MultiTaskModel(CNN(input_shape=(3, SIZE, SIZE), channels=[4, 8], max_pools=1), dense_tasks()[:3])


@pytest.mark.parametrize("space", ["params", "representation"])
@pytest.mark.parametrize("name", AGGREGATORS)
def test_every_aggregator_balances_dense_tasks(name, space):
    if name == "dbmtl" and space == "representation":
        pytest.skip("DB-MTL keeps a [T, P] moving average; P changes with the batch in representation space")
    model = _dense_model()
    x, ys = batch()
    losses, _, rep = losses_of(model, x, ys)
    vec = torch.stack([losses[t] for t in model.task_names])
    shared = model.shared_parameters()
    ids = {id(p) for p in shared}
    own = [p for p in model.parameters() if id(p) not in ids]
    aggregator = build(name)
    assert isinstance(aggregator, GradientAggregator)
    stats = balanced_backward(vec, aggregator, shared, own, engine=JacobianEngine(space=space), representations=[rep])
    assert stats.grad_norms.shape == (3,) and torch.isfinite(stats.grad_norms).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in shared)
    assert all(p.grad is not None for p in own)


@pytest.mark.parametrize("name", WEIGHTINGS)
def test_every_loss_weighting_balances_dense_tasks(name):
    model = _dense_model()
    x, ys = batch()
    losses, _, _ = losses_of(model, x, ys)
    weighting = build(name)
    assert isinstance(weighting, LossWeighting)
    last = [p for p in model.backbone.stages[-1].parameters()] if weighting.needs_shared_parameters else None
    total, weights = weighting.weighted_loss(torch.stack(list(losses.values())), shared_parameters=last)
    total.backward()
    assert torch.isfinite(total) and all(torch.isfinite(p.grad).all() for p in model.backbone.parameters())


def test_model_configs_instantiate_dense_heads():
    conf = Path(__file__).resolve().parents[2] / "conf" / "model"
    cfg = OmegaConf.merge(OmegaConf.load(conf / "default.yaml"), OmegaConf.load(conf / "aspp.yaml"))
    cfg.pop("defaults", None)
    cfg.dense_head.rates = [1, 2]
    cfg.dense_head.hidden = 8
    model = instantiate(cfg, backbone=cnn(), tasks=dense_tasks(), _convert_="all")
    assert isinstance(model.heads["depth"], ASPPHead) and model.heads["cls"][0].out_features == 128
    default = instantiate(OmegaConf.load(conf / "default.yaml"), backbone=cnn(), tasks=dense_tasks(), _convert_="all")
    assert isinstance(default.heads["depth"], ConvHead)


def test_every_balancer_preset_is_covered():
    assert set(AGGREGATORS) >= {"pcgrad", "upgrad", "mgda", "cagrad"} and "ew" in WEIGHTINGS
    assert len(AGGREGATORS) + len(WEIGHTINGS) == len(list(BALANCERS.glob("*.yaml")))


@pytest.mark.parametrize("balancer, space", [("upgrad", "representation"), ("pcgrad", "params"), ("uw", None)])
def test_module_trains_dense_tasks_with_balancers(balancer, space):
    import pytorch_lightning as pl

    from mtl import MultiTaskModule
    from mtl.data import ScenesDataModule

    data = ScenesDataModule(n_train=16, n_val=4, n_test=4, size=16, batch_size=8)
    model = MultiTaskModel(CNN(data.input_shape, channels=[4, 8], max_pools=1), data.tasks)
    before = model.backbone.stages[0].conv.weight.clone()
    engine = JacobianEngine(space=space) if space else None
    module = MultiTaskModule(model, balancer=build(balancer), engine=engine)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, datamodule=data)
    assert not torch.equal(before, model.backbone.stages[0].conv.weight)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert {"val/segmentation/miou", "val/depth/abs_err", "val/normal/median_angle"} <= set(trainer.callback_metrics)
