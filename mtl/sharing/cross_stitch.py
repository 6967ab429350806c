"""Cross-stitch networks (Misra, Shrivastava, Gupta & Hebert, "Cross-stitch Networks for Multi-task
Learning", CVPR 2016)."""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn

from mtl.backbones.base import Backbone
from mtl.sharing.base import SharedFeatures, Sharing


class CrossStitch(Sharing):
    r"""One backbone column per task, linearly mixed after every stage by cross-stitch units.

    Each task ``t`` owns a column: a deep copy of the backbone (the first task's column is the
    backbone passed in, available as ``self.backbone``), so the module holds ``T`` times the
    backbone's parameters. After stage ``s`` of every column, a cross-stitch unit mixes the ``T``
    stage outputs :math:`h^s_1..h^s_T` into the inputs of stage ``s+1``:

    .. math:: \tilde h^s_t = \sum_{u=1}^{T} \alpha^s_{tu} \, h^s_u

    There is one unit after every stage, the last one included (as after ``fc7`` in the paper), and
    task ``t``'s features are ``backbone.pool`` of its mixed last-stage output, so ``out_features``
    is ``backbone.out_features``. The mixing works on any stage output shape (feature maps or
    vectors): only the channel axis (dim 1) is special.

    **Units.** ``per_channel=False`` (default, as in the paper): one ``T x T`` matrix per stage,
    ``num_stages * T**2`` parameters. ``per_channel=True``: a ``T x T`` matrix per channel,
    ``T**2 * sum(stage_channels)`` parameters. Initialised to ``alpha_same`` on the diagonal and
    ``alpha_other`` (default ``(1 - alpha_same) / (T - 1)``) elsewhere; the paper's 0.9 / 0.1
    for two tasks. ``alpha_same=1, alpha_other=0`` gives ``T`` independent networks.

    **Shared representation: none** (``representation=None``). No single tensor carries all the
    information shared between tasks: every task mixes every column at every stage. Objective
    sharing in representation space (``balancer.engine.space=representation``) is therefore unavailable;
    balance over the parameters instead.

    **Shared parameters:** all columns and all units. At any mixing other than the identity, every
    task's output depends on every column, so every parameter of the module is shared.

    **Dense tasks** (``map_tasks``) read their column's mixed last-stage feature map itself,
    ``[B, C_S, H_S, W_S]``, instead of its pooled vector.

    Args:
        backbone: any :class:`~mtl.backbones.base.Backbone`.
        tasks: task names, one column each.
        alpha_same: initial weight of a task's own column.
        alpha_other: initial weight of each other column (default ``(1 - alpha_same) / (T - 1)``).
        per_channel: one mixing matrix per channel instead of one per stage.
        map_tasks: the tasks whose head reads a feature map.
    """

    def __init__(
        self,
        backbone: Backbone,
        tasks: Sequence[str],
        alpha_same: float = 0.9,
        alpha_other: float | None = None,
        per_channel: bool = False,
        map_tasks: Sequence[str] = (),
    ) -> None:
        super().__init__(backbone, tasks, map_tasks)
        if not self.task_names:
            raise ValueError("CrossStitch needs at least one task.")
        self.alpha_same = float(alpha_same)
        self.alpha_other = None if alpha_other is None else float(alpha_other)
        self.per_channel = bool(per_channel)
        if len(backbone.stage_channels) != len(backbone.stages):
            raise ValueError(
                f"CrossStitch needs one stage_channels entry per backbone stage; the backbone has "
                f"{len(backbone.stages)} stages and stage_channels={list(backbone.stage_channels)}."
            )
        self.out_features = backbone.out_features
        # Columns of tasks 1..T-1; task 0's column is self.backbone (kept out of this list so that
        # its parameters are registered, and saved, once).
        self.columns = nn.ModuleList(copy.deepcopy(backbone) for _ in self.task_names[1:])
        num_tasks = len(self.task_names)
        self.units = nn.ParameterList(
            nn.Parameter(self._initial_alpha(num_tasks, c).to(self._reference_tensor()))
            for c in backbone.stage_channels
        )

    # ------------------------------------------------------------------------------- helpers
    def _reference_tensor(self) -> Tensor:
        for p in self.backbone.parameters():
            return p.detach()
        return torch.zeros(())

    def _default_other(self, num_tasks: int) -> float:
        if self.alpha_other is not None:
            return self.alpha_other
        return (1.0 - self.alpha_same) / (num_tasks - 1) if num_tasks > 1 else 0.0

    def _initial_alpha(self, num_tasks: int, channels: int) -> Tensor:
        """``[T, T]`` (or ``[T, T, channels]``) with ``alpha_same`` on the diagonal."""
        alpha = torch.full((num_tasks, num_tasks), self._default_other(num_tasks))
        alpha.fill_diagonal_(self.alpha_same)
        if self.per_channel:
            alpha = alpha.unsqueeze(-1).repeat(1, 1, channels)
        return alpha

    def column(self, task: str) -> Backbone:
        """The backbone copy that task ``task`` owns."""
        i = self.task_names.index(task)
        return self.backbone if i == 0 else self.columns[i - 1]

    def _all_columns(self) -> list[Backbone]:
        return [self.backbone, *self.columns]

    @staticmethod
    def _mix(alpha: Tensor, hs: Tensor) -> Tensor:
        """Cross-stitch unit.

        Args:
            alpha: ``[T, T]`` or ``[T, T, C]`` mixing weights.
            hs: ``[T, B, C, ...]`` the stage outputs of the ``T`` columns.
        Returns:
            ``[T, B, C, ...]`` with ``out[t] = sum_u alpha[t, u] * hs[u]`` (per channel if 3-d).
        """
        if alpha.dim() == 2:
            return torch.tensordot(alpha, hs, dims=([1], [0]))
        shape = hs.shape
        flat = hs.reshape(shape[0], shape[1], shape[2], -1)
        return torch.einsum("tuc,ubcn->tbcn", alpha, flat).reshape(shape)

    # ------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> SharedFeatures:
        """``x [B, ...]`` -> ``{task: [B, out_features]}``; representation None (see class doc).

        Every column runs whatever ``tasks`` asks for, since every task mixes every column.
        """
        names = self.task_names if tasks is None else list(tasks)
        columns = self._all_columns()
        hs = [col.prepare(x) for col in columns]
        for s, alpha in enumerate(self.units):
            stacked = torch.stack([col.stages[s](h) for col, h in zip(columns, hs)])
            hs = list(self._mix(alpha, stacked).unbind(0))
        features = {
            t: self.check_feature_map(hs[i]) if t in self.map_tasks else columns[i].pool(hs[i])
            for i, t in enumerate(self.task_names)
            if t in names
        }
        missing = [t for t in names if t not in features]
        if missing:
            raise KeyError(f"CrossStitch has no column for task(s) {missing}; it has {self.task_names}.")
        return SharedFeatures({t: features[t] for t in names}, None)

    def shared_parameters(self) -> list[nn.Parameter]:
        """All columns and units: every task depends on every column through the units."""
        return [p for p in self.parameters() if p.requires_grad]
