"""Mixture-of-experts sharing: MMoE / one-gate MoE, CGC, PLE and DSelect-k.

All of them put the experts *on top of* the backbone: the backbone is the shared bottom, its pooled
output ``rep = backbone(x)`` (``[B, backbone.out_features]``) is the input of every expert and every
gate, and each task's features are a gated mixture of expert outputs (``[B, expert_out]``). So
``rep`` is an exact shared representation: it is computed by shared parameters only and everything
task-specific lies downstream of it; it is returned as ``SharedFeatures.representation``. Gradients
with respect to ``rep`` cover the backbone; the experts above it are shared too and are then
updated with the plain sum of the task gradients.

An expert is an MLP: ``Linear -> ReLU`` for each width in ``expert_hidden`` and then for
``expert_out`` (the paper's experts are ReLU layers), so expert outputs are non-negative.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from mtl.backbones.base import Backbone
from mtl.sharing.base import SharedFeatures, Sharing


def make_expert(in_features: int, hidden: Sequence[int], out_features: int) -> nn.Sequential:
    """An expert MLP ``[B, in_features] -> [B, out_features]``: ``Linear -> ReLU`` per layer."""
    layers: list[nn.Module] = []
    width = int(in_features)
    for h in [*hidden, out_features]:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        width = int(h)
    return nn.Sequential(*layers)


def _like(module: nn.Module, reference: nn.Module) -> nn.Module:
    """``module`` moved to the device and dtype of ``reference``'s parameters (for add_tasks)."""
    ref = next(reference.parameters(), None)
    return module if ref is None else module.to(device=ref.device, dtype=ref.dtype)


def _mix(weights: Tensor, expert_outputs: Tensor) -> Tensor:
    """``weights [B, E]``, ``expert_outputs [B, E, D]`` -> ``[B, D]``."""
    return torch.einsum("be,bed->bd", weights, expert_outputs)


def _check_tasks(module: Sharing, names: Sequence[str]) -> None:
    missing = [t for t in names if t not in module.task_names]
    if missing:
        raise KeyError(f"{type(module).__name__} does not serve task(s) {missing}; it has {module.task_names}.")


# ============================================================================================ MMoE
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
    gates are task-specific. **Adding tasks** creates a fresh gate per new task (nothing with one
    gate). Parameters above the backbone: ``E * expert + T * (in * E + E)`` (one gate if single).

    Args:
        backbone: any :class:`~mtl.backbones.base.Backbone`.
        tasks: task names.
        num_experts: number of experts ``E``.
        expert_hidden: hidden widths of each expert MLP.
        expert_out: width of each expert's output = ``out_features``.
        single_gate: one gate for all tasks (OMoE) instead of one per task.
    """

    def __init__(
        self,
        backbone: Backbone,
        tasks: Sequence[str],
        num_experts: int = 4,
        expert_hidden: Sequence[int] = (64,),
        expert_out: int = 32,
        single_gate: bool = False,
    ) -> None:
        super().__init__(backbone, tasks)
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
        _check_tasks(self, names)
        rep = self.backbone(x)
        outs = torch.stack([e(rep) for e in self.experts], dim=1)  # [B, E, D]
        weights = self.expert_weights(rep, names)
        return SharedFeatures({t: _mix(weights[t], outs) for t in names}, rep)

    def add_tasks(self, tasks: Sequence[str]) -> None:
        new = [t for t in dict.fromkeys(tasks) if t not in self.task_names]
        super().add_tasks(new)
        if not self.single_gate:
            for t in new:
                self.gates[t] = _like(nn.Linear(self.backbone.out_features, self.num_experts), self)

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
    shared parameters are the backbone, the experts and the gate; adding tasks adds nothing.
    """

    def __init__(
        self,
        backbone: Backbone,
        tasks: Sequence[str],
        num_experts: int = 4,
        expert_hidden: Sequence[int] = (64,),
        expert_out: int = 32,
    ) -> None:
        super().__init__(backbone, tasks, num_experts, expert_hidden, expert_out, single_gate=True)


