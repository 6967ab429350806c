"""Dense losses: masking of unlabelled pixels, values on hand-checkable tensors, graphs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtl.dense_losses import depth_loss, normal_loss, segmentation_loss


def test_segmentation_loss_is_cross_entropy_over_labelled_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 4))
    target[0, 0, 0] = -1
    loss = segmentation_loss(logits, target)
    mask = target != -1
    per_pixel = F.cross_entropy(logits, target.clamp_min(0), reduction="none")
    assert loss.item() == pytest.approx(per_pixel[mask].mean().item(), rel=1e-6)
    loss.backward()
    assert torch.count_nonzero(logits.grad[0, :, 0, 0]) == 0  # the ignored pixel gets no gradient


def test_segmentation_loss_on_a_known_pixel():
    logits = torch.tensor([[[[0.0]], [[math.log(3.0)]]]])  # p(class 1) = 3/4
    assert float(segmentation_loss(logits, torch.tensor([[[1]]]))) == pytest.approx(-math.log(0.75))


def test_depth_loss_masks_zero_and_nan_targets():
    pred = torch.tensor([[[[1.0, 5.0], [9.0, 9.0]]]], requires_grad=True)
    target = torch.tensor([[[[2.0, 4.0], [0.0, float("nan")]]]])
    loss = depth_loss(pred, target)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert torch.isfinite(pred.grad).all()  # the NaN target does not leak into the gradient
    assert pred.grad[0, 0, 1].tolist() == [0.0, 0.0]
    assert pred.grad[0, 0, 0].tolist() == [-0.5, 0.5]


def test_depth_loss_accepts_maps_with_or_without_a_channel():
    pred, target = torch.rand(2, 1, 3, 3), torch.rand(2, 3, 3) + 0.1
    expected = float(depth_loss(pred[:, 0], target[:, None]))
    assert float(depth_loss(pred, target)) == pytest.approx(expected)
    with pytest.raises(ValueError, match="\\[B, 1, H, W\\] or \\[B, H, W\\]"):
        depth_loss(torch.rand(2, 2, 3, 3), target)


def test_normal_loss_is_one_minus_cosine_on_labelled_pixels():
    pred = torch.tensor([[0.0, 0.0, 2.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [1.0, 1.0, 1.0]])
    target = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    p = pred.T.reshape(1, 3, 1, 4).requires_grad_(True)
    t = target.T.reshape(1, 3, 1, 4)
    loss = normal_loss(p, t)  # cosines 1, 0, -1 on the three labelled pixels
    assert loss.item() == pytest.approx(1.0 - (1 + 0 - 1) / 3)
    loss.backward()
    assert p.grad[0, :, 0, 3].abs().sum() == 0  # the unlabelled pixel gets no gradient


def test_normal_loss_ignores_target_length():
    torch.manual_seed(1)
    pred, target = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    expected = float(normal_loss(pred, 3 * target))
    assert float(normal_loss(pred, target)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "loss, pred, target",
    [
        (segmentation_loss, torch.randn(1, 3, 2, 2), torch.full((1, 2, 2), -1)),
        (depth_loss, torch.randn(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)),
        (depth_loss, torch.randn(1, 1, 2, 2), torch.full((1, 1, 2, 2), float("nan"))),
        (normal_loss, torch.randn(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)),
    ],
)
def test_no_labelled_pixel_gives_zero_with_a_graph(loss, pred, target):
    pred = pred.requires_grad_(True)
    value = loss(pred, target)
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert torch.count_nonzero(pred.grad) == 0


def test_shape_mismatches_raise():
    with pytest.raises(ValueError, match="segmentation_loss"):
        segmentation_loss(torch.randn(1, 3, 2, 2), torch.zeros(1, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="different pixels"):
        depth_loss(torch.randn(1, 1, 2, 2), torch.ones(1, 1, 3, 3))
    with pytest.raises(ValueError, match="\\[B, 3, H, W\\]"):
        normal_loss(torch.randn(1, 3, 2, 2), torch.ones(1, 3, 3, 3))
