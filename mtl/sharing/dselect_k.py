"""Experts with DSelect-k gates; see mtl.sharing.experts."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from mtl.backbones.base import Backbone
from mtl.sharing.base import SharedFeatures, Sharing
from mtl.sharing.experts import check_tasks, make_expert, mix


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
    **Shared parameters:** backbone and experts; gates are task-specific.

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
        map_tasks: tasks whose head reads a feature map: refused (ValueError), see mtl.sharing.base.
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
        map_tasks: Sequence[str] = (),
    ) -> None:
        super().__init__(backbone, tasks, map_tasks)
        self.refuse_map_tasks("its experts and gates mix the backbone's pooled vector, and the DSelect-k paper defines no experts over feature maps.")
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
        check_tasks(self, names)
        rep = self.backbone(x)
        outs = torch.stack([e(rep) for e in self.experts], dim=1)  # [B, E, D]
        features, selectors = {}, []
        for t in names:
            gate, sel = self.gates[t](rep)
            features[t] = mix(gate, outs)
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

    def shared_parameters(self) -> list[nn.Parameter]:
        """Backbone and experts."""
        params = list(self.backbone.parameters()) + list(self.experts.parameters())
        return [p for p in params if p.requires_grad]
