"""The ResNet backbone: standard parameter counts, stages and shapes."""

from __future__ import annotations

import pytest
import torch

from mtl.backbones import ResNet


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_resnet18_parameter_counts() -> None:
    # torchvision resnet18 has 11,689,512 parameters; without its fc (512 * 1000 + 1000) the trunk
    # has 11,176,512. The CIFAR stem swaps the 7x7 stem convolution (3*64*49 = 9,408 weights) for
    # a 3x3 one (3*64*9 = 1,728): 7,680 fewer.
    assert count(ResNet(input_shape=(3, 16, 16), depth=18, width=64, small_input=False)) == 11_689_512 - 513_000
    assert count(ResNet(input_shape=(3, 16, 16), depth=18, width=64, small_input=True)) == 11_176_512 - 7_680
    assert count(ResNet(input_shape=(3, 16, 16), depth=18, width=64)) == 11_168_832


@pytest.mark.parametrize("size, last", [(32, 4), (16, 2), (8, 1), (3, 1)])
def test_small_input_stage_shapes(size: int, last: int) -> None:
    net = ResNet(input_shape=(3, 16, 16), depth=10, width=8)
    assert net.stage_channels == [8, 16, 32, 64] and net.out_features == 64
    assert len(net.stages) == 4
    outs = net.forward_stages(torch.randn(2, 3, size, size))
    assert [o.shape[1] for o in outs] == net.stage_channels
    assert outs[-1].shape[-1] == last
    assert net(torch.randn(2, 3, size, size)).shape == (2, 64)


def test_imagenet_stem_and_fewer_stages() -> None:
    net = ResNet(input_shape=(3, 16, 16), depth=10, width=8, num_stages=2, small_input=False)
    assert len(net.stages) == 2 and net.out_features == 16
    outs = net.forward_stages(torch.randn(2, 3, 32, 32))
    assert outs[0].shape == (2, 8, 8, 8) and outs[1].shape == (2, 16, 4, 4)


def test_depths_and_one_channel_input() -> None:
    blocks = lambda net: [len(stage[1]) if i == 0 else len(stage) for i, stage in enumerate(net.stages)]  # noqa: E731
    assert blocks(ResNet(depth=34, width=4)) == [3, 4, 6, 3]
    assert blocks(ResNet(depth=10, width=4)) == [1, 1, 1, 1]
    net = ResNet(input_shape=(1, 16, 16), depth=10, width=4)
    assert net(torch.randn(2, 12, 12)).shape == (2, 32)
    with pytest.raises(ValueError, match="depth"):
        ResNet(depth=42)
    with pytest.raises(ValueError, match=r"input_shape with 3 channel"):
        ResNet(input_shape=(3, 16, 16), depth=10, width=4)(torch.randn(2, 1, 8, 8))
