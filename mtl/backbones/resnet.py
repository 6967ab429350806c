"""ResNet backbone with basic blocks (He et al., "Deep Residual Learning for Image Recognition",
CVPR 2016), written here so that its stages are the ones structure sharing needs."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from mtl.backbones.base import Backbone, image_channels

#: Basic blocks per stage for each supported depth (ResNet-50 and deeper use bottleneck blocks,
#: which this backbone does not implement).
BLOCKS_PER_STAGE: dict[int, list[int]] = {10: [1, 1, 1, 1], 18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


class ResNet(Backbone):
    """ResNet-10/18/34 trunk: stem, up to four stages of basic blocks, global average pooling.

    Stage ``i`` has ``width * 2**i`` channels and, except the first, halves the resolution with a
    stride-2 first block. The stem is folded into the first stage, so ``stages`` is
    ``[stem + layer1, layer2, layer3, layer4][:num_stages]`` and every stage outputs a feature map
    ``[B, C_i, H_i, W_i]``. ``forward(x)`` returns ``[B, out_features]`` with
    ``out_features = width * 2**(num_stages - 1)``.

    Two stems:

    * ``small_input=True`` (CIFAR style, for 32x32 images and smaller): ``Conv3x3(stride 1) -> BN
      -> ReLU``, no max-pool, so a 32x32 input gives 32/16/8/4 feature maps.
    * ``small_input=False`` (ImageNet style): ``Conv7x7(stride 2) -> BN -> ReLU -> MaxPool3x3(stride 2)``.

    Feature maps never shrink below 1x1 (a stride-2 3x3 convolution with padding 1 maps 1x1 to 1x1),
    so tiny inputs work too. With ``depth=18, width=64`` and 3 input channels the trunk (no classifier)
    has 11,176,512 parameters with the ImageNet stem, the torchvision ``resnet18`` count without
    its ``fc``, and 11,168,832 with the small-input stem (the 3x3 stem has 7,680 fewer weights).

    Args:
        input_shape: shape of one image, ``(C, H, W)`` or ``(H, W)`` (None: 3 channels); ``[B, H, W]``
            inputs are read as one channel.
        depth: 10, 18 or 34 (basic blocks per stage: 1-1-1-1, 2-2-2-2, 3-4-6-3).
        width: channels of the stem and the first stage.
        num_stages: how many of the four stages to keep (1 to 4).
        small_input: 3x3 stride-1 stem without max-pool instead of the ImageNet stem.
    """

    def __init__(
        self,
        input_shape: Sequence[int] | None = None,
        depth: int = 18,
        width: int = 64,
        num_stages: int = 4,
        small_input: bool = True,
    ) -> None:
        super().__init__()
        if depth not in BLOCKS_PER_STAGE:
            raise ValueError(
                f"backbone.depth must be one of {sorted(BLOCKS_PER_STAGE)} (basic-block ResNets), "
                f"got {depth}."
            )
        if not 1 <= num_stages <= 4:
            raise ValueError(f"backbone.num_stages must be between 1 and 4, got {num_stages}.")
        if width < 1:
            raise ValueError(f"backbone.width must be positive, got {width}.")
        self.in_channels = image_channels(input_shape, 3, "resnet")
        self.depth = int(depth)
        self.width = int(width)
        self.small_input = bool(small_input)

        if self.small_input:
            stem = nn.Sequential(
                nn.Conv2d(self.in_channels, self.width, 3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(self.width),
                nn.ReLU(inplace=True),
            )
        else:
            stem = nn.Sequential(
                nn.Conv2d(self.in_channels, self.width, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(self.width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )

        stages: list[nn.Module] = []
        channels: list[int] = []
        cin = self.width
        for i, num_blocks in enumerate(BLOCKS_PER_STAGE[self.depth][:num_stages]):
            cout = self.width * 2**i
            blocks = [BasicBlock(cin, cout, stride=1 if i == 0 else 2)]
            blocks += [BasicBlock(cout, cout) for _ in range(num_blocks - 1)]
            layer = nn.Sequential(*blocks)
            stages.append(nn.Sequential(stem, layer) if i == 0 else layer)
            channels.append(cout)
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.stage_channels = channels
        self.out_features = channels[-1]
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def prepare(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ResNet backbone expects images [B, {self.in_channels}, H, W] (or [B, H, W] for one "
                f"channel), got shape {tuple(x.shape)}; it was built for input_shape with {self.in_channels} channel(s)."
            )
        return x

    def pool(self, h: Tensor) -> Tensor:
        """Global average pooling: ``[B, C, H, W] -> [B, C]``."""
        return torch.flatten(h.mean(dim=(2, 3)), 1)


class BasicBlock(nn.Module):
    """``Conv3x3 -> BN -> ReLU -> Conv3x3 -> BN``, plus a shortcut, then ReLU.

    The shortcut is the identity, or ``Conv1x1(stride) -> BN`` when the block changes the number of
    channels or the resolution. ``[B, cin, H, W] -> [B, cout, ceil(H/stride), ceil(W/stride)]``.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))
