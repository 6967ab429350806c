"""Runs the stages of a schedule in order, handing weights from one to the next, and resumes.

Layout of a run directory::

    <run_dir>/results.json                     every stage's final metrics, the config and its hash
    <run_dir>/stages/<stage>/result.json       written when the stage finished (then it is skipped)
    <run_dir>/stages/<stage>/checkpoints/      best.ckpt and last.ckpt (resume point)
    <run_dir>/stages/<stage>/metrics.csv       the stage's logged metrics (CSV logger)
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from mtl.model import MultiTaskModel
from mtl.module import MultiTaskModule
from mtl.schedule.stage import Stage
from mtl.tasks import Task
from mtl.transfer.loading import load_weights


@dataclass
class Builders:
    """How the runner makes the objects of a stage (the entry point fills these from config).

    Attributes:
        model: ``(tasks: {name: Task}) -> MultiTaskModel``.
        module: ``(model, stage) -> MultiTaskModule``; default :func:`default_module`.
        trainer: ``(stage, stage_dir, callbacks, max_epochs) -> pl.Trainer``.
    """

    model: Callable[[dict[str, Task]], MultiTaskModel]
    trainer: Callable[[Stage, Path, list[pl.Callback], int | None], pl.Trainer]
    module: Callable[[MultiTaskModel, Stage], MultiTaskModule] | None = None


def default_module(model: MultiTaskModel, stage: Stage, **kwargs: Any) -> MultiTaskModule:
    """A :class:`MultiTaskModule` configured by ``stage`` (``kwargs``: optimizer, scheduler...)."""
    return MultiTaskModule(
        model,
        tasks=stage.tasks,
        source_tasks=stage.source_tasks,
        alpha=stage.alpha,
        lr=stage.lr,
        frozen_epochs=stage.frozen_epochs,
        backbone_lr_scale=stage.backbone_lr_scale,
        monitor=stage.monitor,
        **kwargs,
    )


def config_hash(config: Any) -> str:
    """A short stable hash of a JSON-able config."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_jsonable))
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written result


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return str(value)


def _nest(flat: Mapping[str, Any], split: str) -> dict[str, dict[str, float]]:
    """``{"val/left/acc": 0.9}`` -> ``{"left": {"acc": 0.9}}`` for one split."""
    out: dict[str, dict[str, float]] = {}
    for key, value in flat.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == split:
            out.setdefault(parts[1], {})[parts[2]] = float(value)
    return out


