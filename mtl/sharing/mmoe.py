"""Multi-gate mixture-of-experts (MMoE) and its one-gate baseline (OMoE); see mtl.sharing.experts."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from mtl.backbones.base import Backbone
from mtl.sharing.base import SharedFeatures, Sharing
from mtl.sharing.experts import check_tasks, make_expert, mix


class MMoE(Sharing):
    r"""Multi-gate Mixture-of-Experts (Ma, Zhao, Yi, Chen, Hong & Chi, "Modeling Task Relationships
    in Multi-task Learning with Multi-gate Mixture-of-Experts", KDD 2018).

    ``num_experts`` experts :math:`f_1..f_E` read the backbone output :math:`r`; each task has a
    softmax gate over them:

    .. math:: h_t = \sum_{e=1}^{E} g_t(r)_e \, f_e(r), \qquad g_t(r) = \mathrm{softmax}(W_t r + b_t)

    ``single_gate=True`` is the paper's one-gate MoE baseline (OMoE, also :class:`OMoE`): one gate
    shared by all tasks, so every task gets the same features.

    **Shared representation:** the backbone output ``rep = backbone(x)`` (exact; see module doc).
    **Shared parameters:** backbone and experts (and the gate when ``single_gate``); the per-task
    gates are task-specific. Parameters above the backbone: ``E * expert + T * (in * E + E)`` (one gate if single).

    Args:
        backbone: any :class:`~mtl.backbones.base.Backbone`.
        tasks: task names.
        num_experts: number of experts ``E``.
        expert_hidden: hidden widths of each expert MLP.
        expert_out: width of each expert's output = ``out_features``.
        single_gate: one gate for all tasks (OMoE) instead of one per task.
        map_tasks: tasks whose head reads a feature map: refused (ValueError), see mtl.sharing.base.
    """

    def __init__(
        self,
        backbone: Backbone,
        tasks: Sequence[str],
        num_experts: int = 4,
        expert_hidden: Sequence[int] = (64,),
        expert_out: int = 32,
        single_gate: bool = False,
        map_tasks: Sequence[str] = (),
    ) -> None:
        super().__init__(backbone, tasks, map_tasks)
        self.refuse_map_tasks("its experts and gates mix the backbone's pooled vector, and the MMoE paper defines no experts over feature maps.")
        if num_experts < 1:
            raise ValueError(f"sharing.num_experts must be at least 1, got {num_experts}.")
        self.num_experts = int(num_experts)
        self.expert_hidden = [int(h) for h in expert_hidden]
        self.out_features = int(expert_out)
        self.single_gate = bool(single_gate)
        in_features = backbone.out_features
        self.experts = nn.ModuleList(
            make_expert(in_features, self.expert_hidden, self.out_features) for _ in range(self.num_experts)
        )
        # With one gate, every task reads the gate stored under the key "shared".
        gate_names = ["shared"] if self.single_gate else self.task_names
        self.gates = nn.ModuleDict({t: nn.Linear(in_features, self.num_experts) for t in gate_names})

    def _gate(self, task: str) -> nn.Linear:
        return self.gates["shared" if self.single_gate else task]

    def expert_weights(self, rep: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Gate outputs ``{task: [B, num_experts]}`` (non-negative, rows sum to 1) for ``rep [B, in]``."""
        names = self.task_names if tasks is None else list(tasks)
        return {t: torch.softmax(self._gate(t)(rep), dim=-1) for t in names}

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> SharedFeatures:
        """``x [B, ...]`` -> ``{task: [B, expert_out]}``, representation ``[B, backbone.out_features]``."""
        names = self.task_names if tasks is None else list(tasks)
        check_tasks(self, names)
        rep = self.backbone(x)
        outs = torch.stack([e(rep) for e in self.experts], dim=1)  # [B, E, D]
        weights = self.expert_weights(rep, names)
        return SharedFeatures({t: mix(weights[t], outs) for t in names}, rep)

    def shared_parameters(self) -> list[nn.Parameter]:
        """Backbone and experts (plus the gate in the single-gate variant)."""
        params = list(self.backbone.parameters()) + list(self.experts.parameters())
        if self.single_gate:
            params += list(self.gates.parameters())
        return [p for p in params if p.requires_grad]


class OMoE(MMoE):
    """One-gate Mixture-of-Experts, the baseline of the MMoE paper (Ma et al., KDD 2018).

    :class:`MMoE` with ``single_gate=True``: one softmax gate over the experts, shared by all tasks,
    so every task receives the same features. The shared representation is the backbone output;
    shared parameters are the backbone, the experts and the gate.
    """

    def __init__(
        self,
        backbone: Backbone,
        tasks: Sequence[str],
        num_experts: int = 4,
        expert_hidden: Sequence[int] = (64,),
        expert_out: int = 32,
        map_tasks: Sequence[str] = (),
    ) -> None:
        super().__init__(backbone, tasks, num_experts, expert_hidden, expert_out, single_gate=True, map_tasks=map_tasks)
