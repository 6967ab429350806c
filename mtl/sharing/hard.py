"""Hard parameter sharing (Caruana 1997): one backbone, its output fed to every head."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from mtl.backbones.base import Backbone
from mtl.sharing.base import SharedFeatures, Sharing


class HardSharing(Sharing):
    """Every task reads the backbone's output; that output is the shared representation.

    Vector tasks read the pooled output ``[B, out_features]``. Tasks in ``map_tasks`` read the last
    stage's feature map ``[B, C, h, w]``; when any of them is requested, that feature map is the
    shared representation (the vector tasks' pooled features are computed from it without
    parameters), otherwise the pooled output is, exactly as without map tasks.
    """

    def __init__(self, backbone: Backbone, tasks: Sequence[str], map_tasks: Sequence[str] = ()) -> None:
        super().__init__(backbone, tasks, map_tasks)
        self.out_features = backbone.out_features

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> SharedFeatures:
        names = self.task_names if tasks is None else tasks
        if not any(t in self.map_tasks for t in names):
            rep = self.backbone(x)
            return SharedFeatures({t: rep for t in names}, rep)
        fmap = self.check_feature_map(self.backbone.forward_stages(x)[-1])
        pooled = self.backbone.pool(fmap) if any(t not in self.map_tasks for t in names) else None
        return SharedFeatures({t: fmap if t in self.map_tasks else pooled for t in names}, fmap)