class ScheduleRunner:
    """Executes stages in order in ``run_dir``; see the module docstring for the layout.

    Args:
        stages: the stages, in order.
        datamodule: a DataModule with ``tasks`` and ``select_tasks`` (see ``mtl.data``).
        builders: how to make models, modules and trainers.
        run_dir: where everything is written; running again in it resumes.
        config: the resolved config, stored in ``results.json``.
        log: where progress messages go.
        extra: more top-level entries of ``results.json`` (e.g. ``{"baseline": "single_task"}``).
    """

    def __init__(
        self,
        stages: Sequence[Stage],
        datamodule: Any,
        builders: Builders,
        run_dir: str | Path,
        config: Any = None,
        log: Callable[[str], None] = print,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        if not stages:
            raise ValueError("schedule.stages is empty; a schedule needs at least one stage.")
        self.stages = list(stages)
        self.datamodule = datamodule
        self.builders = builders
        self.run_dir = Path(run_dir)
        self.config = config
        self.log = log
        self.extra = dict(extra or {})
        self._check_tasks()

    def _check_tasks(self) -> None:
        names = list(self.datamodule.tasks)
        for stage in self.stages:
            for key, tasks in (("tasks", stage.tasks or []), ("source_tasks", stage.source_tasks)):
                unknown = [t for t in tasks if t not in names]
                if unknown:
                    raise ValueError(
                        f"schedule.stages.{stage.name}.{key}: unknown task(s) {unknown}; "
                        f"the data declares {names}."
                    )
        if self.stages[0].init == "previous":
            raise ValueError(
                f"schedule.stages.{self.stages[0].name}.init is 'previous' but it is the first stage."
            )

    def stage_dir(self, stage: Stage) -> Path:
        return self.run_dir / "stages" / stage.name

    # ------------------------------------------------------------------ one stage
    def _init_weights(self, stage: Stage, model: MultiTaskModel, previous: dict | None) -> None:
        if stage.init == "fresh":
            return
        if stage.init == "previous":
            path = previous.get("best_checkpoint") if previous else None
            if not path:
                raise ValueError(
                    f"schedule.stages.{stage.name}.init is 'previous' but the previous stage left no checkpoint."
                )
        else:
            path = stage.init
        report = load_weights(model, path, stage.init_key_map)
        self.log(f"[{stage.name}] init from {path}: {report.summary()}")

    def run_stage(self, stage: Stage, previous: dict | None) -> dict[str, Any]:
        stage_dir = self.stage_dir(stage)
        done = stage_dir / "result.json"
        if done.is_file():
            self.log(f"[{stage.name}] already finished in {stage_dir}; skipping (delete result.json to rerun).")
            return json.loads(done.read_text())
        stage_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        targets = stage.tasks or list(self.datamodule.tasks)
        used = targets + [s for s in stage.source_tasks if s not in targets]
        self.datamodule.select_tasks(targets, stage.source_tasks)
        model = self.builders.model({t: self.datamodule.tasks[t] for t in used})
        resolved = Stage(**{**stage.__dict__, "tasks": targets})
        ckpt_dir = stage_dir / "checkpoints"
        last = ckpt_dir / "last.ckpt"
        resume = last if last.is_file() else None
        if resume is None:
            self._init_weights(stage, model, previous)
        make_module = self.builders.module or default_module
        module = make_module(model, resolved)
        checkpoint = ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="best",
            monitor=stage.monitor,
            mode=stage.mode,
            save_last=True,
            enable_version_counter=False,
        )
        trainer = self.builders.trainer(resolved, stage_dir, [checkpoint], stage.max_epochs)
        if resume is not None:
            epoch = torch.load(resume, map_location="cpu", weights_only=True).get("epoch", "?")
            self.log(f"[{stage.name}] resuming the interrupted stage from {resume} (after epoch {epoch}).")
        else:
            self.log(f"[{stage.name}] training tasks {targets}" + (f" with sources {stage.source_tasks}" if stage.source_tasks else ""))
        trainer.fit(module, datamodule=self.datamodule, ckpt_path=str(resume) if resume else None)
        if trainer.interrupted:
            raise RuntimeError(f"Stage '{stage.name}' was interrupted; run the same command again to resume it.")
        best = checkpoint.best_model_path or (str(last) if last.is_file() else "")
        ckpt_arg = best or None
        val = trainer.validate(module, datamodule=self.datamodule, ckpt_path=ckpt_arg, verbose=False)
        test = trainer.test(module, datamodule=self.datamodule, ckpt_path=ckpt_arg, verbose=False)
        val_flat = {k: v for d in val for k, v in d.items()}
        test_flat = {k: v for d in test for k, v in d.items()}
        best_epoch = None
        if best:
            best_epoch = torch.load(best, map_location="cpu", weights_only=True).get("epoch")
        val_tasks, test_tasks = _nest(val_flat, "val"), _nest(test_flat, "test")
        result = {
            "stage": stage.name,
            "tasks": {t: {"val": val_tasks.get(t, {}), "test": test_tasks.get(t, {})} for t in used},
            "target_tasks": targets,
            "source_tasks": stage.source_tasks,
            "val_loss": float(val_flat["val/loss"]) if "val/loss" in val_flat else None,
            "best_epoch": best_epoch,
            "epochs": trainer.current_epoch,
            "best_checkpoint": best,
            "wall_time_s": round(time.perf_counter() - start, 2),
            "resumed": resume is not None,
        }
        _write_json(done, result)
        return result

    # ------------------------------------------------------------------ all stages
    def run(self) -> dict[str, Any]:
        """Run (or skip, or resume) every stage; write and return ``results.json``'s content."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        results: dict[str, Any] = {}
        previous = None
        for stage in self.stages:
            previous = self.run_stage(stage, previous)
            results[stage.name] = previous
        summary = {
            **self.extra,
            "stages": results,
            "wall_time_s": round(time.perf_counter() - start, 2),
            "config_hash": config_hash(self.config),
            "config": self.config,
        }
        _write_json(self.run_dir / "results.json", summary)
        return summary


def lookup_metric(results: Mapping[str, Any], name: str) -> float:
    """Value of ``<stage>/<split>/<task>/<metric>`` in a results dict (error lists the valid names)."""
    parts = name.split("/")
    try:
        stage, split, task, metric = parts
        return float(results["stages"][stage]["tasks"][task][split][metric])
    except (ValueError, KeyError, TypeError):
        valid = [
            f"{s}/{split}/{t}/{m}"
            for s, r in results["stages"].items()
            for t, splits in r["tasks"].items()
            for split, metrics in splits.items()
            for m in metrics
        ]
        raise ValueError(
            f"optimized_metric '{name}' is not in the results; use '<stage>/<split>/<task>/<metric>', "
            f"one of: {valid}"
        ) from None
