"""A stage of a training schedule."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

FREEZE = ("none", "backbone", "probe_then_full")
#: ``frozen_epochs`` used to mean "the whole stage".
ALWAYS = 10**9


@dataclass
class Stage:
    """One stage: which tasks, how long, where weights come from, what is frozen.

    Args:
        name: the stage's key in ``schedule.stages``; also its directory name.
        tasks: target tasks (None: every task of the data).
        source_tasks: auxiliary source tasks trained alongside (combined schedule); the loss is
            ``alpha * mean(L_source) + (1 - alpha) * mean(L_target)``.
        alpha: weight of the source tasks.
        max_epochs: epochs of this stage (None: ``trainer.max_epochs``).
        lr: learning rate (None: the optimizer's).
        init: ``fresh`` (new weights), ``previous`` (the previous stage's best checkpoint) or a
            path to a Lightning checkpoint or ``state_dict`` file.
        init_key_map: ``{old_prefix: new_prefix}`` renaming the keys of the ``init`` file (an
            empty new prefix strips the old one).
        freeze: ``none``, ``backbone`` (frozen throughout: a linear probe of the heads) or
            ``probe_then_full`` (frozen for ``probe_epochs`` epochs, then everything trains).
        probe_epochs: epochs with the backbone frozen under ``probe_then_full``.
        backbone_lr_scale: multiplies the backbone's learning rate when it trains.
        monitor: the logged metric that picks the best checkpoint; ``mode`` is ``min`` or ``max``.
        balancer: this stage's balancer config (None: the run's ``balancer``).
        policy: fine-tuning policy (``full``, ``linear_probe``, ``probe_then_full``,
            ``gradual_unfreeze``, ``discriminative_lr``, ``layer_decay``, ``backbone_ramp``); None
            keeps ``freeze``. ``policy_options`` are its arguments (e.g. ``{factor: 2.6}``).
        regularizers: ``{l2sp: alpha, bss: weight, delta: weight, lwf: weight}`` (0 or absent: off);
            ``regularizer_options`` tune them (``l2sp_beta``, ``bss_k``, ``lwf_tasks``).
        alpha_schedule: how ``alpha`` moves across the stage: ``constant``, ``linear``, ``cosine``
            or ``step`` from ``alpha`` to ``alpha_end``.
        teacher: distil a teacher's predictions: ``init`` (this stage's starting model, LwF-style),
            ``previous`` (the previous stage's best model, Born-Again-style) or a checkpoint path;
            None: no distillation. ``distill_weight`` and ``temperature`` set the term,
            ``distill_tasks`` the tasks (None: the stage's targets).
    """

    name: str
    tasks: list[str] | None = None
    source_tasks: list[str] = field(default_factory=list)
    alpha: float = 0.5
    max_epochs: int | None = None
    lr: float | None = None
    init: str = "fresh"
    init_key_map: dict[str, str] = field(default_factory=dict)
    freeze: str = "none"
    probe_epochs: int = 1
    backbone_lr_scale: float = 1.0
    monitor: str = "val/loss"
    mode: str = "min"
    balancer: Any = None
    policy: str | None = None
    policy_options: dict[str, Any] = field(default_factory=dict)
    regularizers: dict[str, float] = field(default_factory=dict)
    regularizer_options: dict[str, Any] = field(default_factory=dict)
    alpha_schedule: str = "constant"
    alpha_end: float | None = None
    teacher: str | None = None
    distill_tasks: list[str] | None = None
    distill_weight: float = 1.0
    temperature: float = 2.0

    def __post_init__(self) -> None:
        where = f"schedule.stages.{self.name}"
        if self.tasks is not None and len(self.tasks) == 0:
            raise ValueError(f"{where}.tasks is empty; name at least one task (or null for all).")
        if self.freeze not in FREEZE:
            raise ValueError(f"{where}.freeze must be one of {FREEZE}, got '{self.freeze}'.")
        if self.mode not in ("min", "max"):
            raise ValueError(f"{where}.mode must be 'min' or 'max', got '{self.mode}'.")
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"{where}.alpha must be in [0, 1], got {self.alpha}.")
        unknown_reg = sorted(set(self.regularizers or {}) - {"l2sp", "bss", "delta", "lwf"})
        if unknown_reg:
            raise ValueError(
                f"{where}.regularizers: unknown {unknown_reg}; choose among l2sp, bss, delta, lwf."
            )
        if self.max_epochs is not None and int(self.max_epochs) < 1:
            raise ValueError(f"{where}.max_epochs must be >= 1, got {self.max_epochs}.")
        overlap = set(self.tasks or []) & set(self.source_tasks)
        if overlap:
            raise ValueError(f"{where}: task(s) {sorted(overlap)} are both targets and sources.")
        self.tasks = list(self.tasks) if self.tasks is not None else None
        self.source_tasks = list(self.source_tasks or [])

    @property
    def frozen_epochs(self) -> int:
        """Number of initial epochs with the backbone frozen."""
        if self.freeze == "backbone":
            return ALWAYS
        if self.freeze == "probe_then_full":
            return int(self.probe_epochs)
        return 0

    @classmethod
    def from_dict(cls, name: str, spec: Mapping[str, Any] | None) -> "Stage":
        spec = dict(spec or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(
                f"schedule.stages.{name}: unknown key(s) {unknown}; a stage takes {sorted(known - {'name'})}."
            )
        spec.pop("name", None)
        return cls(name=name, **spec)


def stages_from_dict(stages: Mapping[str, Mapping[str, Any]] | None) -> list[Stage]:
    """Stages in order from ``{name: spec}`` (a spec of None drops that stage)."""
    out = [Stage.from_dict(str(name), spec) for name, spec in (stages or {}).items() if spec is not None]
    if not out:
        raise ValueError("schedule.stages is empty; a schedule needs at least one stage.")
    return out


def single_task_stages(stages: list[Stage], all_tasks: list[str]) -> list[Stage]:
    """The single-task baseline of a schedule: every stage becomes one stage per target task.

    Stage ``<name>`` with targets ``[a, b]`` becomes ``<name>-a`` and ``<name>-b``, each training
    its one task alone (no source tasks) from fresh weights (or the stage's checkpoint path), with
    the stage's epochs, learning rate and freezing: the same backbone and budget as the multi-task
    run, one model per task.
    """
    out = []
    for stage in stages:
        for task in stage.tasks or all_tasks:
            init = stage.init if stage.init not in ("fresh", "previous") else "fresh"
            spec = {**stage.__dict__, "name": f"{stage.name}-{task}", "tasks": [task], "source_tasks": [], "init": init}
            out.append(Stage(**spec))
    return out
