"""Heads for dense (per-pixel) tasks: a feature map in, a full-resolution prediction out.

Both heads share one interface::

    head = ConvHead(in_channels=256, out_channels=13)
    out = head(features, size=image.shape[-2:])   # [B, 256, h, w] -> [B, 13, H, W]

The output size is given at call time, not at construction, so one head serves any input size
(random crops during training, full images at evaluation). ``size=None`` keeps the feature map's
resolution. Upsampling is bilinear; ``align_corners`` is a constructor argument (``False``, as in
torchvision's DeepLabV3; LibMTL's NYUv2 / Cityscapes examples upsample with ``True``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _check_features(features: Tensor, in_channels: int, head: str) -> None:
    if features.dim() != 4 or features.shape[1] != in_channels:
        raise ValueError(
            f"{head} expects a feature map [B, {in_channels}, h, w], got shape "
            f"{tuple(features.shape)}. Dense heads read the backbone's last feature map, not "
            "its pooled vector."
        )


def _resize(x: Tensor, size: Sequence[int] | None, align_corners: bool) -> Tensor:
    if size is None:
        return x
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


class ConvHead(nn.Module):
    """A light head: ``Conv3x3 -> BatchNorm -> ReLU -> Conv1x1``, then bilinear upsampling.

    Args:
        in_channels: channels ``C`` of the input feature map.
        out_channels: channels of the prediction (classes, 1 for depth, 3 for normals).
        hidden: width of the 3x3 convolution.
        align_corners: passed to the bilinear upsampling.
    """

    def __init__(
        self, in_channels: int, out_channels: int, hidden: int = 64, align_corners: bool = False
    ) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.align_corners = bool(align_corners)
        self.body = _conv_bn_relu(self.in_channels, int(hidden), 3)
        self.classifier = nn.Conv2d(int(hidden), self.out_channels, 1)

    def forward(self, features: Tensor, size: Sequence[int] | None = None) -> Tensor:
        """``features`` ``[B, C, h, w]`` -> ``[B, out_channels, H, W]`` with ``(H, W) = size``
        (``(h, w)`` when ``size`` is None)."""
        _check_features(features, self.in_channels, type(self).__name__)
        return _resize(self.classifier(self.body(features)), size, self.align_corners)


class _ImagePooling(nn.Module):
    """ASPP's image-level branch: global average pool, 1x1 conv, ReLU, broadcast back to ``h x w``.

    It has no BatchNorm: on a ``1 x 1`` map BatchNorm would see one value per channel and image and
    fail in training with a batch of one.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.relu(self.conv(x.mean(dim=(2, 3), keepdim=True)))
        return pooled.expand(-1, -1, x.shape[2], x.shape[3])


class ASPPHead(nn.Module):
    """DeepLabV3 head: atrous spatial pyramid pooling, a 3x3 conv, a 1x1 classifier, upsampling.

    ASPP runs in parallel a 1x1 convolution, one 3x3 convolution per dilation rate in ``rates`` and an
    image-level pooling branch; their outputs are concatenated and projected by a 1x1 convolution
    (with dropout) to ``hidden`` channels. Then ``Conv3x3 -> BatchNorm -> ReLU -> Conv1x1`` gives
    ``out_channels``, upsampled bilinearly (Chen et al., "Rethinking Atrous Convolution for Semantic
    Image Segmentation", 2017).

    The default ``rates=(6, 12, 18)`` suit an output stride of 16; LibMTL's NYUv2 / Cityscapes
    examples (dilated ResNet-50, output stride 8) use ``(12, 24, 36)``. On small feature maps a rate
    at least as large as the map makes that branch see mostly padding (it degenerates towards a
    1x1 convolution), so scale the rates with the map.

    Args:
        in_channels: channels ``C`` of the input feature map.
        out_channels: channels of the prediction.
        rates: dilation rates of the 3x3 branches.
        hidden: width of every branch and of the projection (256 in DeepLabV3).
        dropout: dropout after the projection (0.5 in DeepLabV3 and LibMTL).
        align_corners: passed to the bilinear upsampling.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rates: Sequence[int] = (6, 12, 18),
        hidden: int = 256,
        dropout: float = 0.5,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.rates = tuple(int(r) for r in rates)
        self.align_corners = bool(align_corners)
        if any(r < 1 for r in self.rates):
            raise ValueError(f"ASPPHead: dilation rates must be >= 1, got {list(rates)}.")
        hidden = int(hidden)
        branches = [_conv_bn_relu(self.in_channels, hidden, 1)]
        branches += [_conv_bn_relu(self.in_channels, hidden, 3, dilation=r) for r in self.rates]
        branches.append(_ImagePooling(self.in_channels, hidden))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(
            nn.Conv2d(hidden * len(branches), hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(float(dropout)),
        )
        self.body = _conv_bn_relu(hidden, hidden, 3)
        self.classifier = nn.Conv2d(hidden, self.out_channels, 1)

    def forward(self, features: Tensor, size: Sequence[int] | None = None) -> Tensor:
        """``features`` ``[B, C, h, w]`` -> ``[B, out_channels, H, W]`` with ``(H, W) = size``
        (``(h, w)`` when ``size`` is None)."""
        _check_features(features, self.in_channels, type(self).__name__)
        pyramid = torch.cat([branch(features) for branch in self.branches], dim=1)
        out = self.classifier(self.body(self.project(pyramid)))
        return _resize(out, size, self.align_corners)


__all__ = ["ASPPHead", "ConvHead"]
