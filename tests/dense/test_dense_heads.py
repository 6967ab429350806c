"""Dense heads: output shapes at the requested size, gradients, batch of one, clear errors."""

from __future__ import annotations

import pytest
import torch

from mtl.heads import ASPPHead, ConvHead


def _heads(in_channels: int, out_channels: int):
    return [
        ConvHead(in_channels, out_channels, hidden=8),
        ASPPHead(in_channels, out_channels, rates=(1, 2, 3), hidden=8),
    ]


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("out_channels", [1, 3, 6])
def test_output_is_upsampled_to_the_requested_size(index, out_channels):
    head = _heads(16, out_channels)[index]
    features = torch.randn(2, 16, 8, 8)
    assert head(features, size=(32, 48)).shape == (2, out_channels, 32, 48)
    assert head(features, size=torch.Size([17, 9])).shape == (2, out_channels, 17, 9)
    assert head(features).shape == (2, out_channels, 8, 8)  # size=None keeps the resolution


@pytest.mark.parametrize("index", [0, 1])
def test_gradients_reach_every_parameter_and_the_features(index):
    torch.manual_seed(0)
    head = _heads(4, 3)[index]
    features = torch.randn(2, 4, 6, 6, requires_grad=True)
    head(features, size=(12, 12)).square().mean().backward()
    assert features.grad is not None and torch.isfinite(features.grad).all()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_aspp_trains_with_a_batch_of_one():
    head = ASPPHead(4, 2, rates=(1, 2, 3), hidden=8).train()
    assert head(torch.randn(1, 4, 5, 5), size=(10, 10)).shape == (1, 2, 10, 10)


def test_aspp_default_is_deeplabv3():
    head = ASPPHead(32, 13)
    assert head.rates == (6, 12, 18)
    assert len(head.branches) == 5  # 1x1, three atrous 3x3, image pooling
    assert head.eval()(torch.randn(2, 32, 9, 12), size=(72, 96)).shape == (2, 13, 72, 96)


def test_eval_mode_is_deterministic():
    head = ASPPHead(4, 2, rates=(1, 2, 3), hidden=8).eval()
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(head(x, size=(10, 10)), head(x, size=(10, 10)))


@pytest.mark.parametrize("index", [0, 1])
def test_wrong_input_raises_clearly(index):
    head = _heads(4, 2)[index]
    with pytest.raises(ValueError, match="feature map \\[B, 4, h, w\\]"):
        head(torch.randn(2, 4))
    with pytest.raises(ValueError, match="feature map"):
        head(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="rates"):
        ASPPHead(4, 2, rates=(0, 2))
