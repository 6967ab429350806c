"""The dense task kinds: losses, metrics, missing labels, directions, saved form."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from mtl.dense_losses import depth_loss, normal_loss, segmentation_loss
from mtl.metrics.dense import DENSE_METRIC_DIRECTIONS
from mtl.tasks import Task, tasks_from_config


def test_segmentation_kind_uses_ignore_index_minus_one():
    task = Task("seg", kind="segmentation", num_classes=3)
    assert task.ignore_index == -1 and task.output_size == 3 and task.feature_map and task.metric == "miou"
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    y = torch.randint(0, 3, (2, 4, 4))
    y[0] = -1  # the whole first image is unlabelled
    assert torch.allclose(task.loss(logits, y), F.cross_entropy(logits[1:], y[1:]))
    assert task.label_mask(y).tolist() == [False, True]
    metrics = task.make_metrics()
    metrics.update(*task.metric_inputs(logits, y))
    out = metrics.compute()
    assert set(out) == {"miou", "pix_acc"}
    expected = (logits[1].argmax(0) == y[1]).double().mean()
    assert out["pix_acc"].item() == pytest.approx(expected.item())
    task.check_targets(y)
    with pytest.raises(ValueError, match=r"pixel label 5 is out of range \[0, 3\)"):
        task.check_targets(torch.full((1, 2, 2), 5))
    with pytest.raises(ValueError, match=r"targets must be \[B, H, W\]"):
        task.check_targets(torch.zeros(2, 4))


def test_depth_and_normal_kinds_skip_zero_and_nan_pixels():
    depth = Task("d", kind="depth")
    pred = torch.ones(1, 1, 2, 2, requires_grad=True)
    target = torch.tensor([[[[0.0, 2.0], [float("nan"), 3.0]]]])
    assert depth.loss(pred, target).item() == pytest.approx((1 + 2) / 2)
    assert torch.equal(depth.loss(pred, target), depth_loss(pred, target))
    m = depth.make_metrics()
    m.update(*depth.metric_inputs(pred, target))
    assert m.compute()["abs_err"].item() == pytest.approx(1.5)
    assert m.compute()["rel_err"].item() == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert depth.metric_inputs(pred, torch.zeros(1, 1, 2, 2)) is None
    assert depth.loss(pred, torch.zeros(1, 2, 2)).item() == 0.0  # [B, H, W] targets work too

    normal = Task("n", kind="normal")
    p = torch.zeros(1, 3, 1, 2)
    p[0, 2] = 1.0  # both predictions point along z
    t = torch.zeros(1, 3, 1, 2)
    t[0, 0, 0, 0] = 1.0  # 90 degrees off; the second pixel is unlabelled (zero vector)
    assert normal.loss(p, t).item() == pytest.approx(1.0)
    assert torch.equal(normal.loss(p, t), normal_loss(p, t))
    m = normal.make_metrics()
    m.update(*normal.metric_inputs(p, t))
    out = m.compute()
    assert out["mean_angle"].item() == pytest.approx(90.0) and out["within_30"].item() == 0.0
    assert set(out) == {"mean_angle", "median_angle", "within_11_25", "within_22_5", "within_30"}
    assert normal.label_mask(t).tolist() == [True]
    with pytest.raises(ValueError, match=r"targets must be \[B, 3, H, W\]"):
        normal.check_targets(torch.zeros(1, 2, 2))


def test_dense_directions_and_missing_values():
    for kind, names in (
        ("segmentation", ("miou", "pix_acc")),
        ("depth", ("abs_err", "rel_err")),
        ("normal", ("mean_angle", "median_angle", "within_11_25", "within_22_5", "within_30")),
    ):
        task = Task(kind, kind=kind, num_classes=4 if kind == "segmentation" else None)
        assert task.metric_directions == {**{n: DENSE_METRIC_DIRECTIONS[n] for n in names}, "loss": False}
    assert Task("s", kind="segmentation", num_classes=4).missing_value == -1.0
    assert Task("d", kind="depth").missing_value == 0.0 and Task("n", kind="normal").missing_value == 0.0
    assert math.isnan(Task("r", kind="regression").missing_value)
    assert Task("c", num_classes=3).missing_value == -100.0


def test_dense_tasks_from_config_and_saved_form_round_trip():
    tasks = tasks_from_config({
        "segmentation": {"kind": "segmentation", "num_classes": 13},
        "depth": {"kind": "depth", "weight": 2.0},
        "normal": {"kind": "normal", "metric": "median_angle"},
    })
    for task in tasks.values():
        spec = dataclasses.asdict(task)
        assert spec["head"] is None and spec["loss"] is None and spec["metrics"] is None
        torch.save(spec, "/dev/null")  # plain data
        assert Task(**spec) == task
    assert tasks["normal"].metric == "median_angle" and tasks["depth"].weight == 2.0
    with pytest.raises(ValueError, match="metric 'acc' is not one of"):
        Task("d", kind="depth", metric="acc")
    with pytest.raises(ValueError, match="needs num_classes"):
        Task("s", kind="segmentation")


def test_dense_losses_match_the_functions():
    logits = torch.randn(2, 4, 3, 3)
    y = torch.randint(-1, 4, (2, 3, 3))
    assert torch.equal(Task("s", kind="segmentation", num_classes=4).loss(logits, y), segmentation_loss(logits, y, -1))
