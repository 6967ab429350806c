"""Schedules: a list of stages run in order, with weights handed from one to the next.

``stage.py`` holds :class:`Stage` (also the structured config of ``schedule.stages.<name>``),
``parts.py`` builds a stage's balancer, policy and transfer terms from their ``_target_`` nodes,
and ``runner.py`` the :class:`ScheduleRunner` that trains, skips or resumes each stage.
"""

from mtl.schedule.runner import Builders, ScheduleRunner
from mtl.schedule.stage import Distill, ScheduleConfig, Stage, single_task_stages, stages_from_dict

__all__ = ["Builders", "Distill", "ScheduleConfig", "ScheduleRunner", "Stage", "single_task_stages", "stages_from_dict"]
