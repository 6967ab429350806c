"""Multi-Task Attention Network (Liu, Johns & Davison, "End-to-End Multi-Task Learning with
Attention", CVPR 2019)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mtl.backbones.base import Backbone
from mtl.sharing.base import SharedFeatures, Sharing


class MTAN(Sharing):
    r"""A shared backbone with a soft-attention module per task and stage.

    The backbone runs once; its stage outputs :math:`p_1..p_S` form the global feature pool. Task
    ``t`` reads them through its own attention modules, one per stage:

    .. math::
        a^t_1 = g^t_1(p_1), \qquad
        a^t_s = g^t_s([p_s, f_{s-1}(\hat a^t_{s-1})]) \;(s > 1), \qquad
        \hat a^t_s = a^t_s \odot p_s

    where :math:`g^t_s` produces a mask in (0, 1) with the shape of :math:`p_s`, ``[.,.]`` is
    concatenation along channels, and :math:`f_s` is a block, shared by all tasks as in the
    authors' code, that maps an attended stage-``s`` output to stage ``s+1``'s channels and
    resolution. Task ``t``'s features are ``backbone.pool`` of :math:`\hat a^t_S`, so
    ``out_features`` is ``backbone.out_features``.

    For feature maps ``[B, C, H, W]``: :math:`g` is ``Conv1x1 -> BN -> ReLU -> Conv1x1 -> BN ->
    Sigmoid`` (hidden width ``C_s``) and :math:`f_s` is ``Conv3x3 -> BN -> ReLU`` to ``C_{s+1}``
    channels followed by adaptive average pooling to stage ``s+1``'s spatial size. For vectors
    ``[B, C]`` (e.g. an MLP backbone): :math:`g` is ``Linear -> LayerNorm -> ReLU -> Linear ->
    LayerNorm -> Sigmoid`` (LayerNorm rather than BatchNorm so that a batch of one works) and
    :math:`f_s` is ``Linear -> ReLU``.

    Adaptation to a generic backbone: the paper feeds :math:`g` with a feature from inside the
    block (before its last layer) and multiplies the mask with the block's output; a backbone here
    only exposes whole stages, so both are the stage output :math:`p_s`.

    **Shared representation: none** (``representation=None``). Every task reads every stage
    output :math:`p_1..p_S`, not only the last one, so no single tensor carries all the gradient
    that flows into the backbone, and objective sharing in representation space
    (``balancer.engine.space=representation``) is unavailable; balance over the parameters instead.

    **Shared parameters:** the backbone and the blocks :math:`f_s`. The attention modules are
    task-specific.

    **Dense tasks** (``map_tasks``) read :math:`\hat a^t_S` itself, the attended last-stage
    feature map ``[B, C_S, H_S, W_S]``, as in the paper's segmentation, depth and normal heads.

    Args:
        backbone: any :class:`~mtl.backbones.base.Backbone`.
        tasks: task names.
        feature_maps: whether stage outputs are feature maps ``[B, C, H, W]`` (True) or vectors
            ``[B, C]`` (False). Default: True if the backbone's stages contain a ``Conv2d``.
        map_tasks: the tasks whose head reads a feature map (needs ``feature_maps``).
    """

    def __init__(
        self,
        backbone: Backbone,
        tasks: Sequence[str],
        feature_maps: bool | None = None,
        map_tasks: Sequence[str] = (),
    ) -> None:
        super().__init__(backbone, tasks, map_tasks)
        if feature_maps is None:
            feature_maps = any(isinstance(m, nn.Conv2d) for m in backbone.stages.modules())
        self.feature_maps = bool(feature_maps)
        if not self.feature_maps:
            self.refuse_map_tasks("it was built for vector stage outputs (sharing.feature_maps=false).")
        channels = list(backbone.stage_channels)
        if len(channels) != len(backbone.stages):
            raise ValueError(
                f"MTAN needs one stage_channels entry per backbone stage; the backbone has "
                f"{len(backbone.stages)} stages and stage_channels={channels}."
            )
        self.out_features = backbone.out_features
        self.to_next = nn.ModuleList(
            _next_stage_block(channels[s], channels[s + 1], self.feature_maps)
            for s in range(len(channels) - 1)
        )
        self.attention = nn.ModuleDict({t: self._task_attention() for t in self.task_names})

    def _task_attention(self) -> nn.ModuleList:
        """One attention module per stage for a new task, on the module's device and dtype."""
        channels = self.backbone.stage_channels
        modules = nn.ModuleList(
            _attention_block(c if s == 0 else 2 * c, c, self.feature_maps) for s, c in enumerate(channels)
        )
        ref = next(self.backbone.parameters(), None)
        return modules if ref is None else modules.to(device=ref.device, dtype=ref.dtype)

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> SharedFeatures:
        """``x [B, ...]`` -> ``{task: [B, out_features]}``; representation None (see class doc)."""
        names = self.task_names if tasks is None else list(tasks)
        missing = [t for t in names if t not in self.attention]
        if missing:
            raise KeyError(f"MTAN has no attention modules for task(s) {missing}; it has {self.task_names}.")
        shared = self.backbone.forward_stages(x)
        want = 4 if self.feature_maps else 2
        if any(p.dim() != want for p in shared):
            raise ValueError(
                f"MTAN built for {'feature maps [B, C, H, W]' if self.feature_maps else 'vectors [B, C]'} "
                f"but the backbone's stages output shapes {[tuple(p.shape) for p in shared]}. "
                f"Set sharing.feature_maps to match the backbone."
            )
        features = {}
        for t in names:
            attended = None
            for s, p in enumerate(shared):
                g_in = p if attended is None else torch.cat([p, self._to_stage(s - 1, attended, p)], dim=1)
                attended = self.attention[t][s](g_in) * p
            features[t] = attended if t in self.map_tasks else self.backbone.pool(attended)
        return SharedFeatures(features, None)

    def _to_stage(self, s: int, attended: Tensor, target: Tensor) -> Tensor:
        """``f_s``: attended stage-``s`` output -> the channels and size of ``target`` (stage s+1)."""
        h = self.to_next[s](attended)
        if self.feature_maps and h.shape[-2:] != target.shape[-2:]:
            h = F.adaptive_avg_pool2d(h, target.shape[-2:])
        return h

    def shared_parameters(self) -> list[nn.Parameter]:
        """The backbone and the shared stage-to-stage blocks ``f_s``."""
        params = list(self.backbone.parameters()) + list(self.to_next.parameters())
        return [p for p in params if p.requires_grad]


def _attention_block(cin: int, cout: int, feature_maps: bool) -> nn.Sequential:
    """Mask ``g``: ``[B, cin(, H, W)] -> [B, cout(, H, W)]`` in (0, 1)."""
    if feature_maps:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 1), nn.BatchNorm2d(cout), nn.Sigmoid(),
        )
    return nn.Sequential(
        nn.Linear(cin, cout), nn.LayerNorm(cout), nn.ReLU(inplace=True),
        nn.Linear(cout, cout), nn.LayerNorm(cout), nn.Sigmoid(),
    )


def _next_stage_block(cin: int, cout: int, feature_maps: bool) -> nn.Sequential:
    """``f``: ``[B, cin(, H, W)] -> [B, cout(, H, W)]`` (resizing happens in ``MTAN._to_stage``)."""
    if feature_maps:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
    return nn.Sequential(nn.Linear(cin, cout), nn.ReLU(inplace=True))
