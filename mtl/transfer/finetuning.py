"""Applying a fine-tuning policy to a model: parameter groups, learning-rate multipliers, frozen
normalisation statistics.

:class:`FineTuning` splits a :class:`~mtl.model.MultiTaskModel` into named parameter groups and
gives each group the policy's multiplier at every epoch:

==================  ==========================================================  ==================
group               parameters                                                  multiplier
==================  ==========================================================  ==================
``backbone.<i>``    backbone block ``i`` (its ``stages[i]``, bottom first)       the policy's ``m_i``
``sharing``         the shared parts of the sharing structure (MMoE's experts,  the top block's
                    MTAN's shared blocks, cross-stitch units)                   ``m_{n-1}``
``task_parts``      its task-specific parts (gates, task experts, attention)    the heads'
``heads``           the task heads                                              the heads'
``balancer``        learned task weights (UW, IMTL-L, GradNorm), no decay       1
==================  ==========================================================  ==================

A multiplier of 0 freezes a group: its learning rate is 0 for the step (``requires_grad`` is never
toggled, so DDP and checkpoint resume see a fixed set of trainable parameters) and its modules run
in eval mode (frozen normalisation statistics). The policy is a pure function of the epoch, so
every rank and every resumed run computes the same multipliers.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import nn

from mtl.transfer.policies import Full, FineTunePolicy, backbone_blocks

__all__ = ["FineTuning"]


class FineTuning:
    """A policy applied to one model.

    Args:
        model: the :class:`~mtl.model.MultiTaskModel`.
        policy: a :class:`~mtl.transfer.policies.FineTunePolicy` (None: :class:`Full`).
    """

    def __init__(self, model: nn.Module, policy: FineTunePolicy | None = None) -> None:
        if policy is not None and not isinstance(policy, FineTunePolicy):
            raise TypeError(
                f"policy must be a mtl.transfer.policies.FineTunePolicy (e.g. "
                f"{{_target_: mtl.transfer.policies.LinearProbe}}), got {type(policy).__name__}."
            )
        self.policy = policy or Full()
        self.model = model
        self.blocks = backbone_blocks(model.backbone)
        in_backbone = {id(p) for block in self.blocks for p in block}
        shared = {id(p) for p in model.sharing.shared_parameters()}
        rest = [p for p in model.sharing.parameters() if id(p) not in in_backbone]
        self.sharing = [p for p in rest if id(p) in shared]
        self.task_parts = [p for p in rest if id(p) not in shared]
        # the sharing structure's submodules made of shared parameters only follow the top block's
        # train/eval mode; the others (gates, task experts) follow the heads'
        self._shared_modules = [
            child
            for name, child in model.sharing.named_children()
            if name != "backbone" and any(True for _ in child.parameters())
            and all(id(p) in shared for p in child.parameters())
        ]

    def multipliers(self, epoch: int) -> dict[str, float]:
        """Learning-rate multiplier of every named group at ``epoch`` (0: frozen)."""
        blocks = self.policy.multipliers(epoch, len(self.blocks))
        head = self.policy.head_multiplier(epoch)
        out = {f"backbone.{i}": m for i, m in enumerate(blocks)}
        out.update(sharing=blocks[-1], task_parts=head, heads=head)
        return out

    def parameter_groups(self, balancer_params: Sequence[nn.Parameter] = (), weight_decay: bool = True) -> list[dict[str, Any]]:
        """Named parameter groups for the optimizer (empty groups dropped).

        Args:
            balancer_params: learned task weights (never decayed).
            weight_decay: False sets ``weight_decay=0`` on the model's groups (L2-SP replaces it).
        """
        groups = [{"name": f"backbone.{i}", "params": [p for p in b if p.requires_grad]} for i, b in enumerate(self.blocks)]
        groups += [
            {"name": "sharing", "params": [p for p in self.sharing if p.requires_grad]},
            {"name": "task_parts", "params": [p for p in self.task_parts if p.requires_grad]},
            {"name": "heads", "params": [p for p in self.model.heads.parameters() if p.requires_grad]},
        ]
        if not weight_decay:
            for g in groups:
                g["weight_decay"] = 0.0
        groups.append({"name": "balancer", "params": [p for p in balancer_params if p.requires_grad], "weight_decay": 0.0})
        return [g for g in groups if g["params"]]

    def set_modes(self, epoch: int) -> None:
        """Frozen blocks (and frozen shared sharing parts) in eval mode, the others in train mode."""
        frozen = [m == 0.0 for m in self.policy.multipliers(epoch, len(self.blocks))]
        for stage, is_frozen in zip(self.model.backbone.stages, frozen):
            if stage.training == is_frozen:
                stage.train(not is_frozen)
        for module in self._shared_modules:
            if module.training == frozen[-1]:
                module.train(not frozen[-1])

    def step(self, optimizer, epoch: int, closure: Callable[[], Any] | None = None) -> None:
        """One optimizer step with each group's learning rate times its multiplier; the
        scheduler's learning rates are restored afterwards."""
        inner = getattr(optimizer, "optimizer", optimizer)
        mults = self.multipliers(epoch)
        groups = [g for g in inner.param_groups if mults.get(g.get("name"), 1.0) != 1.0]
        saved = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = g["lr"] * mults[g["name"]]
        try:
            optimizer.step(closure=closure)
        finally:
            for g, lr in zip(groups, saved):
                g["lr"] = lr
