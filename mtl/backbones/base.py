"""The interface every backbone follows.

A backbone is an ``nn.Module`` whose forward is ``pool(stage_n(...stage_1(x)))``. It exposes its
ordered ``stages`` (so structure-sharing modules can insert units between them and transfer
policies can unfreeze them block by block), the width of each stage's output, and
``out_features``: the width of the pooled ``[B, out_features]`` representation.
"""

from __future__ import annotations

from torch import Tensor, nn


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
