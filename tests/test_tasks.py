import math

import pytest
import torch
import torch.nn.functional as F

from mtl.tasks import KIND_METRICS, Task, tasks_from_config


def test_multiclass_loss_ignores_missing_labels():
    task = Task("a", num_classes=3)
    out = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]])
    y = torch.tensor([0, -100, 2])
    expected = F.cross_entropy(out[[0, 2]], y[[0, 2]])
    assert torch.allclose(task.loss(out, y), expected)


def test_regression_loss_ignores_nan():
    task = Task("r", kind="regression")
    out = torch.tensor([[1.0], [2.0], [3.0]])
    y = torch.tensor([1.0, float("nan"), 5.0])
    assert task.loss(out, y).item() == pytest.approx((0 + 4) / 2)


def test_all_missing_gives_zero_loss_with_graph():
    task = Task("a", num_classes=3)
    out = torch.randn(4, 3, requires_grad=True)
    loss = task.loss(out, torch.full((4,), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(out.grad, torch.zeros_like(out))
    assert task.metric_inputs(out, torch.full((4,), -100)) is None


def test_out_of_range_label_names_task_and_value():
    task = Task("digit", num_classes=10)
    with pytest.raises(ValueError, match=r"Task 'digit': label 12 is out of range \[0, 10\)"):
        task.check_targets(torch.tensor([1, 12, -100]))
    with pytest.raises(ValueError, match="'flag'.*label 2"):
        Task("flag", kind="binary").check_targets(torch.tensor([0.0, 2.0]))
    task.check_targets(torch.tensor([0, 9, -100]))  # in range and missing: fine


def test_kinds_sizes_and_metrics():
    assert Task("a", num_classes=4).output_size == 4
    assert Task("b", kind="binary").output_size == 1
    assert Task("c", kind="multilabel", num_classes=5).output_size == 5
    assert Task("d", kind="regression", out_features=3).output_size == 3
    def computed(task, out, y):
        metrics = task.make_metrics()
        metrics.update(*task.metric_inputs(out, y))
        return set(metrics.compute())

    assert computed(Task("a", num_classes=4), torch.randn(3, 4), torch.tensor([0, 3, 1])) == {"acc", "f1"}
    assert computed(Task("b", kind="binary"), torch.randn(2, 1), torch.tensor([0.0, 1.0])) == {"acc", "auroc"}
    assert computed(Task("d", kind="regression"), torch.randn(2, 1), torch.tensor([0.0, 1.0])) == {"mae", "rmse"}
    for kind, n in (("multiclass", 4), ("binary", None), ("multilabel", 3), ("regression", None)):
        assert set(Task("x", kind=kind, num_classes=n).metric_directions) - {"loss"} == set(KIND_METRICS[kind])
    assert Task("a", num_classes=4).metric_directions == {"acc": True, "f1": True, "loss": False}
    assert Task("d", kind="regression").metric_directions == {"mae": False, "rmse": False, "loss": False}


def test_binary_and_multilabel_metrics_on_masked_examples():
    task = Task("b", kind="binary")
    out = torch.tensor([[3.0], [-3.0], [0.5]])
    y = torch.tensor([1.0, 0.0, float("nan")])
    pred, target = task.metric_inputs(out, y)
    assert pred.shape == (2,) and target.tolist() == [1, 0]
    metrics = task.make_metrics()
    metrics.update(pred, target)
    assert metrics.compute()["acc"].item() == 1.0
    ml = Task("m", kind="multilabel", num_classes=2)
    out = torch.tensor([[2.0, -2.0], [0.0, 0.0]])
    y = torch.tensor([[1.0, 0.0], [float("nan"), 1.0]])
    assert ml.loss(out, y).item() == pytest.approx(F.binary_cross_entropy_with_logits(out[:1], y[:1]).item())


def test_bad_task_specs():
    with pytest.raises(ValueError, match="kind must be one of"):
        Task("a", kind="ranking")
    with pytest.raises(ValueError, match="needs num_classes"):
        Task("a", kind="multiclass")
    with pytest.raises(ValueError, match="data.tasks.a"):
        tasks_from_config({"a": {"kind": "multiclass", "num_classes": 3, "colour": "red"}})
    tasks = tasks_from_config({"a": {"num_classes": 3}, "r": {"kind": "regression"}})
    assert tasks["a"].metric == "acc" and tasks["r"].metric == "mae" and math.isclose(tasks["r"].weight, 1.0)


def test_class_names_give_num_classes_and_are_checked():
    task = Task("c", kind="multiclass", class_names=["blue", "green", "red"])
    assert task.num_classes == 3 and Task(**task.to_dict()).class_names == ["blue", "green", "red"]
    binary = Task("b", kind="binary", class_names=["no", "yes"])
    assert binary.predict(torch.tensor([[2.0], [-1.0]])).tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"2 class_names \['a', 'b'\] for 3 classes"):
        Task("c", kind="multiclass", num_classes=3, class_names=["a", "b"])
    with pytest.raises(ValueError, match="repeat a name"):
        Task("c", kind="multiclass", class_names=["a", "a"])
    with pytest.raises(ValueError, match="class_names are for multiclass, binary and multilabel"):
        Task("r", kind="regression", class_names=["a", "b"])


def test_standardised_regression_trains_on_z_scores_and_reports_original_units():
    task = Task("p", kind="regression", target_mean=1000.0, target_std=50.0)
    y = torch.tensor([1000.0, 1100.0, float("nan")])
    out = torch.tensor([[0.0], [2.0], [7.0]])  # the head predicts (y - mean) / std
    assert task.loss(out, y).item() == pytest.approx(0.0)
    pred, target = task.metric_inputs(out, y)
    assert pred.tolist() == [1000.0, 1100.0] and target.tolist() == [1000.0, 1100.0]
    assert task.predict(out)[:, 0].tolist() == [1000.0, 1100.0, 1350.0]
    seen = []
    custom = Task("q", kind="regression", target_mean=1000.0, target_std=50.0, loss=lambda o, t: seen.append(t) or (o - t).abs().mean())
    custom.loss(out, y)
    assert seen[0].tolist() == [0.0, 2.0]  # your loss gets standardised targets too
    saved = Task(**task.to_dict())
    assert (saved.target_mean, saved.target_std) == (1000.0, 50.0)
    assert Task("r", kind="regression").predict(out)[:, 0].tolist() == [0.0, 2.0, 7.0]  # default: no scaling


def test_bad_target_scales_are_refused():
    with pytest.raises(ValueError, match="set both target_mean and target_std"):
        Task("r", kind="regression", target_mean=1.0)
    with pytest.raises(ValueError, match=r"target_std=\[0.0\] must be finite and > 0"):
        Task("r", kind="regression", target_mean=1.0, target_std=0.0)
    with pytest.raises(ValueError, match="are for regression tasks"):
        Task("c", kind="binary", target_mean=1.0, target_std=2.0)
    with pytest.raises(ValueError, match="has 3 values for 2 outputs"):
        Task("r", kind="regression", out_features=2, target_mean=[1.0, 2.0, 3.0], target_std=1.0)
