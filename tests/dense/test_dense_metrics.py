"""Dense metrics on hand-checkable tensors, and split-level accumulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchmetrics

from mtl.metrics import (
    DENSE_METRIC_DIRECTIONS,
    DepthErrors,
    NormalErrors,
    SegmentationMetrics,
    angular_error,
    dense_metric_direction,
)


def _values(metric) -> dict[str, float]:
    return {k: float(v) for k, v in metric.compute().items()}


def _unit(angle_deg: float) -> list[float]:
    """A unit vector at ``angle_deg`` from +z, in the x-z plane."""
    a = math.radians(angle_deg)
    return [math.sin(a), 0.0, math.cos(a)]


def _normal_maps(pred_vectors, target_vectors) -> tuple[torch.Tensor, torch.Tensor]:
    """``[1, 3, 1, N]`` maps from lists of 3-vectors."""
    p = torch.tensor(pred_vectors, dtype=torch.float32).T.reshape(1, 3, 1, -1)
    t = torch.tensor(target_vectors, dtype=torch.float32).T.reshape(1, 3, 1, -1)
    return p, t


# ------------------------------------------------------------------------------ segmentation
def test_two_class_confusion_matrix():
    target = torch.tensor([[[0, 0], [1, 1]]])
    pred = torch.tensor([[[0, 1], [1, 1]]])
    m = SegmentationMetrics(num_classes=2)
    m.update(pred, target)
    assert m.confmat.tolist() == [[1, 1], [0, 2]]
    v = _values(m)
    # IoU_0 = 1 / (1 + 1 + 0), IoU_1 = 2 / (2 + 0 + 1)
    assert v["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert v["pix_acc"] == pytest.approx(3 / 4)


def test_logits_and_labels_agree():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 6)
    target = torch.randint(0, 4, (2, 5, 6))
    a, b = SegmentationMetrics(4), SegmentationMetrics(4)
    a.update(logits, target)
    b.update(logits.argmax(1), target)
    assert torch.equal(a.confmat, b.confmat)


def test_ignore_index_pixel_is_skipped_whatever_is_predicted():
    target = torch.tensor([[[0, 0], [1, -1]]])
    pred = torch.tensor([[[0, 0], [1, 0]]])
    m = SegmentationMetrics(num_classes=2, ignore_index=-1)
    m.update(pred, target)
    assert int(m.confmat.sum()) == 3
    v = _values(m)
    assert v["miou"] == pytest.approx(1.0) and v["pix_acc"] == pytest.approx(1.0)


def test_miou_averages_over_classes_in_target_or_prediction():
    # class 2 occurs nowhere: left out; class 1 is predicted but never in the target: IoU 0, kept
    target = torch.tensor([[[0, 0, 0, 0]]])
    pred = torch.tensor([[[0, 0, 0, 1]]])
    m = SegmentationMetrics(num_classes=3)
    m.update(pred, target)
    v = _values(m)
    assert v["miou"] == pytest.approx((3 / 4 + 0.0) / 2)
    assert v["pix_acc"] == pytest.approx(3 / 4)


def test_out_of_range_labels_raise_clearly():
    m = SegmentationMetrics(num_classes=2)
    with pytest.raises(ValueError, match="outside \\[0, 2\\)"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 5))
    with pytest.raises(ValueError, match="channels"):
        m.update(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))


def test_nothing_labelled_gives_nan():
    m = SegmentationMetrics(num_classes=2)
    m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), -1))
    assert all(math.isnan(x) for x in _values(m).values())


# ------------------------------------------------------------------------------ depth
def test_depth_errors_skip_zero_and_nan_targets():
    target = torch.tensor([[[[2.0, 4.0], [0.0, float("nan")]]]])  # [1, 1, 2, 2]
    pred = torch.tensor([[[[1.0, 5.0], [9.0, 9.0]]]])
    m = DepthErrors()
    m.update(pred, target)
    v = _values(m)
    assert v["abs_err"] == pytest.approx((1 + 1) / 2)
    assert v["rel_err"] == pytest.approx((1 / 2 + 1 / 4) / 2)


def test_depth_accepts_channel_or_no_channel_maps():
    target = torch.rand(2, 3, 4) + 0.5
    pred = torch.rand(2, 3, 4) + 0.5
    a, b = DepthErrors(), DepthErrors()
    a.update(pred, target)
    b.update(pred[:, None], target[:, None])
    assert _values(a) == pytest.approx(_values(b))
    with pytest.raises(ValueError, match="cover different pixels"):
        a.update(pred[:, :2], target)


def test_depth_is_a_per_pixel_mean_over_the_split():
    # batches with different numbers of labelled pixels: the split mean is not the mean of batch means
    m = DepthErrors()
    m.update(torch.tensor([[3.0, 0.0]]).reshape(1, 1, 2), torch.tensor([[1.0, 0.0]]).reshape(1, 1, 2))
    m.update(torch.ones(1, 1, 3), torch.ones(1, 1, 3))
    assert _values(m)["abs_err"] == pytest.approx(2.0 / 4)


def test_nan_depth_prediction_poisons_the_metric():
    m = DepthErrors()
    m.update(torch.tensor([[[float("nan"), 1.0]]]), torch.tensor([[[1.0, 1.0]]]))
    assert math.isnan(_values(m)["abs_err"])


# ------------------------------------------------------------------------------ normals
def test_known_angles_0_90_180():
    pred, target = _normal_maps(
        [[0, 0, 1], [1, 0, 0], [0, 0, -1], [0, 1, 0]],
        [[0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 0]],  # last pixel unlabelled
    )
    angles = angular_error(pred, target)[0, 0]
    assert angles[:3].tolist() == pytest.approx([0.0, 90.0, 180.0], abs=1e-4)
    m = NormalErrors()
    m.update(pred, target)
    v = _values(m)
    assert int(m.count) == 3
    assert v["mean_angle"] == pytest.approx(90.0, abs=1e-4)
    assert v["median_angle"] == pytest.approx(90.0, abs=m.median_error_bound)
    assert v["within_11_25"] == pytest.approx(1 / 3)
    assert v["within_22_5"] == pytest.approx(1 / 3)
    assert v["within_30"] == pytest.approx(1 / 3)


def test_11_25_boundary_and_prediction_length():
    target = [_unit(0.0)] * 4
    pred = [_unit(11.24), _unit(11.26), _unit(22.49), _unit(29.99)]
    pred = [[5 * x for x in v] for v in pred]  # predictions are normalised: length is irrelevant
    p, t = _normal_maps(pred, target)
    m = NormalErrors()
    m.update(p, t)
    v = _values(m)
    assert v["within_11_25"] == pytest.approx(1 / 4)
    assert v["within_22_5"] == pytest.approx(3 / 4)
    assert v["within_30"] == pytest.approx(1.0)
    assert v["mean_angle"] == pytest.approx((11.24 + 11.26 + 22.49 + 29.99) / 4, abs=1e-3)


def test_zero_prediction_counts_as_90_degrees():
    p, t = _normal_maps([[0, 0, 0]], [[0, 0, 1]])
    assert float(angular_error(p, t)) == pytest.approx(90.0)


@pytest.mark.parametrize("n", [1001, 1000])  # odd and even counts
def test_histogram_median_within_half_a_bin_of_numpy(n):
    g = torch.Generator().manual_seed(n)
    pred = torch.randn(1, 3, 1, n, generator=g)
    target = torch.randn(1, 3, 1, n, generator=g)
    exact = np.median(angular_error(pred, target).double().numpy())
    for bins in (18000, 180):
        m = NormalErrors(bins=bins)
        m.update(pred, target)
        median = float(m.compute()["median_angle"])
        assert abs(median - exact) <= m.median_error_bound + 1e-9


def test_nan_normal_prediction_poisons_the_metric():
    p, t = _normal_maps([[float("nan"), 0, 1], [0, 0, 1]], [[0, 0, 1], [0, 0, 1]])
    m = NormalErrors()
    m.update(p, t)
    assert all(math.isnan(x) for x in _values(m).values())


def test_normal_shape_errors_are_clear():
    with pytest.raises(ValueError, match="\\[B, 3, H, W\\]"):
        NormalErrors().update(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4))


# ------------------------------------------------------------------------------ accumulation
def _random_batches(seed: int):
    g = torch.Generator().manual_seed(seed)
    seg = [
        (torch.randn(b, 3, 4, 5, generator=g), torch.randint(-1, 3, (b, 4, 5), generator=g))
        for b in (2, 3)
    ]
    depth = []
    for b in (2, 3):
        t = torch.rand(b, 1, 4, 5, generator=g) + 0.1
        t[torch.rand(b, 1, 4, 5, generator=g) < 0.3] = 0.0
        depth.append((torch.rand(b, 1, 4, 5, generator=g), t))
    normal = []
    for b in (2, 3):
        t = torch.randn(b, 3, 4, 5, generator=g)
        t[:, :, 0, 0] = 0.0
        normal.append((torch.randn(b, 3, 4, 5, generator=g), t))
    return seg, depth, normal


@pytest.mark.parametrize(
    "make, which", [(lambda: SegmentationMetrics(3), 0), (DepthErrors, 1), (NormalErrors, 2)]
)
def test_two_updates_equal_one_update_on_the_concatenation(make, which):
    batches = _random_batches(7)[which]
    twice, once = make(), make()
    for p, t in batches:
        twice.update(p, t)
    once.update(torch.cat([p for p, _ in batches]), torch.cat([t for _, t in batches]))
    a, b = _values(twice), _values(once)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-12), k


@pytest.mark.parametrize(
    "make, which", [(lambda: SegmentationMetrics(3), 0), (DepthErrors, 1), (NormalErrors, 2)]
)
def test_states_merge_like_ranks_under_ddp(make, which):
    # every state is a sum: merging two ranks' states equals one metric that saw both batches
    batches = _random_batches(11)[which]
    rank0, rank1, single = make(), make(), make()
    rank0.update(*batches[0])
    rank1.update(*batches[1])
    for p, t in batches:
        single.update(p, t)
    rank0.merge_state(rank1)
    assert _values(rank0) == pytest.approx(_values(single), rel=1e-9)
    for name in rank0._defaults:
        assert rank0._reductions[name] is torchmetrics.utilities.dim_zero_sum, name


def test_reset_clears_the_split():
    m = DepthErrors()
    m.update(torch.ones(1, 2, 2) * 3, torch.ones(1, 2, 2))
    m.reset()
    m.update(torch.ones(1, 2, 2), torch.ones(1, 2, 2))
    assert _values(m)["abs_err"] == 0.0


# ------------------------------------------------------------------------------ directions
def test_directions_cover_every_returned_metric():
    names = set()
    zeros = torch.zeros(1, 2, 2, dtype=torch.long)
    for metric, (p, t) in (
        (SegmentationMetrics(2), (zeros, zeros)),
        (DepthErrors(), (torch.ones(1, 2, 2), torch.ones(1, 2, 2))),
        (NormalErrors(), (torch.ones(1, 3, 2, 2), torch.ones(1, 3, 2, 2))),
    ):
        metric.update(p, t)
        names |= set(metric.compute())
    assert names == set(DENSE_METRIC_DIRECTIONS)
    higher = {k for k, v in DENSE_METRIC_DIRECTIONS.items() if v}
    assert higher == {"miou", "pix_acc", "within_11_25", "within_22_5", "within_30"}
    assert dense_metric_direction("abs_err") is False
    with pytest.raises(KeyError, match="known"):
        dense_metric_direction("rmse")


def test_metric_collection_flattens_the_dicts():
    seg = SegmentationMetrics(2)
    seg.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
    c = torchmetrics.MetricCollection({"seg": seg})
    assert set(c.compute()) == {"miou", "pix_acc"}
