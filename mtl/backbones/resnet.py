"""ResNet backbone (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016), written
here so that its stages are the ones structure sharing needs, with the dilated (DeepLab-style)
variant that dense tasks use."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from mtl.backbones.base import Backbone, image_channels

#: Blocks per stage for each supported depth: basic blocks up to 34, bottleneck blocks from 50.
BLOCKS_PER_STAGE: dict[int, list[int]] = {
    10: [1, 1, 1, 1],
    18: [2, 2, 2, 2],
    34: [3, 4, 6, 3],
    50: [3, 4, 6, 3],
    101: [3, 4, 23, 3],
}
BOTTLENECK_DEPTHS = (50, 101)


class ResNet(Backbone):
    """ResNet-10/18/34 (basic blocks) and ResNet-50/101 (bottleneck blocks) trunk: stem, up to four
    stages, global average pooling.

    Stage ``i`` has ``width * 2**i`` channels (times 4 for bottleneck blocks) and, except the first,
    halves the resolution with a stride-2 first block. The stem is folded into the first stage, so
    ``stages`` is ``[stem + layer1, layer2, layer3, layer4][:num_stages]`` and every stage outputs a
    feature map ``[B, C_i, H_i, W_i]``. ``forward(x)`` returns ``[B, out_features]`` with
    ``out_features = stage_channels[-1]``.

    Two stems:

    * ``small_input=True`` (CIFAR style, for 32x32 images and smaller): ``Conv3x3(stride 1) -> BN
      -> ReLU``, no max-pool, so a 32x32 input gives 32/16/8/4 feature maps.
    * ``small_input=False`` (ImageNet style): ``Conv7x7(stride 2) -> BN -> ReLU -> MaxPool3x3(stride 2)``.

    **Output stride** (dense tasks). ``output_stride=8`` or ``16`` (any power of 2 at least the
    stem's stride: 1 small, 4 ImageNet) keeps the last feature maps at ``1/output_stride`` of the
    input: a stage that would go below it keeps the resolution and dilates its 3x3 convolutions
    instead (rate 2, then 4, ...; the first block's first 3x3 convolution keeps the previous rate),
    as in DeepLab (Chen et al., 2017) and the dilated ResNet-50 of MTAN's and LibMTL's NYUv2 /
    Cityscapes setups (ImageNet stem, ``output_stride=8``: layers 3 and 4 at rates 2 and 4). The
    parameters are the same as without dilation, so pretrained weights still fit.

    Feature maps never shrink below 1x1 (a stride-2 3x3 convolution with padding 1 maps 1x1 to 1x1),
    so tiny inputs work too. With ``depth=18, width=64`` and 3 input channels the trunk (no classifier)
    has 11,176,512 parameters with the ImageNet stem, the torchvision ``resnet18`` count without
    its ``fc``, and 11,168,832 with the small-input stem (the 3x3 stem has 7,680 fewer weights);
    ``depth=50`` with the ImageNet stem has torchvision ``resnet50``'s 23,508,032.

    Args:
        input_shape: shape of one image, ``(C, H, W)`` or ``(H, W)`` (None: 3 channels); ``[B, H, W]``
            inputs are read as one channel.
        depth: 10, 18, 34 (basic blocks per stage: 1-1-1-1, 2-2-2-2, 3-4-6-3), 50 or 101
            (bottleneck blocks: 3-4-6-3, 3-4-23-3).
        width: channels of the stem and the first stage's blocks.
        num_stages: how many of the four stages to keep (1 to 4).
        small_input: 3x3 stride-1 stem without max-pool instead of the ImageNet stem.
        output_stride: None (no dilation), or the stride of the last feature map (see above).
        pretrained_path: a local file of ImageNet weights in torchvision's ``resnet<depth>`` layout
            (``conv1.weight``, ``layer1.0.conv1.weight``, ...; ``fc`` is ignored) or in this
            backbone's own; see :meth:`load_torchvision_weights`. Nothing is downloaded.
    """

    def __init__(
        self,
        input_shape: Sequence[int] | None = None,
        depth: int = 18,
        width: int = 64,
        num_stages: int = 4,
        small_input: bool = True,
        output_stride: int | None = None,
        pretrained_path: str | None = None,
    ) -> None:
        super().__init__()
        if depth not in BLOCKS_PER_STAGE:
            raise ValueError(
                f"backbone.depth must be one of {sorted(BLOCKS_PER_STAGE)}, got {depth}."
            )
        if not 1 <= num_stages <= 4:
            raise ValueError(f"backbone.num_stages must be between 1 and 4, got {num_stages}.")
        if width < 1:
            raise ValueError(f"backbone.width must be positive, got {width}.")
        self.in_channels = image_channels(input_shape, 3, "resnet")
        self.depth = int(depth)
        self.width = int(width)
        self.small_input = bool(small_input)
        stem_stride = 1 if self.small_input else 4
        if output_stride is not None:
            output_stride = int(output_stride)
            if output_stride < stem_stride or output_stride & (output_stride - 1):
                raise ValueError(
                    f"backbone.output_stride must be a power of 2 of at least {stem_stride} (the "
                    f"{'small-input' if self.small_input else 'ImageNet'} stem's stride), got {output_stride}."
                )
        self.output_stride = output_stride

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

        block = Bottleneck if self.depth in BOTTLENECK_DEPTHS else BasicBlock
        stages: list[nn.Module] = []
        channels: list[int] = []
        cin = self.width
        stride_so_far, dilation = stem_stride, 1
        self.dilations: list[int] = []
        for i, num_blocks in enumerate(BLOCKS_PER_STAGE[self.depth][:num_stages]):
            planes = self.width * 2**i
            stride, previous = (1 if i == 0 else 2), dilation
            if stride == 2 and output_stride is not None and stride_so_far * 2 > output_stride:
                stride, dilation = 1, dilation * 2
            stride_so_far *= stride
            blocks = [block(cin, planes, stride=stride, dilation=dilation, first_dilation=previous)]
            cout = planes * block.expansion
            blocks += [block(cout, planes, dilation=dilation) for _ in range(num_blocks - 1)]
            layer = nn.Sequential(*blocks)
            stages.append(nn.Sequential(stem, layer) if i == 0 else layer)
            channels.append(cout)
            self.dilations.append(dilation)
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.stage_channels = channels
        self.out_features = channels[-1]
        self._init_weights()
        if pretrained_path is not None:
            from mtl.backbones.timm_backbone import load_state_dict_file

            self.load_torchvision_weights(load_state_dict_file(pretrained_path), source=str(pretrained_path))

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

    # ------------------------------------------------------------------ weights
    def torchvision_key(self, key: str) -> str | None:
        """This backbone's name for a key of a torchvision ``resnet<depth>`` state dict (None: the
        classifier, or a stage this backbone does not keep)."""
        parts = key.split(".")
        if parts[0] == "conv1":
            return "stages.0.0.0." + ".".join(parts[1:])
        if parts[0] == "bn1":
            return "stages.0.0.1." + ".".join(parts[1:])
        if parts[0].startswith("layer") and parts[0][5:].isdigit():
            stage = int(parts[0][5:]) - 1
            if stage >= len(self.stages):
                return None
            rest = ".".join(parts[1:]).replace("downsample.", "shortcut.")
            return f"stages.0.1.{rest}" if stage == 0 else f"stages.{stage}.{rest}"
        return None

    def load_torchvision_weights(self, state: Mapping[str, Tensor], source: str = "state dict") -> None:
        """Load weights saved from torchvision's ``resnet<depth>`` (or from this backbone).

        Every parameter and buffer of the backbone must be in ``state`` with its shape (the
        ImageNet stem, ``width=64``, the same depth and input channels); the classifier ``fc`` and
        the stages this backbone drops are ignored. Anything else raises, naming the keys.
        """
        own = self.state_dict()
        if any(k in own for k in state):
            mapped = {k: v for k, v in state.items() if k in own}
        else:
            mapped = {}
            for key, value in state.items():
                name = self.torchvision_key(key)
                if name is not None:
                    mapped[name] = value
        missing = [k for k in own if k not in mapped]
        shapes = [f"{k}: {tuple(mapped[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in mapped and mapped[k].shape != own[k].shape]
        if missing or shapes:
            raise ValueError(
                f"backbone.pretrained_path: {source} does not fit ResNet-{self.depth} (width {self.width}, "
                f"{'small-input' if self.small_input else 'ImageNet'} stem, {self.in_channels} input "
                f"channels): missing {missing[:5]}{'...' if len(missing) > 5 else ''}, shape mismatches "
                f"{shapes[:5]}. ImageNet weights need backbone.small_input=false and backbone.width=64."
            )
        self.load_state_dict(mapped)


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """``Conv3x3 -> BN -> ReLU -> Conv3x3 -> BN``, plus a shortcut, then ReLU.

    The shortcut is the identity, or ``Conv1x1(stride) -> BN`` when the block changes the number of
    channels or the resolution. ``[B, cin, H, W] -> [B, cout, ceil(H/stride), ceil(W/stride)]``.
    The first convolution has dilation ``first_dilation`` (default ``dilation``), the second
    ``dilation``.
    """

    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1, first_dilation: int | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride, first_dilation or dilation)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout, 1, dilation)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """``Conv1x1 -> BN -> ReLU -> Conv3x3(stride, dilation) -> BN -> ReLU -> Conv1x1 -> BN``, plus a
    shortcut, then ReLU (torchvision's ResNet v1.5: the stride is on the 3x3 convolution).

    ``[B, cin, H, W] -> [B, 4 * planes, ceil(H/stride), ceil(W/stride)]``. The 3x3 convolution has
    dilation ``first_dilation`` (default ``dilation``).
    """

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, dilation: int = 1, first_dilation: int | None = None) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, first_dilation or dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act(out + self.shortcut(x))
