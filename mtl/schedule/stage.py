"""A stage of a training schedule, and the schedule's structured config.

:class:`Stage` is both the runtime description of a stage and its structured config: the schedule
presets in ``conf/schedule/`` extend :class:`ScheduleConfig` (registered in Hydra's ConfigStore as
``schedule/base``), so a preset lists only what differs from these defaults, an unknown key or a
value of the wrong type is refused with the key named, and every stage part that is an object
(policy, balancer, regularizers) is a ``_target_`` node built when the run starts.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

MODES = ("min", "max")


@dataclass
class Distill:
    """Distillation of a frozen teacher's predictions (LwF, Born-Again networks).

    Attributes:
        teacher: ``init`` (the stage's starting model: LwF), ``previous`` (the previous stage's best
            model: Born-Again generations) or a checkpoint path.
        tasks: the distilled tasks (None: the stage's targets). LwF distils the source heads:
            ``tasks: ${data.source_tasks}``.
        weight: multiplies the distillation term.
        temperature: softmax temperature of the multiclass distillation.
    """

    teacher: str = "init"
    tasks: Any = None
    weight: float = 1.0
    temperature: float = 2.0


@dataclass
class Stage:
    """One stage: which tasks, how long, where its weights come from, and how it trains.

    Args:
        name: the stage's key in ``schedule.stages``; also its directory name.
        tasks: target tasks (None: every task of the data).
        source_tasks: auxiliary source tasks trained alongside (combined schedule); the loss is
            ``alpha * mean(L_source) + (1 - alpha) * mean(L_target)``.
        alpha: weight of the source tasks; with ``alpha_schedule`` (``constant``, ``linear``,
            ``cosine``, ``step``) it moves to ``alpha_end`` across the stage.
        max_epochs: epochs of this stage (None: ``trainer.max_epochs``).
        lr: learning rate (None: the optimizer's).
        init: ``fresh`` (new weights), ``previous`` (the previous stage's best checkpoint) or a
            path to a Lightning checkpoint or ``state_dict`` file.
        init_key_map: ``{old_prefix: new_prefix}`` renaming the keys of the ``init`` file (an
            empty new prefix strips the old one).
        policy: the fine-tuning policy, a ``_target_`` node (``{_target_:
            mtl.transfer.policies.ProbeThenFull, probe_epochs: 40}``) or a policy object; None:
            everything trains at the base rate.
        regularizers: ``{name: _target_ node}`` of transfer terms (``mtl.transfer.L2SP``,
            ``BSS``, ``DELTA``).
        distill: a teacher to distil (see :class:`Distill`), or None.
        balancer: this stage's balancer, a ``{method: ..., engine: ...}`` node like
            ``conf/balancer/*.yaml`` (None: the run's ``balancer``).
        monitor: the logged metric that picks the best checkpoint; ``mode`` is ``min`` or ``max``.
    """

    name: str = ""
    # Any rather than Optional[List[str]]: these are often interpolations (${data.source_tasks}),
    # which a typed node would try to resolve while the schedule preset is merged on its own
    tasks: Any = None
    source_tasks: Any = field(default_factory=list)
    alpha: float = 0.5
    alpha_schedule: str = "constant"
    alpha_end: Optional[float] = None
    max_epochs: Optional[int] = None
    lr: Optional[float] = None
    init: str = "fresh"
    init_key_map: Dict[str, str] = field(default_factory=dict)
    policy: Any = None
    regularizers: Dict[str, Any] = field(default_factory=dict)
    # Any, not Optional[Distill]: OmegaConf cannot set a dict into a None structured node
    # (schedule.stages.<s>.distill={teacher:init}); __post_init__ checks it as a Distill
    distill: Any = None
    balancer: Any = None
    monitor: str = "val/loss"
    mode: str = "min"

    def __post_init__(self) -> None:
        where = f"schedule.stages.{self.name}"
        if self.tasks is not None and len(self.tasks) == 0:
            raise ValueError(
                f"{where}.tasks is empty; name at least one task (or null for all). A transfer or combined "
                f"schedule takes its stages' tasks from the data's roles: set data.source_tasks=[...] and "
                f"data.target_tasks=[...], or use schedule=multitask for one stage on every task."
            )
        if self.mode not in MODES:
            raise ValueError(f"{where}.mode must be 'min' or 'max', got '{self.mode}'.")
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"{where}.alpha must be in [0, 1], got {self.alpha}.")
        if self.max_epochs is not None and int(self.max_epochs) < 1:
            raise ValueError(f"{where}.max_epochs must be >= 1, got {self.max_epochs}.")
        overlap = set(self.tasks or []) & set(self.source_tasks)
        if overlap:
            raise ValueError(f"{where}: task(s) {sorted(overlap)} are both targets and sources.")
        for key in ("tasks", "source_tasks"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, str) or not all(isinstance(t, str) for t in value)):
                raise ValueError(f"{where}.{key} must be a list of task names, got {value!r}.")
        self.tasks = list(self.tasks) if self.tasks is not None else None
        self.source_tasks = list(self.source_tasks or [])
        if isinstance(self.distill, Mapping):
            unknown = sorted(set(self.distill) - {f.name for f in dataclasses.fields(Distill)})
            if unknown:
                raise ValueError(f"{where}.distill: unknown key(s) {unknown}; it takes teacher, tasks, weight, temperature.")
            self.distill = Distill(**self.distill)
        elif self.distill is not None and not isinstance(self.distill, Distill):
            raise ValueError(f"{where}.distill must be a mapping such as {{teacher: init}}, got {self.distill!r}.")

    @property
    def trained_tasks(self) -> list[str]:
        """Targets, then the sources that are not targets: the tasks whose losses this stage trains."""
        return list(self.tasks or []) + [s for s in self.source_tasks if s not in (self.tasks or [])]

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


@dataclass
class ScheduleConfig:
    """The ``schedule`` config group's schema: named stages run in order.

    Attributes:
        name: the schedule's name (shown in reports).
        epoch_cap: no stage trains more epochs than this, whatever its own ``max_epochs`` (the
            ``debug=*`` presets set it; None: no cap).
        fuse: names of stages whose best models are ensembled and souped at the end.
        stages: ``{name: Stage}`` in order; ``schedule.stages.<name>=null`` drops a stage.
    """

    name: str = "custom"
    epoch_cap: Optional[int] = None
    fuse: List[str] = field(default_factory=list)
    stages: Dict[str, Optional[Stage]] = field(default_factory=dict)


def stages_from_dict(stages: Mapping[str, Mapping[str, Any]] | None) -> list[Stage]:
    """Stages in order from ``{name: spec}`` (a spec of None drops that stage)."""
    out = [Stage.from_dict(str(name), spec) for name, spec in (stages or {}).items() if spec is not None]
    if not out:
        raise ValueError("schedule.stages is empty; a schedule needs at least one stage.")
    return out


def resolve_epochs(stages: list[Stage], default: int, cap: int | None = None) -> list[Stage]:
    """Every stage with its number of epochs set: its own ``max_epochs``, else ``default``
    (``trainer.max_epochs``), and at most ``cap`` (``schedule.epoch_cap``) when one is given."""
    if cap is not None and (isinstance(cap, bool) or int(cap) != cap or cap < 1):
        raise ValueError(f"schedule.epoch_cap must be a positive integer or null, got {cap!r}.")
    out = []
    for stage in stages:
        epochs = int(stage.max_epochs if stage.max_epochs is not None else default)
        out.append(dataclasses.replace(stage, max_epochs=min(epochs, int(cap)) if cap is not None else epochs))
    return out


def single_task_stages(stages: list[Stage], all_tasks: list[str]) -> list[Stage]:
    """The single-task baseline of a schedule: every stage becomes one stage per target task.

    Stage ``<name>`` with targets ``[a, b]`` becomes ``<name>-a`` and ``<name>-b``, each training
    its one task alone (no source tasks) from fresh weights (or the stage's checkpoint path), with
    the stage's epochs, learning rate and policy: the same backbone and budget as the multi-task
    run, one model per task.
    """
    out = []
    for stage in stages:
        for task in stage.tasks or all_tasks:
            init = stage.init if stage.init not in ("fresh", "previous") else "fresh"
            out.append(
                dataclasses.replace(stage, name=f"{stage.name}-{task}", tasks=[task], source_tasks=[], init=init)
            )
    return out

