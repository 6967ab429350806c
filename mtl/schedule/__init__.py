"""Schedules: a list of stages run in order, with weights handed from one to the next."""

from mtl.schedule.runner import Builders, ScheduleRunner, default_module, lookup_metric
from mtl.schedule.stage import Stage, single_task_stages, stages_from_dict

__all__ = ["Builders", "ScheduleRunner", "Stage", "default_module", "lookup_metric", "single_task_stages", "stages_from_dict"]