# ======================================================================================= CGC / PLE
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

    def add_task(self, task: str) -> None:
        """New experts and gate for ``task``; the shared gate grows fresh rows for its experts."""
        self._add_task(task)
        _like(self.task_experts[task], self)
        _like(self.task_gates[task], self)
        if self.shared_gate is not None:
            old = self.shared_gate
            grown = _like(nn.Linear(self.in_features, old.out_features + self.num_task), self)
            with torch.no_grad():
                grown.weight[: old.out_features] = old.weight
                grown.bias[: old.out_features] = old.bias
            grown.weight.requires_grad_(old.weight.requires_grad)
            grown.bias.requires_grad_(old.bias.requires_grad)
            self.shared_gate = grown

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
            out[t] = _mix(weights, torch.stack(shared + own[t], dim=1))
        shared_out = None
        if self.shared_gate is not None:
            every = shared + [h for t in self.task_experts for h in own[t]]
            weights = torch.softmax(self.shared_gate(shared_input), dim=-1)
            shared_out = _mix(weights, torch.stack(every, dim=1))
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

    **Adding tasks** creates fresh experts and gates for the new task at every level; each inner
    shared gate grows fresh rows for the new experts (its existing rows are kept).

    Args:
        backbone: any :class:`~mtl.backbones.base.Backbone`.
        tasks: task names.
        num_levels: number of extraction levels (1 gives CGC).
        num_shared_experts: shared experts per level.
        num_task_experts: experts per task and level.
        expert_hidden: hidden widths of each expert MLP.
        expert_out: width of each expert's output = ``out_features``.
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
    ) -> None:
        super().__init__(backbone, tasks)
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
        _check_tasks(self, names)
        rep = self.backbone(x)
        task_inputs = {t: rep for t in self.task_names}
        shared_input = rep
        for l, level in enumerate(self.levels):
            # Inner levels compute every task: the shared gate of the next level mixes them all.
            run = names if l == self.num_levels - 1 else self.task_names
            task_inputs, shared_input = level(task_inputs, shared_input, run)
        return SharedFeatures({t: task_inputs[t] for t in names}, rep)

    def add_tasks(self, tasks: Sequence[str]) -> None:
        new = [t for t in dict.fromkeys(tasks) if t not in self.task_names]
        super().add_tasks(new)
        for t in new:
            for level in self.levels:
                level.add_task(t)

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
    **Adding tasks** creates fresh experts and a gate for each new task. Parameters above the
    backbone: ``(m_s + T * m_t) * expert + T * (in * (m_s + m_t) + m_s + m_t)``.

    Args:
        backbone: any :class:`~mtl.backbones.base.Backbone`.
        tasks: task names.
        num_shared_experts: shared experts ``m_s``.
        num_task_experts: experts per task ``m_t``.
        expert_hidden: hidden widths of each expert MLP.
        expert_out: width of each expert's output = ``out_features``.
    """

    def __init__(
        self,
        backbone: Backbone,
        tasks: Sequence[str],
        num_shared_experts: int = 2,
        num_task_experts: int = 1,
        expert_hidden: Sequence[int] = (64,),
        expert_out: int = 32,
    ) -> None:
        super().__init__(
            backbone, tasks, num_levels=1, num_shared_experts=num_shared_experts,
            num_task_experts=num_task_experts, expert_hidden=expert_hidden, expert_out=expert_out,
        )


# ======================================================================================= DSelect-k
def smooth_step(z: Tensor, gamma: float = 1.0) -> Tensor:
    r"""Cubic smooth step (Hazimeh et al., 2020): 0 for :math:`z \le -\gamma/2`, 1 for
    :math:`z \ge \gamma/2`, :math:`-\frac{2}{\gamma^3} z^3 + \frac{3}{2\gamma} z + \frac12` between.

    Once ``z`` leaves the middle region its gradient is 0, so a saturated selector stays binary.
    Elementwise on any shape.
    """
    z = z.clamp(-gamma / 2, gamma / 2)
    return (-2.0 / gamma**3) * z**3 + (1.5 / gamma) * z + 0.5


class DSelectKGate(nn.Module):
    r"""A DSelect-k gate over ``num_experts`` experts with at most ``k`` non-zero weights.

    ``k`` single-expert selectors each hold ``m = ceil(log2 n)`` logits :math:`z_i`; selector ``i``
    puts weight :math:`r(z_i)_j = \prod_{b} S(z_{ib})^{c_{jb}} (1 - S(z_{ib}))^{1 - c_{jb}}` on
    expert ``j`` (:math:`c_j` the binary code of ``j``, ``S`` the smooth step), a distribution over
    the :math:`2^m` codes that becomes one-hot once every :math:`S(z_{ib})` reaches 0 or 1. The gate
    is :math:`q = \sum_i \mathrm{softmax}(w)_i \, r(z_i)`. With ``per_example=True`` the logits are
    linear functions of the input (``z = W_z x``, ``w = W_w x``); otherwise they are parameters.

    When ``n`` is a power of 2, ``q`` is a distribution (non-negative, sums to 1). Otherwise codes
    ``n..2^m-1`` are unreachable, ``q`` sums to at most 1, and :meth:`regularization` includes the
    paper's term ``sum_i 1 / sum_j r(z_i)_j`` that keeps selectors on reachable experts.
    """

    def __init__(
        self, in_features: int, num_experts: int, k: int, gamma: float = 1.0, per_example: bool = True
    ) -> None:
        super().__init__()
        if num_experts < 2:
            raise ValueError(f"DSelect-k needs at least 2 experts, got {num_experts}.")
        if not 1 <= k <= num_experts:
            raise ValueError(f"DSelect-k needs 1 <= k <= num_experts={num_experts}, got k={k}.")
        self.num_experts, self.k, self.gamma, self.per_example = num_experts, k, float(gamma), per_example
        self.num_bits = math.ceil(math.log2(num_experts))
        self.power_of_2 = num_experts == 2**self.num_bits
        codes = [[(j >> b) & 1 for b in range(self.num_bits)] for j in range(num_experts)]
        self.register_buffer("codes", torch.tensor(codes, dtype=torch.bool), persistent=False)
        # Official initialisation: z near 0 (every selector starts uniform), w small.
        z_scale = self.gamma / 100
        if per_example:
            self.z_logits = nn.Linear(in_features, k * self.num_bits)
            self.w_logits = nn.Linear(in_features, k)
            for lin, scale in ((self.z_logits, z_scale), (self.w_logits, 0.05)):
                nn.init.uniform_(lin.weight, -scale, scale)
                nn.init.uniform_(lin.bias, -scale, scale)
        else:
            self.z_logits = nn.Parameter(torch.empty(k, self.num_bits).uniform_(-z_scale, z_scale))
            self.w_logits = nn.Parameter(torch.empty(k).uniform_(-0.05, 0.05))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [B, in_features]`` -> (gate ``[B, num_experts]``, selector outputs ``[B, k, num_experts]``)."""
        batch = x.shape[0]
        if self.per_example:
            z = self.z_logits(x).view(batch, self.k, 1, self.num_bits)
            w = self.w_logits(x)
        else:
            z = self.z_logits.view(1, self.k, 1, self.num_bits).expand(batch, -1, -1, -1)
            w = self.w_logits.view(1, self.k).expand(batch, -1)
        s = smooth_step(z, self.gamma)
        selectors = torch.where(self.codes, s, 1 - s).prod(dim=-1)  # [B, k, n]
        gate = (torch.softmax(w, dim=-1).unsqueeze(-1) * selectors).sum(dim=1)
        return gate, selectors


