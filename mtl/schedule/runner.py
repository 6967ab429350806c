"""Runs the stages of a schedule in order, handing weights from one to the next, and resumes.

Layout of a run directory::

    <run_dir>/results.json                     every stage's final metrics, the config and its hash
    <run_dir>/stages/<stage>/result.json       written when the stage finished (then it is skipped)
    <run_dir>/stages/<stage>/checkpoints/      best.ckpt and last.ckpt (resume point)
    <run_dir>/stages/<stage>/metrics.csv       the stage's logged metrics (CSV logger)
"""

from __future__ import annotations

import copy
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
from mtl.transfer.fusion import average_predictions, uniform_soup
from mtl.transfer.policies import make_policy


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
    """A :class:`MultiTaskModule` configured by ``stage`` (``kwargs``: optimizer, scheduler,
    balancer, teacher, source_model...)."""
    where = f"schedule.stages.{stage.name}"
    try:
        policy = make_policy(stage.policy, **stage.policy_options) if stage.policy else None
    except ValueError as err:
        raise ValueError(str(err).replace("schedule.stages.<stage>", where)) from None
    return MultiTaskModule(
        model,
        tasks=stage.tasks,
        source_tasks=stage.source_tasks,
        alpha=stage.alpha,
        lr=stage.lr,
        frozen_epochs=stage.frozen_epochs,
        backbone_lr_scale=stage.backbone_lr_scale,
        monitor=stage.monitor,
        policy=policy,
        regularizers=stage.regularizers,
        regularizer_options=stage.regularizer_options,
        alpha_schedule=stage.alpha_schedule,
        alpha_end=stage.alpha_end,
        distill_tasks=stage.distill_tasks or (),
        distill_weight=stage.distill_weight,
        temperature=stage.temperature,
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
        fuse: names of finished stages (with the same tasks) whose best models are combined at
            the end, by averaging their predictions (ensemble) and their weights (uniform soup);
            both are evaluated on the val and test splits and reported under ``fusion``.
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
        fuse: Sequence[str] | None = None,
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
        self.fuse = list(fuse or [])
        unknown = [f for f in self.fuse if f not in {st.name for st in self.stages}]
        if unknown:
            raise ValueError(f"schedule.fuse names unknown stage(s) {unknown}; stages: {[st.name for st in self.stages]}.")
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

    def _resolve(self, stage: Stage) -> Stage:
        """Fill a stage's defaults that depend on the data: targets, and LwF's teacher and tasks."""
        spec = dict(stage.__dict__)
        spec["tasks"] = stage.tasks or list(self.datamodule.tasks)
        lwf = float((stage.regularizers or {}).get("lwf") or 0.0)
        if lwf > 0:
            if stage.teacher not in (None, "init"):
                raise ValueError(
                    f"schedule.stages.{stage.name}: regularizers.lwf distils the stage's starting model; "
                    f"it cannot be combined with teacher={stage.teacher}."
                )
            tasks = stage.regularizer_options.get("lwf_tasks") or list(getattr(self.datamodule, "source_tasks", []))
            tasks = [t for t in tasks if t not in spec["tasks"]]
            if not tasks:
                raise ValueError(
                    f"schedule.stages.{stage.name}.regularizers.lwf needs source tasks whose heads to distil: "
                    f"set regularizer_options.lwf_tasks or data.source_tasks."
                )
            spec.update(teacher="init", distill_tasks=tasks, distill_weight=lwf)
        if spec["teacher"] and not spec["distill_tasks"]:
            spec["distill_tasks"] = list(spec["tasks"])
        return Stage(**spec)

    def _teacher(self, stage: Stage, model: MultiTaskModel, previous: dict | None):
        """The frozen model whose predictions the stage distils, or None."""
        if not stage.teacher:
            return None
        if stage.teacher == "init":
            teacher = copy.deepcopy(model)  # the starting weights (LwF records the source heads' outputs)
        else:
            path = previous.get("best_checkpoint") if stage.teacher == "previous" and previous else stage.teacher
            if not path:
                raise ValueError(f"schedule.stages.{stage.name}.teacher is 'previous' but there is no previous checkpoint.")
            teacher = self.builders.model({t: self.datamodule.tasks[t] for t in stage.distill_tasks})
            report = load_weights(teacher, path)
            missing = [t for t in stage.distill_tasks if any(k.startswith(f"heads.{t}.") for k in report.missing)]
            if missing:
                raise ValueError(
                    f"schedule.stages.{stage.name}: the teacher {path} has no head for distill task(s) {missing}."
                )
            self.log(f"[{stage.name}] teacher from {path}")
        teacher.requires_grad_(False)
        return teacher.eval()

    def run_stage(self, stage: Stage, previous: dict | None) -> dict[str, Any]:
        stage_dir = self.stage_dir(stage)
        done = stage_dir / "result.json"
        if done.is_file():
            self.log(f"[{stage.name}] already finished in {stage_dir}; skipping (delete result.json to rerun).")
            return json.loads(done.read_text())
        stage_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        stage = self._resolve(stage)
        targets = stage.tasks
        used = targets + [s for s in stage.source_tasks if s not in targets]
        heads = used + [t for t in stage.distill_tasks or [] if t not in used]
        self.datamodule.select_tasks(targets, stage.source_tasks)
        model = self.builders.model({t: self.datamodule.tasks[t] for t in heads})
        ckpt_dir = stage_dir / "checkpoints"
        last = ckpt_dir / "last.ckpt"
        resume = last if last.is_file() else None
        if resume is None:
            self._init_weights(stage, model, previous)
        extra: dict[str, Any] = {}
        teacher = self._teacher(stage, model, previous)
        if teacher is not None:
            extra["teacher"] = teacher
        if float((stage.regularizers or {}).get("delta") or 0.0) > 0:
            extra["source_model"] = copy.deepcopy(model).eval()  # DELTA follows the starting model
        make_module = self.builders.module or default_module
        module = make_module(model, stage, **extra)
        checkpoint = ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="best",
            monitor=stage.monitor,
            mode=stage.mode,
            save_last=True,
            enable_version_counter=False,
        )
        trainer = self.builders.trainer(stage, stage_dir, [checkpoint], stage.max_epochs)
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

    # ------------------------------------------------------------------ fusion
    def evaluate_fusion(self, results: Mapping[str, Any]) -> dict[str, Any]:
        """Ensemble (mean predicted probabilities) and uniform soup (mean weights) of the best
        models of the ``fuse`` stages, on the val and test splits of their target tasks."""
        stages = [results[name] for name in self.fuse]
        targets = stages[0]["target_tasks"]
        if any(st["target_tasks"] != targets for st in stages):
            raise ValueError(f"schedule.fuse: stages {self.fuse} must have the same target tasks to be fused.")
        tasks = {t: self.datamodule.tasks[t] for t in targets}
        self.datamodule.select_tasks(targets)
        models, states = [], []
        for st in stages:
            model = self.builders.model(dict(tasks))
            load_weights(model, st["best_checkpoint"])
            models.append(model.eval())
            states.append(model.state_dict())
        soup = self.builders.model(dict(tasks))
        soup.load_state_dict(uniform_soup(states))
        soup.eval()
        kinds = {t: task.kind for t, task in tasks.items()}
        out: dict[str, Any] = {"stages": self.fuse, "ensemble": {}, "soup": {}}
        for split in ("val", "test"):
            loader = getattr(self.datamodule, f"{split}_dataloader")()
            ens = _fusion_metrics(models, tasks, loader, lambda outs: average_predictions(outs, kinds))
            sp = _fusion_metrics([soup], tasks, loader, lambda outs: outs[0])
            for t in targets:
                out["ensemble"].setdefault(t, {})[split] = ens[t]
                out["soup"].setdefault(t, {})[split] = sp[t]
        for t in targets:
            self.log(
                f"[fusion] {t}: ensemble test {out['ensemble'][t]['test']}, soup test {out['soup'][t]['test']}"
            )
        return out

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
        fusion = self.evaluate_fusion(results) if self.fuse else None
        summary = {
            **self.extra,
            "stages": results,
            **({"fusion": fusion} if fusion else {}),
            "wall_time_s": round(time.perf_counter() - start, 2),
            "config_hash": config_hash(self.config),
            "config": self.config,
        }
        _write_json(self.run_dir / "results.json", summary)
        return summary


def _fusion_metrics(models, tasks: Mapping[str, Task], loader, combine) -> dict[str, dict[str, float]]:
    """Metrics of ``combine([model outputs])`` over ``loader`` (batches ``(x, {task: y})``)."""
    metrics = {t: task.make_metrics() for t, task in tasks.items()}
    names = list(tasks)
    with torch.no_grad():
        for batch in loader:
            x, ys = batch
            out = combine([m(x, names) for m in models])
            for t in names:
                pair = tasks[t].metric_inputs(out[t], ys[t])
                if pair is not None:
                    metrics[t].update(*pair)
    return {t: {k: float(v) for k, v in m.compute().items()} for t, m in metrics.items()}


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
