"""Results as data: the ``results.json`` schema, its one writer and its one reader.

A run directory holds::

    <run_dir>/results.json                  the run: every stage's result, the config and its hash
    <run_dir>/stages/<stage>/result.json    one stage's result, written when the stage finished

    <run_dir>/stages/<stage>/fingerprint.json  the config that determines the stage (written before it trains)

A stage result is::

    {"stage": "finetune",
     "tasks": {"sum": {"val": {"acc": 0.9, "loss": 0.3}, "test": {...}}},
     "directions": {"sum": {"acc": "max", "f1": "max", "loss": "min"}},
     "target_tasks": ["sum"], "source_tasks": ["left", "right"],
     "val_loss": 0.3, "best_epoch": 7, "epochs": 8,
     "best_checkpoint": "stages/finetune/checkpoints/best.ckpt",
     "fingerprint": "3f2a...", "wall_time_s": 12.3, "resumed": false}

Paths stored in a run directory are relative to it (:func:`relative_to_run`) and read back with
:func:`resolve_in_run`, so a copied directory reads its own checkpoints. A stage's fingerprint
(:func:`fingerprint_hash`, :func:`fingerprint_diff`) is compared on every rerun.

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
    "check_metric_name",
    "config_hash",
    "failed_results",
    "fingerprint_diff",
    "fingerprint_hash",
    "higher_is_better",
    "lookup_metric",
    "metric_names",
    "nest",
    "read_json",
    "relative_to_run",
    "resolve_in_run",
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


def canonical(obj: Any) -> Any:
    """``obj`` as plain JSON data (dict keys as strings, tuples as lists, other objects by class).

    An object that is not JSON data (a policy built in Python, say) is recorded by its class name:
    its repr may hold a memory address, which would differ on every run.
    """
    if isinstance(obj, Mapping):
        return {str(k): canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    return f"<{type(obj).__module__}.{type(obj).__qualname__}>"


def fingerprint_hash(fingerprint: Any) -> str:
    """The 16-hex-digit hash of a fingerprint (canonical JSON, sorted keys)."""
    text = json.dumps(canonical(fingerprint), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def fingerprint_diff(old: Any, new: Any) -> list[str]:
    """``["optimizer.lr: 0.002 -> 0.01", ...]``: the dotted keys on which two fingerprints differ."""
    a, b = _flatten(canonical(old)), _flatten(canonical(new))
    missing = object()
    lines = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key, missing), b.get(key, missing)
        if x != y:
            show = lambda v: "(absent)" if v is missing else json.dumps(v)  # noqa: E731
            lines.append(f"{key}: {show(x)} -> {show(y)}")
    return lines


def relative_to_run(run_dir: str | Path, path: str | Path) -> str:
    """``path`` relative to ``run_dir`` when it lies inside it (else as given); "" stays ""."""
    if not path:
        return ""
    p, root = Path(path).resolve(), Path(run_dir).resolve()
    return p.relative_to(root).as_posix() if p.is_relative_to(root) else str(path)


def resolve_in_run(run_dir: str | Path, path: str | Path) -> str:
    """A path read from a run directory's files: relative ones are resolved against ``run_dir``."""
    if not path:
        return ""
    p = Path(path)
    return str(p if p.is_absolute() else Path(run_dir) / p)


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
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); it was truncated or edited. Delete it to recompute "
            f"what it records."
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds {type(obj).__name__}, not a JSON object; delete it to recompute what it records.")
    return obj


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


def check_metric_name(name: str, stages: Mapping[str, Mapping[str, Any]], key: str = "optimized_metric") -> None:
    """Refuse a ``<stage>/<split>/<task>/<metric>`` name that the run cannot produce, before it trains.

    Args:
        name: the metric name.
        stages: ``{stage: {task: metric names of that task}}`` of the run's stages.
        key: the config key holding the name (for the message).
    """
    parts = str(name).split("/")
    valid = [  # the last stage first: the one usually optimized
        f"{s}/{split}/{t}/{m}" for s, tasks in reversed(list(stages.items())) for split in ("val", "test")
        for t, ms in tasks.items() for m in ms
    ]
    named = [v for v in valid if v.split("/")[0] == parts[0]] or valid  # the named stage's first
    shown = ", ".join(named[:12]) + (", ..." if len(named) > 12 else "")
    problem = None
    if len(parts) != 4:
        problem = "it is not '<stage>/<split>/<task>/<metric>'"
    else:
        stage, split, task, metric = parts
        if stage not in stages:
            problem = f"there is no stage '{stage}' (stages: {list(stages)})"
        elif split not in ("val", "test"):
            problem = f"the split must be 'val' or 'test', not '{split}'"
        elif task not in stages[stage]:
            problem = f"stage '{stage}' trains no task '{task}' (it trains {list(stages[stage])})"
        elif metric not in stages[stage][task]:
            problem = f"task '{task}' has no metric '{metric}' (it has {list(stages[stage][task])})"
    if problem:
        raise ValueError(f"{key} '{name}' cannot be produced by this run: {problem}; use one of: {shown}")


def metric_names(results: Mapping[str, Any]) -> list[str]:
    """Every ``<stage>/<split>/<task>/<metric>`` name a results dict holds."""
    return [
        f"{s}/{split}/{t}/{m}"
        for s, r in (results.get("stages") or {}).items()
        for t, splits in (r.get("tasks") or {}).items()
        for split, metrics in (splits or {}).items()
        for m in metrics
    ]

