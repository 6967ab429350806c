"""The interface every backbone follows.

A backbone is an ``nn.Module`` whose forward is ``pool(stage_n(...stage_1(x)))``. It exposes its
ordered ``stages`` (so structure-sharing modules can insert units between them and transfer
policies can unfreeze them block by block), the width of each stage's output, and
``out_features``: the width of the pooled ``[B, out_features]`` representation.

Every backbone is built the same way, ``Backbone(input_shape, **options)``: ``input_shape`` is the
shape of one example without the batch dimension (``(64,)`` for a feature vector, ``(C, H, W)`` or
``(H, W)`` for an image), as the data module reports it (``datamodule.input_shape``); the entry
point passes it to whatever ``backbone`` the config names.
"""

from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor, nn


def image_channels(input_shape: Sequence[int] | None, default: int, name: str) -> int:
    """Channels of an image input ``(C, H, W)`` (``(H, W)``: one channel; None: ``default``)."""
    if input_shape is None:
        return int(default)
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 3 and shape[0] > 0:
        return shape[0]
    if len(shape) == 2:
        return 1
    raise ValueError(
        f"backbone {name} takes images, input_shape (C, H, W) or (H, W), but the data's examples have "
        f"shape {shape}. Use backbone=mlp for feature vectors (tabular data)."
    )


def flat_features(input_shape: Sequence[int] | None, name: str) -> int:
    """Number of features of an input flattened to a vector."""
    if input_shape is None:
        raise ValueError(f"backbone {name} needs input_shape, the shape of one example, e.g. (64,).")
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(
            f"backbone {name} cannot flatten examples of shape {shape} (-1: the datasets' shapes differ "
            f"there). Use a backbone that pools, such as backbone=cnn."
        )
    return math.prod(shape)


class Backbone(nn.Module):
    """Base class: subclasses set ``self.stages``, ``self.stage_channels`` and ``self.out_features``.

    Attributes:
        stages: ``nn.ModuleList`` applied in order.
        stage_channels: output width of each stage (channels for feature maps, features for vectors).
        out_features: width of ``forward(x)``.
    """

    stages: nn.ModuleList
    stage_channels: list[int]
    out_features: int

    def prepare(self, x: Tensor) -> Tensor:
        """Check and reshape the raw input before the first stage (identity by default)."""
        return x

    def pool(self, h: Tensor) -> Tensor:
        """Map the last stage's output to ``[B, out_features]``."""
        return h.flatten(1)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """Outputs of every stage, in order."""
        x = self.prepare(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def forward(self, x: Tensor) -> Tensor:
        """``x`` of any shape ``[B, ...]`` -> features ``[B, out_features]``."""
        x = self.prepare(x)
        for stage in self.stages:
            x = stage(x)
        return self.pool(x)
