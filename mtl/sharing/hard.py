"""Hard parameter sharing (Caruana 1997): one backbone, its output fed to every head."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from mtl.backbones.base import Backbone
from mtl.sharing.base import SharedFeatures, Sharing


class HardSharing(Sharing):
    """Every task reads the backbone's pooled output; that output is the shared representation."""

    def __init__(self, backbone: Backbone, tasks: Sequence[str]) -> None:
        super().__init__(backbone, tasks)
        self.out_features = backbone.out_features

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> SharedFeatures:
        rep = self.backbone(x)
        names = self.task_names if tasks is None else tasks
        return SharedFeatures({t: rep for t in names}, rep)
