"""Progressive layered extraction (PLE) and its one-level form, customized gate control (CGC); see
mtl.sharing.experts."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from mtl.backbones.base import Backbone
from mtl.sharing.base import SharedFeatures, Sharing
from mtl.sharing.experts import check_tasks, make_expert, mix


class _ExtractionLevel(nn.Module):
    """One extraction level of PLE (a CGC block).

    Experts: ``num_shared`` shared ones reading the shared input, ``num_task`` per task reading that
    task's input. Task ``t``'s gate reads its input and mixes ``[shared experts, t's experts]``; the
    optional shared gate reads the shared input and mixes ``[shared experts, every task's experts]``
    (tasks in insertion order).
    """

    def __init__(
        self,
        in_features: int,
        tasks: Sequence[str],
        num_shared: int,
        num_task: int,
        hidden: Sequence[int],
        out_features: int,
        shared_gate: bool,
    ) -> None:
        super().__init__()
        self.in_features, self.num_shared, self.num_task = in_features, num_shared, num_task
        self.hidden, self.out_features = list(hidden), out_features
        self.shared_experts = nn.ModuleList(self._expert() for _ in range(num_shared))
        self.task_experts = nn.ModuleDict()
        self.task_gates = nn.ModuleDict()
        self.shared_gate = nn.Linear(in_features, num_shared + num_task * len(tasks)) if shared_gate else None
        for t in tasks:
            self._add_task(t)

    def _expert(self) -> nn.Sequential:
        return make_expert(self.in_features, self.hidden, self.out_features)

    def _add_task(self, task: str) -> None:
        self.task_experts[task] = nn.ModuleList(self._expert() for _ in range(self.num_task))
        self.task_gates[task] = nn.Linear(self.in_features, self.num_shared + self.num_task)

    def forward(
        self, task_inputs: dict[str, Tensor], shared_input: Tensor, tasks: Sequence[str]
    ) -> tuple[dict[str, Tensor], Tensor | None]:
        """Inputs ``[B, in_features]`` -> ``({task: [B, out]}, shared [B, out] or None)``.

        With a shared gate, every task's experts run (the shared gate mixes them all).
        """
        shared = [e(shared_input) for e in self.shared_experts]
        run = list(self.task_experts) if self.shared_gate is not None else list(tasks)
        own = {t: [e(task_inputs[t]) for e in self.task_experts[t]] for t in run}
        out = {}
        for t in tasks:
            weights = torch.softmax(self.task_gates[t](task_inputs[t]), dim=-1)
            out[t] = mix(weights, torch.stack(shared + own[t], dim=1))
        shared_out = None
        if self.shared_gate is not None:
            every = shared + [h for t in self.task_experts for h in own[t]]
            weights = torch.softmax(self.shared_gate(shared_input), dim=-1)
            shared_out = mix(weights, torch.stack(every, dim=1))
        return out, shared_out


class PLE(Sharing):
    r"""Progressive Layered Extraction (Tang, Liu, Zhao & Gong, "Progressive Layered Extraction
    (PLE): A Novel Multi-Task Learning (MTL) Model for Personalized Recommendations", RecSys 2020).

    ``num_levels`` extraction levels stacked on the backbone output :math:`r`. Level ``l`` holds
    ``num_shared_experts`` shared experts :math:`S^l` and ``num_task_experts`` experts :math:`E^l_t`
    per task. With task inputs :math:`x^l_t` and a shared input :math:`x^l_s` (all equal to
    :math:`r` at level 0):

    .. math::
        x^{l+1}_t = \mathrm{softmax}(W^l_t x^l_t)\cdot[S^l(x^l_s), E^l_t(x^l_t)], \qquad
        x^{l+1}_s = \mathrm{softmax}(W^l_s x^l_s)\cdot[S^l(x^l_s), E^l_1(x^l_1), .., E^l_T(x^l_T)]

    The shared gate :math:`W^l_s` exists in the inner levels only; the last level's task outputs
    are the task features (``out_features = expert_out``). One level is :class:`CGC`.

    **Shared representation:** the backbone output ``rep = backbone(x)`` (exact; see module doc).

    **Shared parameters** (those every task's loss reaches): the backbone, every shared expert and
    shared gate, and the task-specific parts that feed a shared gate: a task's experts of level
    ``l`` when ``l <= num_levels - 2`` (mixed by that level's shared gate) and its gate of level
    ``l`` when ``l <= num_levels - 3`` (it feeds the task's experts of the next level). The rest,
    including everything of the last level, is task-specific.

    Args:
        backbone: any :class:`~mtl.backbones.base.Backbone`.
        tasks: task names.
        num_levels: number of extraction levels (1 gives CGC).
        num_shared_experts: shared experts per level.
        num_task_experts: experts per task and level.
        expert_hidden: hidden widths of each expert MLP.
        expert_out: width of each expert's output = ``out_features``.
        map_tasks: tasks whose head reads a feature map: refused (ValueError), see mtl.sharing.base.
    """

    def __init__(
        self,
        backbone: Backbone,
        tasks: Sequence[str],
        num_levels: int = 2,
        num_shared_experts: int = 2,
        num_task_experts: int = 1,
        expert_hidden: Sequence[int] = (64,),
        expert_out: int = 32,
        map_tasks: Sequence[str] = (),
    ) -> None:
        super().__init__(backbone, tasks, map_tasks)
        self.refuse_map_tasks("its experts and gates mix the backbone's pooled vector, and the PLE paper defines no experts over feature maps.")
        if num_levels < 1:
            raise ValueError(f"sharing.num_levels must be at least 1, got {num_levels}.")
        if num_shared_experts < 0 or num_task_experts < 0 or num_shared_experts + num_task_experts < 1:
            raise ValueError(
                "sharing.num_shared_experts and sharing.num_task_experts must be non-negative and "
                f"give each task at least one expert, got {num_shared_experts} and {num_task_experts}."
            )
        self.num_levels = int(num_levels)
        self.num_shared_experts = int(num_shared_experts)
        self.num_task_experts = int(num_task_experts)
        self.expert_hidden = [int(h) for h in expert_hidden]
        self.out_features = int(expert_out)
        self.levels = nn.ModuleList(
            _ExtractionLevel(
                backbone.out_features if l == 0 else self.out_features,
                self.task_names,
                self.num_shared_experts,
                self.num_task_experts,
                self.expert_hidden,
                self.out_features,
                shared_gate=l < self.num_levels - 1,
            )
            for l in range(self.num_levels)
        )

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> SharedFeatures:
        """``x [B, ...]`` -> ``{task: [B, expert_out]}``, representation ``[B, backbone.out_features]``."""
        names = self.task_names if tasks is None else list(tasks)
        check_tasks(self, names)
        rep = self.backbone(x)
        task_inputs = {t: rep for t in self.task_names}
        shared_input = rep
        for l, level in enumerate(self.levels):
            # Inner levels compute every task: the shared gate of the next level mixes them all.
            run = names if l == self.num_levels - 1 else self.task_names
            task_inputs, shared_input = level(task_inputs, shared_input, run)
        return SharedFeatures({t: task_inputs[t] for t in names}, rep)

    def shared_parameters(self) -> list[nn.Parameter]:
        """Backbone, shared experts and gates, and task parts feeding a shared gate (class doc)."""
        params = list(self.backbone.parameters())
        for l, level in enumerate(self.levels):
            params += list(level.shared_experts.parameters())
            if level.shared_gate is not None:
                params += list(level.shared_gate.parameters())
            if l <= self.num_levels - 2:
                params += list(level.task_experts.parameters())
            if l <= self.num_levels - 3:
                params += list(level.task_gates.parameters())
        return [p for p in params if p.requires_grad]


class CGC(PLE):
    r"""Customized Gate Control (Tang et al., RecSys 2020, the single-level building block of PLE).

    ``num_shared_experts`` shared experts and ``num_task_experts`` experts per task read the
    backbone output :math:`r`; task ``t``'s softmax gate mixes the shared experts and its own:
    :math:`h_t = \mathrm{softmax}(W_t r)\cdot[S_1(r)..S_{m_s}(r), E_{t,1}(r)..E_{t,m_t}(r)]`.

    **Shared representation:** the backbone output ``rep = backbone(x)`` (exact; see module doc).
    **Shared parameters:** backbone and shared experts; task experts and gates are task-specific.
    Parameters above the
    backbone: ``(m_s + T * m_t) * expert + T * (in * (m_s + m_t) + m_s + m_t)``.

    Args:
        backbone: any :class:`~mtl.backbones.base.Backbone`.
        tasks: task names.
        num_shared_experts: shared experts ``m_s``.
        num_task_experts: experts per task ``m_t``.
        expert_hidden: hidden widths of each expert MLP.
        expert_out: width of each expert's output = ``out_features``.
        map_tasks: tasks whose head reads a feature map: refused (ValueError), see mtl.sharing.base.
    """

    def __init__(
        self,
        backbone: Backbone,
        tasks: Sequence[str],
        num_shared_experts: int = 2,
        num_task_experts: int = 1,
        expert_hidden: Sequence[int] = (64,),
        expert_out: int = 32,
        map_tasks: Sequence[str] = (),
    ) -> None:
        super().__init__(
            backbone, tasks, num_levels=1, num_shared_experts=num_shared_experts,
            num_task_experts=num_task_experts, expert_hidden=expert_hidden, expert_out=expert_out,
            map_tasks=map_tasks,
        )
