"""Results as data: the ``results.json`` schema, its one writer and its one reader.

A run directory holds::

    <run_dir>/results.json                  the run: every stage's result, the config and its hash
    <run_dir>/stages/<stage>/result.json    one stage's result, written when the stage finished

A stage result is::

    {"stage": "finetune",
     "tasks": {"sum": {"val": {"acc": 0.9, "loss": 0.3}, "test": {...}}},
     "directions": {"sum": {"acc": "max", "f1": "max", "loss": "min"}},
     "target_tasks": ["sum"], "source_tasks": ["left", "right"],
     "val_loss": 0.3, "best_epoch": 7, "epochs": 8, "best_checkpoint": "...",
     "wall_time_s": 12.3, "resumed": false}

``directions`` says for every metric whether a larger value is better (``max``) or a smaller one
(``min``); it comes from the :class:`~mtl.tasks.Task` that produced the metric, so the report's
Δm needs no list of metric names. The runner, ``mtl-eval``, ``mtl-report``, ``mtl-plot`` and the
sweeps all go through this module.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = [
    "config_hash",
    "failed_results",
    "higher_is_better",
    "lookup_metric",
    "metric_names",
    "nest",
    "read_json",
    "task_directions",
    "task_metrics",
    "write_json",
]

#: Metric names read as lower-is-better in results that carry no ``directions`` (older files).
_LOWER_BY_NAME = frozenset({"loss", "mae", "rmse", "mse"})


def config_hash(config: Any) -> str:
    """A short stable hash of a JSON-able config."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return str(value)


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` to ``path`` atomically: a crash never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_jsonable))
    os.replace(tmp, path)


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a results file; an empty or truncated file raises an error that names it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); it was truncated or edited. Delete it to recompute "
            f"what it records."
        ) from None


def nest(flat: Mapping[str, Any], split: str) -> dict[str, dict[str, float]]:
    """``{"val/left/acc": 0.9}`` -> ``{"left": {"acc": 0.9}}`` for one split."""
    out: dict[str, dict[str, float]] = {}
    for key, value in flat.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == split:
            out.setdefault(parts[1], {})[parts[2]] = float(value)
    return out


def task_directions(tasks: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """``{task: {metric: "max" | "min"}}`` for ``{name: Task}``, the loss included."""
    return {
        name: {m: ("max" if up else "min") for m, up in task.metric_directions.items()}
        for name, task in tasks.items()
    }


def higher_is_better(results: Mapping[str, Any], task: str, metric: str) -> bool:
    """Whether a larger ``metric`` of ``task`` is better, from the results' ``directions``."""
    for stage in (results.get("stages") or {}).values():
        direction = ((stage.get("directions") or {}).get(task) or {}).get(metric)
        if direction is not None:
            return direction == "max"
    return metric not in _LOWER_BY_NAME


def task_metrics(results: Mapping[str, Any], split: str = "test") -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of a run, each task's metrics from the LAST stage containing it."""
    out: dict[str, dict[str, float]] = {}
    for stage in (results.get("stages") or {}).values():
        for task, splits in (stage.get("tasks") or {}).items():
            metrics = (splits or {}).get(split) or {}
            if metrics:
                out[task] = {k: float(v) for k, v in metrics.items()}
    return out


def failed_results(error: BaseException, trace: str, config: Any = None) -> dict[str, Any]:
    """The ``results.json`` of a job that failed (``mtl-report`` lists it as failed)."""
    return {
        "status": "failed",
        "error": f"{type(error).__name__}: {error}",
        "traceback": trace,
        "stages": {},
        "config": config,
    }


def lookup_metric(results: Mapping[str, Any], name: str) -> float:
    """Value of ``<stage>/<split>/<task>/<metric>`` in a results dict (error lists the valid names)."""
    parts = name.split("/")
    try:
        stage, split, task, metric = parts
        value = float(results["stages"][stage]["tasks"][task][split][metric])
    except (ValueError, KeyError, TypeError):
        raise ValueError(
            f"optimized_metric '{name}' is not in the results; use '<stage>/<split>/<task>/<metric>', "
            f"one of: {metric_names(results)}"
        ) from None
    return value


def metric_names(results: Mapping[str, Any]) -> list[str]:
    """Every ``<stage>/<split>/<task>/<metric>`` name a results dict holds."""
    return [
        f"{s}/{split}/{t}/{m}"
        for s, r in (results.get("stages") or {}).items()
        for t, splits in (r.get("tasks") or {}).items()
        for split, metrics in (splits or {}).items()
        for m in metrics
    ]

