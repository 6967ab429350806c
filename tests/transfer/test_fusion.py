"""Prediction ensembles and uniform model soups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtl.tasks import Task
from mtl.transfer.fusion import average_predictions, uniform_soup

KINDS = {"digit": "multiclass", "odd": "binary", "tags": "multilabel", "size": "regression"}


def _outputs(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "digit": torch.randn(4, 3, generator=g),
        "odd": torch.randn(4, 1, generator=g),
        "tags": torch.randn(4, 2, generator=g),
        "size": torch.randn(4, 2, generator=g),
    }


def test_average_of_two_models_is_the_mean_probability() -> None:
    a, b = _outputs(0), _outputs(1)
    fused = average_predictions([a, b], KINDS)
    assert list(fused) == list(a)
    mean_soft = (a["digit"].softmax(-1) + b["digit"].softmax(-1)) / 2
    assert torch.allclose(fused["digit"].exp(), mean_soft, atol=1e-6)
    assert torch.allclose(fused["digit"].softmax(-1), mean_soft, atol=1e-6)  # usable as logits
    for task in ("odd", "tags"):
        mean_sig = (a[task].sigmoid() + b[task].sigmoid()) / 2
        assert torch.allclose(fused[task].sigmoid(), mean_sig, atol=1e-6)
    assert torch.allclose(fused["size"], (a["size"] + b["size"]) / 2)


def test_hand_value_and_single_model() -> None:
    # binary: sigmoid(0) = 0.5 and sigmoid(large) ~ 1 -> mean 0.75 -> logit log 3
    fused = average_predictions([{"odd": torch.tensor([[0.0]])}, {"odd": torch.tensor([[50.0]])}], KINDS)
    assert fused["odd"].item() == pytest.approx(torch.tensor(3.0).log().item(), abs=1e-5)
    # one model: probabilities unchanged; saturated logits stay finite
    one = {"digit": torch.tensor([[100.0, -100.0, 0.0]]), "odd": torch.tensor([[-200.0]])}
    fused = average_predictions([one], KINDS)
    assert torch.allclose(fused["digit"].softmax(-1), one["digit"].softmax(-1))
    assert torch.isfinite(fused["odd"]).all() and fused["odd"].item() == pytest.approx(-200.0)


def test_fused_outputs_go_through_task_loss_and_metrics() -> None:
    task = Task("digit", kind="multiclass", num_classes=3)
    fused = average_predictions([_outputs(0), _outputs(1)], KINDS)
    y = torch.tensor([0, 1, 2, 1])
    loss = task.loss(fused["digit"], y)
    p = fused["digit"].exp()
    assert loss.item() == pytest.approx(-p[torch.arange(4), y].log().mean().item(), rel=1e-6)
    assert task.metric_inputs(fused["digit"], y) is not None


def test_average_predictions_errors() -> None:
    with pytest.raises(ValueError, match="at least one model"):
        average_predictions([], KINDS)
    with pytest.raises(ValueError, match="model 1 predicts tasks"):
        average_predictions([_outputs(0), {"digit": torch.zeros(4, 3)}], KINDS)
    with pytest.raises(ValueError, match="no kind given"):
        average_predictions([_outputs(0)], {"digit": "multiclass"})
    with pytest.raises(ValueError, match="differ in shape"):
        average_predictions([{"digit": torch.zeros(4, 3)}, {"digit": torch.zeros(4, 2)}], KINDS)


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_soup_of_identical_dicts_is_identity() -> None:
    net = _net()
    sd = net.state_dict()
    soup = uniform_soup([sd, sd, sd])
    assert list(soup) == list(sd)
    for k in sd:
        assert torch.equal(soup[k], sd[k]), k
    net.load_state_dict(soup)  # loads strictly, metadata kept
    assert soup._metadata == sd._metadata


def test_soup_of_two_dicts_is_their_mean() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([1.0], dtype=torch.float16),
         "num_batches_tracked": torch.tensor(3), "flag": torch.tensor([True])}
    b = {"w": torch.tensor([3.0, 6.0]), "h": torch.tensor([2.0], dtype=torch.float16),
         "num_batches_tracked": torch.tensor(8), "flag": torch.tensor([False])}
    soup = uniform_soup([a, b])
    assert torch.equal(soup["w"], torch.tensor([2.0, 4.0]))
    assert soup["h"].dtype == torch.float16 and soup["h"].item() == 1.5
    assert soup["num_batches_tracked"].item() == 3  # integer buffers come from the first
    assert soup["flag"].item() is True
    assert soup["w"] is not a["w"]


def test_soup_of_real_models() -> None:
    nets = [_net() for _ in range(3)]
    soup = uniform_soup([n.state_dict() for n in nets])
    expected = sum(n.state_dict()["0.weight"] for n in nets) / 3
    assert torch.allclose(soup["0.weight"], expected)
    _net().load_state_dict(soup)


def test_soup_errors_list_keys_and_shapes() -> None:
    a = {"w": torch.zeros(2), "b": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"state dict 1 lacks 1 key\(s\): \['b'\]"):
        uniform_soup([a, {"w": torch.zeros(2)}])
    with pytest.raises(ValueError, match=r"extra key\(s\): \['c'\]"):
        uniform_soup([a, {**a, "c": torch.zeros(1)}])
    with pytest.raises(ValueError, match=r"w: \(2,\) vs \(3,\)"):
        uniform_soup([a, {"w": torch.zeros(3), "b": torch.zeros(1)}])
    with pytest.raises(ValueError, match="at least one"):
        uniform_soup([])
