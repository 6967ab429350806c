"""Runs the stages of a schedule in order, handing weights from one to the next, and resumes.

Layout of a run directory::

    <run_dir>/results.json                     every stage's final metrics, the config and its hash
    <run_dir>/stages/<stage>/result.json       written when the stage finished (then it is skipped)
    <run_dir>/stages/<stage>/checkpoints/      best.ckpt and last.ckpt (resume point)
    <run_dir>/stages/<stage>/metrics.csv       the stage's logged metrics (CSV logger)
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from mtl.balancing.aggregators.base import GradientAggregator
from mtl.model import MultiTaskModel
from mtl.module import MultiTaskModule
from mtl.results import config_hash, nest, read_json, task_directions, write_json
from mtl.schedule.parts import build_balancer, build_policy, build_regularizers
from mtl.schedule.stage import Distill, Stage
from mtl.tasks import Task
from mtl.transfer.alpha import AlphaSchedule
from mtl.transfer.fusion import average_predictions, uniform_soup
from mtl.transfer.loading import load_weights
from mtl.transfer.terms import Distillation, TransferTerms


@dataclass
class Builders:
    """How the runner makes the objects of a stage (the entry point fills these from config).

    Attributes:
        model: ``(tasks: {name: Task}) -> MultiTaskModel``.
        trainer: ``(stage, stage_dir, callbacks, balancer) -> pl.Trainer``; ``balancer`` is the
            stage's (a gradient aggregator means manual optimization).
        optimizer: ``callable(params) -> Optimizer`` (a Hydra ``_partial_``), or None for AdamW.
        scheduler: ``callable(optimizer) -> LRScheduler``, or None.
        balancer: the run's balancer config (``{method: ..., engine: ...}``), used by stages that
            name none; None: the static sum.
        gradient_clip_val: the trainer's clipping, applied by the module under an aggregator.
    """

    model: Callable[[dict[str, Task]], MultiTaskModel]
    trainer: Callable[[Stage, Path, list[pl.Callback], Any], pl.Trainer]
    optimizer: Callable[..., Any] | None = None
    scheduler: Callable[..., Any] | None = None
    balancer: Any = None
    gradient_clip_val: float | None = None


class ScheduleRunner:
    """Executes stages in order in ``run_dir``; see the module docstring for the layout.

    Args:
        stages: the stages, in order.
        datamodule: a DataModule with ``tasks`` and ``select_tasks`` (see ``mtl.data``).
        builders: how to make models, optimizers and trainers, and the run's balancer.
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
        self.datamodule = datamodule
        self.builders = builders
        self.run_dir = Path(run_dir)
        self.config = config
        self.log = log
        self.extra = dict(extra or {})
        self.stages = [self._resolve(stage) for stage in stages]
        self.fuse = list(fuse or [])
        unknown = [f for f in self.fuse if f not in {st.name for st in self.stages}]
        if unknown:
            raise ValueError(f"schedule.fuse names unknown stage(s) {unknown}; stages: {[st.name for st in self.stages]}.")
        with torch.random.fork_rng(devices=[]):  # building parts to check them draws no random numbers of the run
            for stage in self.stages:
                self._check(stage)
        if self.stages[0].init == "previous":
            raise ValueError(f"schedule.stages.{self.stages[0].name}.init is 'previous' but it is the first stage.")

    def _resolve(self, stage: Stage) -> Stage:
        """Fill a stage's defaults that depend on the data: its targets and its distilled tasks."""
        tasks = stage.tasks or list(self.datamodule.tasks)
        distill = stage.distill
        if distill is not None and not distill.tasks:
            distill = Distill(distill.teacher, list(tasks), distill.weight, distill.temperature)
        return dataclasses.replace(stage, tasks=tasks, distill=distill)

    def _check(self, stage: Stage) -> None:
        """Refuse a stage whose tasks or parts are wrong before anything trains."""
        where = f"schedule.stages.{stage.name}"
        names = list(self.datamodule.tasks)
        keys = (("tasks", stage.tasks), ("source_tasks", stage.source_tasks), ("distill.tasks", stage.distill.tasks if stage.distill else []))
        for key, tasks in keys:
            unknown = [t for t in tasks or [] if t not in names]
            if unknown:
                raise ValueError(f"{where}.{key}: unknown task(s) {unknown}; the data declares {names}.")
        build_balancer(self._balancer_spec(stage), len(stage.trained_tasks), f"{where}.balancer")
        build_policy(stage.policy, f"{where}.policy")
        build_regularizers(stage.regularizers, f"{where}.regularizers")
        AlphaSchedule(stage.alpha, stage.alpha_end, stage.alpha_schedule)

    def _balancer_spec(self, stage: Stage) -> Any:
        return stage.balancer if stage.balancer is not None else self.builders.balancer

    def stage_dir(self, stage: Stage) -> Path:
        return self.run_dir / "stages" / stage.name

    # ------------------------------------------------------------------ one stage
    def _init_weights(self, stage: Stage, model: MultiTaskModel, previous: dict | None) -> None:
        if stage.init == "fresh":
            return
        if stage.init == "previous":
            path = self._checkpoint(previous)
            if not path:
                raise ValueError(
                    f"schedule.stages.{stage.name}.init is 'previous' but the previous stage left no checkpoint."
                )
        else:
            path = stage.init
        report = load_weights(model, path, stage.init_key_map)
        self.log(f"[{stage.name}] init from {path}: {report.summary()}")

    def _transfer(self, stage: Stage, model: MultiTaskModel, previous: dict | None) -> TransferTerms | None:
        """The stage's transfer terms (regularizers and distillation), or None."""
        where = f"schedule.stages.{stage.name}"
        terms: dict[str, Any] = build_regularizers(stage.regularizers, f"{where}.regularizers")
        if stage.distill is not None and stage.distill.weight > 0:
            d = stage.distill
            terms["distill"] = Distillation(
                self._teacher(stage, model, previous), d.tasks, {t: self.datamodule.tasks[t].kind for t in d.tasks},
                weight=d.weight, temperature=d.temperature,
            )
        return TransferTerms(terms) if terms else None

    def _teacher(self, stage: Stage, model: MultiTaskModel, previous: dict | None) -> nn.Module:
        """The frozen model whose predictions the stage distils."""
        teacher, tasks = stage.distill.teacher, stage.distill.tasks
        if teacher == "init":
            return copy.deepcopy(model)  # the starting weights (LwF records the source heads' outputs)
        path = self._checkpoint(previous) if teacher == "previous" else teacher
        if not path:
            raise ValueError(f"schedule.stages.{stage.name}.distill.teacher is 'previous' but there is no previous checkpoint.")
        model = self.builders.model({t: self.datamodule.tasks[t] for t in tasks})
        report = load_weights(model, path)
        missing = [t for t in tasks if any(k.startswith(f"heads.{t}.") for k in report.missing)]
        if missing:
            raise ValueError(f"schedule.stages.{stage.name}: the teacher {path} has no head for distill task(s) {missing}.")
        self.log(f"[{stage.name}] teacher from {path}")
        return model

    def _checkpoint(self, previous: dict | None) -> str:
        return (previous or {}).get("best_checkpoint") or ""

    def _module(self, stage: Stage, model: MultiTaskModel, previous: dict | None):
        """The stage's MultiTaskModule and its balancer (resolved once, for the trainer too)."""
        where = f"schedule.stages.{stage.name}"
        transfer = self._transfer(stage, model, previous)
        balancer, engine = build_balancer(self._balancer_spec(stage), len(stage.trained_tasks), f"{where}.balancer")
        optimizer = self.builders.optimizer
        if stage.lr is not None:
            base = optimizer or functools.partial(torch.optim.AdamW)
            optimizer = functools.partial(base, lr=stage.lr)
        aggregator = isinstance(balancer, GradientAggregator)
        module = MultiTaskModule(
            model,
            tasks=stage.tasks,
            source_tasks=stage.source_tasks,
            alpha=AlphaSchedule(stage.alpha, stage.alpha_end, stage.alpha_schedule),
            balancer=balancer,
            engine=engine,
            optimizer=optimizer,
            scheduler=self.builders.scheduler,
            policy=build_policy(stage.policy, f"{where}.policy"),
            transfer=transfer,
            monitor=stage.monitor,
            gradient_clip_val=self.builders.gradient_clip_val if aggregator else None,
        )
        return module, balancer

    def run_stage(self, stage: Stage, previous: dict | None) -> dict[str, Any]:
        stage_dir = self.stage_dir(stage)
        done = stage_dir / "result.json"
        if done.is_file():
            self.log(f"[{stage.name}] already finished in {stage_dir}; skipping (delete result.json to rerun).")
            return read_json(done)
        stage_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        used = stage.trained_tasks
        distilled = stage.distill.tasks if stage.distill else []
        heads = used + [t for t in distilled if t not in used]
        self.datamodule.select_tasks(stage.tasks, stage.source_tasks)
        model = self.builders.model({t: self.datamodule.tasks[t] for t in heads})
        ckpt_dir = stage_dir / "checkpoints"
        last = ckpt_dir / "last.ckpt"
        resume = last if last.is_file() else None
        if resume is None:
            self._init_weights(stage, model, previous)
        module, balancer = self._module(stage, model, previous)
        checkpoint = ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="best",
            monitor=stage.monitor,
            mode=stage.mode,
            save_last=True,
            enable_version_counter=False,
        )
        trainer = self.builders.trainer(stage, stage_dir, [checkpoint], balancer)
        if resume is not None:
            epoch = torch.load(resume, map_location="cpu", weights_only=True).get("epoch", "?")
            self.log(f"[{stage.name}] resuming the interrupted stage from {resume} (after epoch {epoch}).")
        else:
            sources = f" with sources {stage.source_tasks}" if stage.source_tasks else ""
            self.log(f"[{stage.name}] training tasks {stage.tasks}{sources}")
        trainer.fit(module, datamodule=self.datamodule, ckpt_path=str(resume) if resume else None)
        if trainer.interrupted:
            raise RuntimeError(f"Stage '{stage.name}' was interrupted; run the same command again to resume it.")
        best = checkpoint.best_model_path or (str(last) if last.is_file() else "")
        ckpt_arg = best or None
        val = trainer.validate(module, datamodule=self.datamodule, ckpt_path=ckpt_arg, verbose=False)
        test = trainer.test(module, datamodule=self.datamodule, ckpt_path=ckpt_arg, verbose=False)
        val_flat = {k: v for d in val for k, v in d.items()}
        test_flat = {k: v for d in test for k, v in d.items()}
        best_epoch = torch.load(best, map_location="cpu", weights_only=True).get("epoch") if best else None
        val_tasks, test_tasks = nest(val_flat, "val"), nest(test_flat, "test")
        result = {
            "stage": stage.name,
            "tasks": {t: {"val": val_tasks.get(t, {}), "test": test_tasks.get(t, {})} for t in used},
            "directions": task_directions({t: self.datamodule.tasks[t] for t in used}),
            "target_tasks": stage.tasks,
            "source_tasks": stage.source_tasks,
            "val_loss": float(val_flat["val/loss"]) if "val/loss" in val_flat else None,
            "best_epoch": best_epoch,
            "epochs": trainer.current_epoch,
            "best_checkpoint": best,
            "wall_time_s": round(time.perf_counter() - start, 2),
            "resumed": resume is not None,
        }
        write_json(done, result)
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
        write_json(self.run_dir / "results.json", summary)
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

