"""Learning to Branch (Guo, Lee & Ulbricht, "Learning to Branch for Multi-Task Learning", ICML 2020)."""

from __future__ import annotations

import copy
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

from mtl.backbones.base import Backbone
from mtl.sharing.base import SharedFeatures, Sharing

__all__ = ["LTB", "Tree"]


class Tree(NamedTuple):
    """A discrete branching structure: who is whose parent.

    Attributes:
        stages: ``stages[s][i]`` is the parent (a node of stage ``s``) of node ``i`` of stage
            ``s + 1``, for ``s = 0 .. S-2``. The nodes of stage 0 all read the input.
        tasks: ``{task: node of the last stage that the task reads}``.
    """

    stages: list[list[int]]
    tasks: dict[str, int]


class LTB(Sharing):
    r"""A tree of backbone-stage copies whose branching is learned by Gumbel-softmax sampling.

    **Design space.** Stage ``s`` of the backbone (``s = 0 .. S-1``) holds ``N_s = nodes[s]``
    nodes, each a copy of ``backbone.stages[s]``: node 0 is the stage of the backbone passed in, the
    others are deep copies of it, re-initialised (every submodule's ``reset_parameters``) unless
    ``copy_weights``. Independent initial weights matter: identical nodes fed the same input give
    identical outputs, so the choice between them would get no gradient at the start. The input
    is the root: every stage-0 node reads it. Every other node, and every task (the leaves),
    is a *child* that reads exactly one *parent* of the stage below. Child ``i`` of stage ``s``
    chooses among the ``N_{s-1}`` parents with a categorical distribution of learned logits
    :math:`\theta^s_i \in \mathbb{R}^{N_{s-1}}`, :math:`p^s_{ij} = \mathrm{softmax}(\theta^s_i)_j`
    (the branching probabilities; initialised uniform), and task ``t`` chooses a node of the last
    stage with its own logits :math:`\theta^t \in \mathbb{R}^{N_{S-1}}`.

    **Branching by Gumbel-softmax.** In a training forward pass every child draws a relaxed one-hot
    sample (one draw per child per pass, shared by the whole batch)

    .. math::
        d^s_{ij} = \frac{\exp((\theta^s_{ij} + g_{ij}) / \tau)}
                        {\sum_k \exp((\theta^s_{ik} + g_{ik}) / \tau)},
        \qquad g_{ij} = -\log(-\log u_{ij}),\; u_{ij} \sim U(0, 1),

    and reads the mixture of its parents' outputs :math:`y^s_i = \sum_j d^s_{ij}\, x^{s-1}_j`
    (any shape: vectors or feature maps); task ``t``'s features are ``backbone.pool`` of
    :math:`\sum_j d^t_j x^{S-1}_j`. The sample is differentiable in :math:`\theta`, so the
    branching probabilities train with the network weights by the same task losses. As
    :math:`\tau \to 0` a sample becomes a one-hot choice of parent ``j`` with probability
    :math:`p_{ij}` (the Gumbel-max trick), so a low temperature trains the discrete tree.
    ``hard=True`` uses the straight-through estimator instead: the forward pass uses the one-hot
    ``argmax`` of the sample, the backward pass the gradient of the relaxed sample.

    **Temperature schedule.** A per-step geometric decay from ``temperature`` to
    ``min_temperature`` over ``anneal_steps`` training forward passes,

    .. math:: \tau_k = \tau_0 \, (\tau_{\min} / \tau_0)^{\min(k, K) / K},

    counted in the buffer ``steps`` (training-mode passes with gradients enabled; it is saved with
    the model, so resuming continues the schedule exactly). For the first ``warmup_steps`` passes
    every child averages all its parents (:math:`d_{ij} = 1 / N_{s-1}`).

    **Evaluation and the final tree.** In eval mode nothing is sampled: the weights are
    :math:`\mathrm{softmax}(\theta / \tau)` (the one-hot ``argmax`` when ``hard``), which tend to the
    most probable tree as the temperature falls. :meth:`tree` returns that tree and
    :meth:`fix_tree` commits to it (the paper's final architecture): from then on every pass, in
    training too, routes each child through its ``argmax`` parent only, and the logits no longer
    receive gradient. Retraining the fixed tree from fresh weights is up to the caller.

    **Shared representation.** The output of the *trunk*, the longest run of single-node stages
    from the input (``nodes = [1, 1, 2, ...]``: the stage-1 output), is exact: it is computed by
    shared parameters only and every task depends on it. Without a trunk (``nodes[0] > 1``, as by
    default) there is none (``representation=None``; balance over the parameters).

    **Shared parameters:** every node and the logits between stages (at any non-degenerate
    sample, every task reaches every node). Each task's leaf logits :math:`\theta^t` are
    task-specific.

    Differences from LibMTL's ``LTB`` (``LibMTL/architecture/LTB.py``), which is written for a
    ResNet with four layers: LibMTL has one node per task at every layer and ties task ``t`` to
    node ``t`` of the last layer (here the tasks are leaves that choose their parent, as in the
    paper, and ``nodes`` sets the widths; ``nodes=T`` is LibMTL's design space plus that last
    choice); it builds every node independently (as here, unless ``copy_weights``); it always
    uses the straight-through (hard) sample, where the default here is the relaxed one
    (``hard=True`` gives LibMTL's); its warm-up *sums* all parents for the first 1 % of
    the epochs (here an optional warm-up averages them, so the scale of a node's input does not
    grow with the number of parents); its temperature is :math:`\tau = E / (20 \sqrt{e + 1})` per
    epoch ``e`` of ``E`` (here per step, geometric, with explicit end points); and it never
    discretises the tree.

    Args:
        backbone: any :class:`~mtl.backbones.base.Backbone` (its ``stages`` are copied).
        tasks: task names, the leaves of the tree.
        nodes: number of nodes of each stage: one entry per backbone stage, or one number for
            every stage (default 2). ``[1] * S`` is hard sharing; ``len(tasks)`` is LibMTL's
            width. The default does not depend on the tasks, so that the stages of a schedule with
            different task sets (pretrain on two tasks, fine-tune on three) hand weights on.
        temperature: initial Gumbel-softmax temperature :math:`\tau_0`.
        min_temperature: final temperature :math:`\tau_{\min}`.
        anneal_steps: training passes over which the temperature decays (0: always ``min``).
        warmup_steps: first training passes in which every child averages its parents.
        hard: straight-through one-hot samples instead of relaxed ones.
        copy_weights: keep the backbone's weights in the copies (e.g. a backbone already holding
            pretrained weights) instead of re-initialising them.
    """

    def __init__(
        self,
        backbone: Backbone,
        tasks: Sequence[str],
        nodes: int | Sequence[int] = 2,
        temperature: float = 5.0,
        min_temperature: float = 0.5,
        anneal_steps: int = 2000,
        warmup_steps: int = 0,
        hard: bool = False,
        copy_weights: bool = False,
    ) -> None:
        super().__init__(backbone, tasks)
        if not self.task_names:
            raise ValueError("LTB needs at least one task.")
        num_stages = len(backbone.stages)
        widths = [int(nodes)] * num_stages if isinstance(nodes, int) else [int(n) for n in nodes]
        if len(widths) != num_stages or min(widths, default=0) < 1:
            raise ValueError(
                f"sharing.nodes must be a positive number of nodes, or one for each of the "
                f"backbone's {num_stages} stages, got {nodes}."
            )
        if not 0 < min_temperature <= temperature:
            raise ValueError(
                f"LTB needs 0 < min_temperature <= temperature, got {min_temperature} and {temperature}."
            )
        if anneal_steps < 0 or warmup_steps < 0:
            raise ValueError(f"anneal_steps and warmup_steps must be >= 0, got {anneal_steps} and {warmup_steps}.")
        self.nodes = widths
        self.initial_temperature = float(temperature)
        self.min_temperature = float(min_temperature)
        self.anneal_steps = int(anneal_steps)
        self.warmup_steps = int(warmup_steps)
        self.hard = bool(hard)
        self.copy_weights = bool(copy_weights)
        self.out_features = backbone.out_features
        ref = self._reference_tensor()
        # Nodes 1.. of every stage (node 0 is backbone.stages[s], registered once under backbone).
        self.copies = nn.ModuleList(
            nn.ModuleList(self._copy(backbone.stages[s]) for _ in range(widths[s] - 1)) for s in range(num_stages)
        )
        # branch_logits[s - 1]: [N_s, N_{s-1}], the parent logits of stage s's nodes (s >= 1)
        self.branch_logits = nn.ParameterList(
            nn.Parameter(ref.new_zeros(widths[s], widths[s - 1])) for s in range(1, num_stages)
        )
        # leaves[t].logits: [N_{S-1}], task t's parent logits (named sharing.leaves.<task>.logits,
        # so that loading weights treats them as task-specific: a new task starts uniform)
        self.leaves = nn.ModuleDict({t: _Leaf(ref.new_zeros(widths[-1])) for t in self.task_names})
        self.register_buffer("steps", torch.zeros((), dtype=torch.long, device=ref.device))
        self.register_buffer("fixed", torch.zeros((), dtype=torch.bool, device=ref.device))

    # ------------------------------------------------------------------------------- helpers
    def _reference_tensor(self) -> Tensor:
        for p in self.backbone.parameters():
            return p.detach()
        return torch.zeros(())

    def _copy(self, stage: nn.Module) -> nn.Module:
        node = copy.deepcopy(stage)
        if not self.copy_weights:
            for m in node.modules():
                if callable(getattr(m, "reset_parameters", None)):
                    m.reset_parameters()
        return node

    def stage_nodes(self, s: int) -> list[nn.Module]:
        """The ``nodes[s]`` modules of stage ``s`` (node 0 is ``backbone.stages[s]``)."""
        return [self.backbone.stages[s], *self.copies[s]]

    @property
    def trunk(self) -> int:
        """Number of single-node stages from the input (their output is the shared representation)."""
        n = 0
        while n < len(self.nodes) and self.nodes[n] == 1:
            n += 1
        return n

    def temperature(self) -> Tensor:
        """The current temperature :math:`\\tau_k` (a 0-d tensor, no host synchronisation)."""
        k = self.steps.to(torch.float32)
        if self.anneal_steps == 0:
            return torch.full_like(k, self.min_temperature)
        frac = torch.clamp(k / self.anneal_steps, max=1.0)
        ratio = self.min_temperature / self.initial_temperature
        return self.initial_temperature * torch.pow(torch.full_like(k, ratio), frac)

    def branch_weights(self, logits: Tensor, tau: Tensor | None = None) -> Tensor:
        """Mixing weights ``[children, parents]`` (rows sum to 1) for ``logits [children, parents]``.

        Training mode: a Gumbel-softmax sample at temperature ``tau`` (straight-through one-hot if
        ``hard``; the uniform average during warm-up). Eval mode: ``softmax(logits / tau)`` (one-hot
        ``argmax`` if ``hard``). After :meth:`fix_tree`: the one-hot ``argmax`` in both modes.
        """
        tau = self.temperature() if tau is None else tau
        tau = tau.to(logits.dtype)
        onehot = nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
        if self.training:
            u = torch.rand_like(logits).clamp_(torch.finfo(logits.dtype).tiny, 1.0)
            soft = torch.softmax((logits - torch.log(-torch.log(u))) / tau, dim=-1)
            if self.hard:
                hard = nn.functional.one_hot(soft.argmax(-1), logits.shape[-1]).to(logits.dtype)
                soft = hard - soft.detach() + soft
            uniform = torch.full_like(logits, 1.0 / logits.shape[-1])
            weights = torch.where(self.steps < self.warmup_steps, uniform, soft)
        else:
            weights = onehot if self.hard else torch.softmax(logits / tau, dim=-1)
        return torch.where(self.fixed, onehot, weights)

    @staticmethod
    def _mix(weights: Tensor, outputs: list[Tensor]) -> list[Tensor]:
        """``weights [C, P]``, ``P`` parent outputs ``[B, ...]`` -> ``C`` child inputs ``[B, ...]``."""
        if len(outputs) == 1:
            return [weights[i, 0] * outputs[0] for i in range(weights.shape[0])]
        mixed = torch.tensordot(weights, torch.stack(outputs), dims=([1], [0]))
        return list(mixed.unbind(0))

    # ------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> SharedFeatures:
        """``x [B, ...]`` -> ``{task: [B, out_features]}``; the trunk's output as representation."""
        names = self.task_names if tasks is None else list(tasks)
        missing = [t for t in names if t not in self.leaves]
        if missing:
            raise KeyError(f"LTB has no leaf for task(s) {missing}; it has {self.task_names}.")
        tau = self.temperature()
        h = [self.backbone.prepare(x)]
        rep = None
        for s in range(len(self.nodes)):
            nodes = self.stage_nodes(s)
            inputs = h * len(nodes) if s == 0 else self._mix(self.branch_weights(self.branch_logits[s - 1], tau), h)
            h = [node(inp) for node, inp in zip(nodes, inputs)]
            if s == self.trunk - 1:
                rep = h[0]
        features = {}
        for t in names:
            w = self.branch_weights(self.leaves[t].logits.unsqueeze(0), tau)
            features[t] = self.backbone.pool(self._mix(w, h)[0])
        if self.training and torch.is_grad_enabled():
            self.steps += 1
        return SharedFeatures(features, rep)

    # ------------------------------------------------------------------------------- the tree
    @torch.no_grad()
    def branching_probabilities(self) -> tuple[list[Tensor], dict[str, Tensor]]:
        """``softmax`` of the logits: ``[N_s, N_{s-1}]`` for stages 1..S-1, ``{task: [N_{S-1}]}``."""
        stages = [torch.softmax(p, dim=-1) for p in self.branch_logits]
        return stages, {t: torch.softmax(leaf.logits, dim=-1) for t, leaf in self.leaves.items()}

    @torch.no_grad()
    def tree(self) -> Tree:
        """The most probable tree: every child's ``argmax`` parent."""
        stages = [p.argmax(-1).tolist() for p in self.branch_logits]
        return Tree(stages, {t: int(leaf.logits.argmax()) for t, leaf in self.leaves.items()})

    @torch.no_grad()
    def fix_tree(self) -> Tree:
        """Commit to :meth:`tree`: every later pass routes each child through its argmax parent."""
        self.fixed.fill_(True)
        return self.tree()

    def shared_parameters(self) -> list[nn.Parameter]:
        """Every node and the logits between stages; the tasks' leaf logits are task-specific."""
        own = {id(p) for p in self.leaves.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in own]


class _Leaf(nn.Module):
    """A task's parent logits ``[N_{S-1}]`` over the last stage's nodes."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)
