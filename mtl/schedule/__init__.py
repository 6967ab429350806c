"""Schedules: a list of stages run in order, with weights handed from one to the next.

``stage.py`` holds :class:`Stage` (also the structured config of ``schedule.stages.<name>``),
``parts.py`` builds a stage's balancer, policy and transfer terms from their ``_target_`` nodes,
``runner.py`` the :class:`ScheduleRunner` that trains, skips or resumes each stage (checking its
fingerprint first), and ``guards.py`` what keeps a run directory honest: the non-finite guard, the
stage checkpoint (finite best, atomic last every epoch) and the run directory's lock.
"""

from mtl.schedule.guards import NonFiniteError, NonFiniteGuard, RunLock, RunLockedError, StageCheckpoint
from mtl.schedule.runner import Builders, FingerprintMismatch, ScheduleRunner, stage_seed
from mtl.schedule.stage import Distill, ScheduleConfig, Stage, resolve_epochs, single_task_stages, stages_from_dict

__all__ = [
    "Builders",
    "Distill",
    "FingerprintMismatch",
    "NonFiniteError",
    "NonFiniteGuard",
    "RunLock",
    "RunLockedError",
    "ScheduleConfig",
    "ScheduleRunner",
    "Stage",
    "StageCheckpoint",
    "single_task_stages",
    "stage_seed",
    "stages_from_dict",
    "resolve_epochs",
]
