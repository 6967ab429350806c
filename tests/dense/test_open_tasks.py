"""The README's open-task example, run as written: a plain pl.Trainer, one task with its own head,
loss and torchmetrics metric, one built-in task; and what its checkpoint holds."""

from __future__ import annotations

import dataclasses

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from mtl import MultiTaskModel, MultiTaskModule, Task
from mtl.backbones import CNN
from mtl.data import ScenesDataModule


class DepthHead(nn.Module):  # reads the feature map, predicts at the input size
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, features, size):
        return F.interpolate(self.conv(features), size=size, mode="bilinear").exp()


def test_readme_example_trains_with_a_plain_trainer(tmp_path):
    torch.manual_seed(0)
    # --- the README example -----------------------------------------------------------------
    depth = Task("depth", kind="depth", head=DepthHead,  # a factory: channels -> module
                 loss=lambda pred, target: (pred.log() - target.log()).abs().mean(),  # labelled pixels only, [N]
                 metrics={"rmse": torchmetrics.MeanSquaredError(squared=False)})  # lower is better: its own
    segmentation = Task("segmentation", kind="segmentation", num_classes=6)  # built-in
    data = ScenesDataModule(n_train=64, n_val=16, n_test=16, size=32, batch_size=16,
                            tasks={"depth": depth, "segmentation": segmentation})
    model = MultiTaskModel(CNN(data.input_shape, channels=[8, 16], max_pools=1), [depth, segmentation])
    trainer = pl.Trainer(max_epochs=2, logger=False, default_root_dir=tmp_path, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(MultiTaskModule(model), datamodule=data)
    # ------------------------------------------------------------------------------------------
    assert isinstance(model.heads["depth"], DepthHead)
    out = trainer.test(verbose=False, ckpt_path=None, datamodule=data, model=trainer.lightning_module)[0]
    assert {"test/depth/rmse", "test/depth/loss", "test/segmentation/miou", "test/segmentation/pix_acc"} <= set(out)
    assert all(torch.isfinite(torch.tensor(v)) for v in out.values())
    assert depth.metric_directions == {"rmse": False, "loss": False} and depth.metric == "rmse"

    # the checkpoint holds plain data: a part given as a Python object becomes a marker that
    # Task(**spec) refuses with a clear error; built-in tasks rebuild equal
    ckpt = next(tmp_path.rglob("*.ckpt"))
    meta = torch.load(ckpt, map_location="cpu", weights_only=True)["mtl"]["tasks"]
    assert meta["depth"]["head"] == {"_target_": f"{__name__}.DepthHead", "_partial_": True}
    assert meta["depth"]["loss"] == {"_object_": "builtins.function"}
    assert Task(**meta["segmentation"]) == segmentation
    with pytest.raises(ValueError, match=r"Python object .*Declare the loss as config"):
        Task(**meta["depth"])


def test_custom_loss_and_metrics_get_labelled_elements_only():
    seen = {}

    def loss(out, y):
        seen["loss"] = (out.shape, y.shape)
        return (out - y).abs().mean()

    task = Task("depth", kind="depth", loss=loss, metrics={"mae": torchmetrics.MeanAbsoluteError()})
    pred = torch.ones(2, 1, 3, 3, requires_grad=True)
    target = torch.full((2, 1, 3, 3), 2.0)
    target[0, 0, 0, :] = 0.0  # three unlabelled pixels
    target[1, 0, 1, 1] = float("nan")  # one more
    value = task.loss(pred, target)
    assert seen["loss"] == ((14,), (14,)) and value.item() == pytest.approx(1.0)
    value.backward()
    assert pred.grad[0, 0, 0].abs().sum() == 0 and torch.isfinite(pred.grad).all()
    metrics = task.make_metrics()
    metrics.update(*task.metric_inputs(pred, target))
    assert metrics.compute()["mae"].item() == pytest.approx(1.0)
    empty = torch.zeros(2, 1, 3, 3)
    assert task.loss(pred, empty).item() == 0.0 and task.metric_inputs(pred, empty) is None

    # vector kinds: the labelled rows, raw outputs (logits)
    rows = Task("c", num_classes=3, loss=lambda o, y: F.cross_entropy(o, y, label_smoothing=0.1),
                metrics={"top2": torchmetrics.Accuracy(task="multiclass", num_classes=3, top_k=2)})
    logits, y = torch.randn(4, 3), torch.tensor([0, -100, 2, 1])
    keep = y != -100
    assert rows.loss(logits, y).item() == pytest.approx(F.cross_entropy(logits[keep], y[keep], label_smoothing=0.1).item())
    out, target = rows.metric_inputs(logits, y)
    assert out.shape == (3, 3) and target.tolist() == [0, 2, 1]
    assert rows.metric_directions == {"top2": True, "loss": False}

    # a dense segmentation task's own metric gets flattened pixels: [N, C] logits and [N] labels
    seg = Task("s", kind="segmentation", num_classes=3,
               metrics={"acc": torchmetrics.Accuracy(task="multiclass", num_classes=3)})
    logits, labels = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    labels[0, 0] = -1
    out, target = seg.metric_inputs(logits, labels)
    assert out.shape == (28, 3) and target.shape == (28,) and bool((target >= 0).all())


def test_parts_from_config_rebuild_from_the_saved_spec():
    spec = {
        "kind": "depth",
        "head": {"_target_": "mtl.heads.ConvHead", "_partial_": True, "out_channels": 1, "hidden": 8},
        "loss": {"_target_": "torch.nn.functional.smooth_l1_loss", "_partial_": True},
        "metrics": {"mae": {"_target_": "torchmetrics.MeanAbsoluteError"}},
    }
    from mtl.tasks import tasks_from_config

    task = tasks_from_config({"depth": spec})["depth"]
    saved = dataclasses.asdict(task)
    assert saved["head"] == spec["head"] and saved["metrics"] == spec["metrics"]
    again = Task(**saved)
    assert again == task and again.metric_directions == {"mae": False, "loss": False}
    head = again.build_head(16)
    assert head(torch.randn(2, 16, 4, 4), size=(8, 8)).shape == (2, 1, 8, 8)
    assert again.build_head(16) is not head  # a config builds a fresh head per model
    # objects Hydra already instantiated are described back as configs where possible
    import functools

    from mtl.heads import ConvHead

    obj = Task("d", kind="depth", head=functools.partial(ConvHead, out_channels=1, hidden=8),
               loss=F.smooth_l1_loss, metrics={"mae": torchmetrics.MeanAbsoluteError()})
    saved = dataclasses.asdict(obj)
    assert saved["head"] == {"_target_": "mtl.heads.dense.ConvHead", "_partial_": True, "out_channels": 1, "hidden": 8}
    assert saved["loss"] == {"_target_": "torch.nn.functional.smooth_l1_loss", "_partial_": True}
    assert saved["metrics"] == {"mae": {"_object_": "torchmetrics.regression.mae.MeanAbsoluteError"}}
    assert dataclasses.replace(obj, weight=2.0).head.value is obj.head.value


def test_custom_kind_and_bad_specs_are_clear_errors():
    head = nn.Linear(4, 2)
    task = Task("rank", kind="custom", head=head, loss=lambda o, y: (o - y).pow(2).mean(),
                metrics={"mse": torchmetrics.MeanSquaredError()})
    assert task.build_head(4) is head and task.metric == "mse"
    assert task.loss(torch.zeros(3, 2), torch.ones(3, 2)).item() == 1.0
    with pytest.raises(ValueError, match="kind 'custom' needs its own loss, metrics"):
        Task("x", kind="custom", head=head)
    with pytest.raises(ValueError, match="say whether a higher 'thing' is better"):
        Task("x", kind="regression", metrics={"thing": torchmetrics.MetricCollection({"a": torchmetrics.MeanMetric()})["a"]})
    assert Task("x", kind="regression", metrics={"thing": torchmetrics.MeanMetric()},
                directions={"thing": True}).metric_directions["thing"] is True
    with pytest.raises(ValueError, match="head reads a feature map"):
        Task("s", kind="segmentation", num_classes=3, feature_map=False)
    with pytest.raises(ValueError, match="feature_map=true needs a head of your own"):
        Task("c", num_classes=3, feature_map=True)
    with pytest.raises(ValueError, match="must return a scalar"):
        Task("c", num_classes=3, loss=lambda o, y: o).loss(torch.zeros(2, 3), torch.tensor([0, 1]))