class DSelectK(Sharing):
    r"""Experts with DSelect-k gates (Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen, Mazumder, Hong
    & Chi, "DSelect-k: Differentiable Selection in the Mixture of Experts with Applications to
    Multi-Task Learning", NeurIPS 2021).

    Like :class:`MMoE`, but each task's softmax gate is replaced by a :class:`DSelectKGate`, which
    is differentiable and converges to weights with at most ``k`` non-zeros: task ``t``'s features
    are :math:`h_t = \sum_e q_t(r)_e f_e(r)`. Use a power of 2 for ``num_experts`` so that every
    gate is a distribution throughout training. A mixture of more than ``k`` experts can be a
    stationary point of the task losses; ``entropy_reg`` is what drives the selectors to binary
    (and so to at most ``k`` experts), so raise it if they do not saturate.

    **Regularization.** :meth:`regularization` returns a scalar to add to the training loss,
    computed from the last forward pass in training mode (0 if there is none): ``entropy_reg``
    times the entropy of every selector (``-sum_j r_j log r_j``, summed over selectors and tasks,
    averaged over the batch; it speeds up convergence to ``k`` experts), plus, when ``num_experts``
    is not a power of 2, the paper's reachability term ``sum 1 / sum_j r_j`` (same averaging).

    **Shared representation:** the backbone output ``rep = backbone(x)`` (exact; see module doc).
    **Shared parameters:** backbone and experts; gates are task-specific. **Adding tasks** creates a
    fresh gate per new task.

    Args:
        backbone: any :class:`~mtl.backbones.base.Backbone`.
        tasks: task names.
        num_experts: number of experts ``n``.
        k: maximum number of experts each task selects.
        expert_hidden: hidden widths of each expert MLP.
        expert_out: width of each expert's output = ``out_features``.
        gamma: width of the smooth step's cubic region.
        entropy_reg: weight of the entropy regularization (0: off).
        per_example: gates conditioned on the input (True) or static per task (False).
    """

    def __init__(
        self,
        backbone: Backbone,
        tasks: Sequence[str],
        num_experts: int = 4,
        k: int = 2,
        expert_hidden: Sequence[int] = (64,),
        expert_out: int = 32,
        gamma: float = 1.0,
        entropy_reg: float = 0.0,
        per_example: bool = True,
    ) -> None:
        super().__init__(backbone, tasks)
        self.num_experts, self.k = int(num_experts), int(k)
        self.expert_hidden = [int(h) for h in expert_hidden]
        self.out_features = int(expert_out)
        self.gamma, self.entropy_reg, self.per_example = float(gamma), float(entropy_reg), bool(per_example)
        in_features = backbone.out_features
        self.experts = nn.ModuleList(
            make_expert(in_features, self.expert_hidden, self.out_features) for _ in range(self.num_experts)
        )
        self.gates = nn.ModuleDict({t: self._gate() for t in self.task_names})
        self._selectors: list[Tensor] = []

    def _gate(self) -> DSelectKGate:
        return DSelectKGate(self.backbone.out_features, self.num_experts, self.k, self.gamma, self.per_example)

    def expert_weights(self, rep: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Gate outputs ``{task: [B, num_experts]}`` for ``rep [B, in]``."""
        names = self.task_names if tasks is None else list(tasks)
        return {t: self.gates[t](rep)[0] for t in names}

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> SharedFeatures:
        """``x [B, ...]`` -> ``{task: [B, expert_out]}``, representation ``[B, backbone.out_features]``."""
        names = self.task_names if tasks is None else list(tasks)
        _check_tasks(self, names)
        rep = self.backbone(x)
        outs = torch.stack([e(rep) for e in self.experts], dim=1)  # [B, E, D]
        features, selectors = {}, []
        for t in names:
            gate, sel = self.gates[t](rep)
            features[t] = _mix(gate, outs)
            selectors.append(sel)
        # Kept for regularization(); only in training so that evaluation holds no graph.
        self._selectors = selectors if self.training else []
        return SharedFeatures(features, rep)

    def regularization(self) -> Tensor:
        """Scalar to add to the loss (see class doc); 0 before any training-mode forward pass."""
        ref = next(self.parameters())
        total = torch.zeros((), device=ref.device, dtype=ref.dtype)
        for sel in self._selectors:  # [B, k, n]
            if self.entropy_reg > 0:
                entropy = -(sel * torch.log(sel + 1e-6)).sum(dim=(1, 2)).mean()
                total = total + self.entropy_reg * entropy
            if self.num_experts & (self.num_experts - 1):  # not a power of 2
                total = total + (1.0 / sel.sum(dim=-1)).sum(dim=1).mean()
        return total

    def add_tasks(self, tasks: Sequence[str]) -> None:
        new = [t for t in dict.fromkeys(tasks) if t not in self.task_names]
        super().add_tasks(new)
        for t in new:
            self.gates[t] = _like(self._gate(), self)

    def shared_parameters(self) -> list[nn.Parameter]:
        """Backbone and experts."""
        params = list(self.backbone.parameters()) + list(self.experts.parameters())
        return [p for p in params if p.requires_grad]
