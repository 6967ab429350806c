"""Small convolutional backbone for images of any size."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from mtl.backbones.base import Backbone, image_channels


class CNN(Backbone):
    """``Conv3x3 -> BatchNorm -> ReLU (-> MaxPool2)`` blocks, then adaptive average pooling.

    Each block is one stage. Inputs may be ``[B, H, W]`` (one channel) or ``[B, C, H, W]``; pooling
    is skipped once a feature map is smaller than 2x2, so small images (8x8 digits) work.

    For dense tasks, ``max_pools`` stops the max-pooling after that many pools, so the last blocks
    keep the resolution (``channels=[32, 64, 64], max_pools=2`` gives a ``1/4``-resolution map,
    16x16 for the 64x64 scenes): a small, fast encoder whose last feature map dense heads read.

    Args:
        input_shape: shape of one image, ``(C, H, W)`` or ``(H, W)`` (None: one channel).
        channels: output channels of each block; ``out_features`` is the last one.
        pool_every: max-pool after every ``pool_every`` blocks (0: never).
        max_pools: at most this many max-pools (the first ones); None: no limit.
        pool_size: output grid of the final adaptive average pooling, ``(rows, cols)`` or an int;
            1 is global average pooling. A grid keeps coarse position (e.g. ``[1, 2]``: left and
            right halves), which tasks about where things are need.
        dropout: dropout on the pooled features.
    """

    def __init__(
        self,
        input_shape: Sequence[int] | None = None,
        channels: Sequence[int] = (32, 64),
        pool_every: int = 1,
        pool_size: int | Sequence[int] = 1,
        dropout: float = 0.0,
        max_pools: int | None = None,
    ) -> None:
        super().__init__()
        if not channels:
            raise ValueError("backbone.channels must list at least one block width.")
        self.in_channels = image_channels(input_shape, 1, "cnn")
        if max_pools is not None and int(max_pools) < 0:
            raise ValueError(f"backbone.max_pools must be >= 0 or null, got {max_pools}.")
        blocks = []
        width = self.in_channels
        pools = 0
        for i, c in enumerate(channels):
            pool = pool_every > 0 and (i + 1) % pool_every == 0
            if pool and max_pools is not None and pools >= int(max_pools):
                pool = False
            pools += int(pool)
            blocks.append(_ConvBlock(width, int(c), pool))
            width = int(c)
        self.stages = nn.ModuleList(blocks)
        self.stage_channels = [int(c) for c in channels]
        grid = (int(pool_size), int(pool_size)) if isinstance(pool_size, int) else tuple(int(p) for p in pool_size)
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"backbone.pool_size must be a positive int or [rows, cols], got {pool_size}.")
        self.pool_size = grid
        self.out_features = width * grid[0] * grid[1]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def prepare(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"CNN backbone expects images [B, {self.in_channels}, H, W] (or [B, H, W] for one "
                f"channel), got shape {tuple(x.shape)}; it was built for input_shape with {self.in_channels} channel(s)."
            )
        return x

    def pool(self, h: Tensor) -> Tensor:
        if self.pool_size == (1, 1):
            return self.dropout(h.mean(dim=(2, 3)))
        return self.dropout(torch.flatten(nn.functional.adaptive_avg_pool2d(h, self.pool_size), 1))


class _ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, pool: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True)
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.bn(self.conv(x)))
        if self.pool and x.shape[-1] >= 2 and x.shape[-2] >= 2:
            x = nn.functional.max_pool2d(x, 2)
        return x
