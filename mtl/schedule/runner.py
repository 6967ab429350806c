"""Runs the stages of a schedule in order, handing weights from one to the next, and resumes.

Layout of a run directory::

    <run_dir>/results.json                     every stage's final metrics, the config and its hash
    <run_dir>/.lock                            held by the process running in it (see RunLock)
    <run_dir>/stages/<stage>/fingerprint.json  the config that determines the stage, written first
    <run_dir>/stages/<stage>/result.json       written when the stage finished (then it is skipped)
    <run_dir>/stages/<stage>/checkpoints/      best.ckpt and last.ckpt (rewritten every epoch: the resume point)
    <run_dir>/stages/<stage>/metrics.csv       the stage's logged metrics (CSV logger)
    <run_dir>/replaced/<time>/                 stages moved aside by ``rerun_from``

Running again in the same directory skips finished stages and resumes an interrupted one, but only
under the same fingerprint: the stage's fields, the run's settings that change its result (data,
backbone, sharing, model, optimizer, scheduler, balancer, trainer, guard, seed) and what it was
initialised from (the previous stage's fingerprint, or an init file's hash). A different one is
refused before anything trains, naming the differing keys; ``rerun_from=<stage>`` retrains that
stage and the later ones whose fingerprints differ. Each stage seeds itself from the run seed and
its name before building its model, so a stage gives the same weights whether the stages before it
ran in this process, were skipped, or resumed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from mtl.balancing.aggregators.base import GradientAggregator
from mtl.model import MultiTaskModel
from mtl.module import MultiTaskModule
from mtl.results import (
    canonical,
    config_hash,
    fingerprint_diff,
    fingerprint_hash,
    nest,
    read_json,
    relative_to_run,
    resolve_in_run,
    task_directions,
    write_json,
)
from mtl.schedule.guards import (
    NONFINITE_MODES,
    NonFiniteError,
    NonFiniteGuard,
    RunDirectoryError,
    RunLock,
    StageCheckpoint,
    finite_or_raise,
    is_rank_zero,
)
from mtl.schedule.parts import build_balancer, build_policy, build_regularizers
from mtl.schedule.stage import Distill, Stage
from mtl.tasks import Task
from mtl.transfer.alpha import AlphaSchedule
from mtl.transfer.fusion import average_predictions, uniform_soup
from mtl.transfer.loading import load_checkpoint, load_weights
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
        model_spec: plain data saved into every checkpoint under ``mtl_run`` (the entry point stores
            the backbone, sharing, model and data configs and the input shape), from which
            ``mtl-eval`` rebuilds the model without reading any other file.
    """

    model: Callable[[dict[str, Task]], MultiTaskModel]
    trainer: Callable[[Stage, Path, list[pl.Callback], Any], pl.Trainer]
    optimizer: Callable[..., Any] | None = None
    scheduler: Callable[..., Any] | None = None
    balancer: Any = None
    gradient_clip_val: float | None = None
    model_spec: Mapping[str, Any] | None = None


#: run settings that take part in a stage's fingerprint (the balancer is the stage's own, if any)
FINGERPRINT_KEYS = ("data", "backbone", "sharing", "model", "optimizer", "scheduler", "guard")
#: trainer settings that cannot change a stage's result (``max_epochs`` is the stage's own field)
RESULT_FREE_TRAINER_KEYS = frozenset({
    "enable_progress_bar", "enable_model_summary", "log_every_n_steps", "num_sanity_val_steps",
    "default_root_dir", "logger", "callbacks", "enable_checkpointing", "profiler", "detect_anomaly",
    "barebones", "max_epochs",
})
#: data settings that cannot change a stage's result
RESULT_FREE_DATA_KEYS = frozenset({"num_workers", "pin_memory", "persistent_workers", "prefetch_factor"})
#: extra callbacks that cannot change a stage's result (matched in their ``_target_``)
RESULT_FREE_CALLBACKS = ("ProgressBar", "ModelSummary", "LearningRateMonitor", "DeviceStatsMonitor")


class FingerprintMismatch(RunDirectoryError, ValueError):
    """The run directory holds a stage trained under another config."""


def stage_seed(seed: int, name: str) -> int:
    """The seed of stage ``name`` in a run seeded ``seed`` (a 31-bit integer)."""
    return int(hashlib.sha256(f"{int(seed)}/{name}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def file_sha256(path: str | Path) -> str | None:
    """The SHA-256 of a file's bytes (None if there is no such file)."""
    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _RunInfo(pl.Callback):
    """Saves what rebuilds the model (``Builders.model_spec``) into every checkpoint, as data."""

    def __init__(self, info: Mapping[str, Any]) -> None:
        self.info = dict(info)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint["mtl_run"] = canonical(self.info)


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
        seed: the run seed; stage ``s`` is seeded with :func:`stage_seed` ``(seed, s)``.
        nonfinite: what a non-finite loss or gradient does: ``stop`` the run or ``skip`` the step
            (see :class:`~mtl.schedule.guards.NonFiniteGuard`).
        rerun_from: a stage name: that stage and the later ones whose recorded fingerprint differs
            from this config are moved to ``<run_dir>/replaced/`` and retrained (None: a differing
            fingerprint is refused).
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
        seed: int = 0,
        nonfinite: str = "stop",
        rerun_from: str | None = None,
    ) -> None:
        if not stages:
            raise ValueError("schedule.stages is empty; a schedule needs at least one stage.")
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"guard.nonfinite must be one of {list(NONFINITE_MODES)}, got {nonfinite!r}.")
        self.seed = int(seed)
        self.nonfinite = nonfinite
        self.rerun_from = rerun_from
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
        names = [st.name for st in self.stages]
        if rerun_from is not None and rerun_from not in names:
            raise ValueError(f"rerun_from={rerun_from}: there is no such stage; the stages are {names}.")

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
        files = [("init", stage.init)] if stage.init not in ("fresh", "previous") else []
        if stage.distill is not None and stage.distill.teacher not in ("init", "previous"):
            files.append(("distill.teacher", stage.distill.teacher))
        for key, path in files:
            if not Path(path).is_file():
                raise FileNotFoundError(
                    f"{where}.{key}: checkpoint '{path}' does not exist. Set it to 'fresh', "
                    f"'previous' or an existing .ckpt / state_dict file."
                )

    def _balancer_spec(self, stage: Stage) -> Any:
        return stage.balancer if stage.balancer is not None else self.builders.balancer

    def stage_dir(self, stage: Stage) -> Path:
        return self.run_dir / "stages" / stage.name

    # ------------------------------------------------------------------ fingerprints
    def _origin(self, spec: str, previous: str | None) -> Any:
        """What a stage's weights (or teacher) come from, as fingerprint data."""
        if spec in ("fresh", "init"):
            return spec
        if spec == "previous":
            return {"previous_stage": previous}
        return {"path": str(spec), "sha256": file_sha256(spec)}

    def fingerprint(self, stage: Stage, previous: str | None = None) -> dict[str, Any]:
        """The config that determines ``stage``'s result, as plain data.

        Args:
            stage: a stage of this runner.
            previous: the fingerprint hash of the stage before it (its ``init: previous``).
        """
        cfg: Mapping[str, Any] = self.config if isinstance(self.config, Mapping) else {}
        trainer = dict(cfg.get("trainer") or {})
        fields = {f.name: getattr(stage, f.name) for f in dataclasses.fields(stage)}
        fields["max_epochs"] = stage.max_epochs if stage.max_epochs is not None else trainer.get("max_epochs")
        fields["balancer"] = self._balancer_spec(stage)
        fields["init"] = self._origin(stage.init, previous)
        if stage.distill is not None:
            fields["distill"] = {**dataclasses.asdict(stage.distill), "teacher": self._origin(stage.distill.teacher, previous)}
        run = {key: cfg.get(key) for key in FINGERPRINT_KEYS if key in cfg}
        if isinstance(run.get("data"), Mapping):
            run["data"] = {k: v for k, v in run["data"].items() if k not in RESULT_FREE_DATA_KEYS}
        if stage.lr is not None and isinstance(run.get("optimizer"), Mapping):
            run["optimizer"] = {k: v for k, v in run["optimizer"].items() if k != "lr"}  # the stage's lr wins
        run["trainer"] = {k: v for k, v in trainer.items() if k not in RESULT_FREE_TRAINER_KEYS}
        run["callbacks"] = {
            name: cb for name, cb in (cfg.get("callbacks") or {}).items()
            if cb and not any(word in str((cb or {}).get("_target_", "")) for word in RESULT_FREE_CALLBACKS)
        }
        return canonical({"stage": fields, "seed": self.seed, **run})

    def fingerprints(self) -> dict[str, tuple[dict[str, Any], str]]:
        """``{stage: (fingerprint, hash)}`` of every stage, each chained to the one before it."""
        out: dict[str, tuple[dict[str, Any], str]] = {}
        previous = None
        for stage in self.stages:
            fp = self.fingerprint(stage, previous)
            previous = fingerprint_hash(fp)
            out[stage.name] = (fp, previous)
        return out

    _UNKNOWN = object()

    def _recorded(self, stage: Stage) -> Any:
        """The fingerprint a stage directory records: None (nothing there), a dict, or _UNKNOWN."""
        stage_dir = self.stage_dir(stage)
        path = stage_dir / "fingerprint.json"
        if path.is_file():
            return read_json(path)
        trained = (stage_dir / "result.json").is_file() or any((stage_dir / "checkpoints").glob("*.ckpt"))
        return self._UNKNOWN if trained else None

    def check_run_dir(self, fingerprints: Mapping[str, tuple[dict[str, Any], str]], move: bool = True) -> None:
        """Refuse a run directory holding stages of another config; apply ``rerun_from``.

        Called by :meth:`run` (rank 0) before anything trains; ``move=False`` only checks.
        """
        names = [st.name for st in self.stages]
        start = names.index(self.rerun_from) if self.rerun_from is not None else len(names)
        stale = []
        for i, stage in enumerate(self.stages):
            recorded = self._recorded(stage)
            fp = fingerprints[stage.name][0]
            if recorded is None or (recorded is not self._UNKNOWN and canonical(recorded) == fp):
                continue
            if i >= start:
                stale.append(stage)
                continue
            raise FingerprintMismatch(self._mismatch_message(stage, recorded, fp, start < len(names)))
        if stale and move:
            stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 1_000_000_000:09d}"
            dest = self.run_dir / "replaced" / stamp
            (dest / "stages").mkdir(parents=True, exist_ok=True)
            for stage in stale:
                shutil.move(str(self.stage_dir(stage)), str(dest / "stages" / stage.name))
            if (self.run_dir / "results.json").is_file():
                shutil.move(str(self.run_dir / "results.json"), str(dest / "results.json"))
            self.log(f"[rerun_from={self.rerun_from}] moved stage(s) {[st.name for st in stale]} to {dest}")

    def _mismatch_message(self, stage: Stage, recorded: Any, fp: dict, rerun: bool) -> str:
        where = self.stage_dir(stage)
        if recorded is self._UNKNOWN:
            head = (
                f"Run directory {self.run_dir} holds stage '{stage.name}' with no record of its config "
                f"({where / 'fingerprint.json'} is missing: written by an older mtl, or deleted), so it "
                f"cannot be checked against this one."
            )
        else:
            diff = fingerprint_diff(recorded, fp)
            shown = "\n".join(f"  {line}" for line in diff[:15]) + ("\n  ..." if len(diff) > 15 else "")
            head = (
                f"Run directory {self.run_dir} holds stage '{stage.name}' trained under another config; "
                f"skipping or resuming it would report one config's metrics under another's. Differing "
                f"keys (recorded -> now):\n{shown}"
            )
        later = f" (rerun_from={self.rerun_from} starts after it)" if rerun else ""
        return (
            f"{head}\nEither run in a new directory (hydra.run.dir=<new dir>; by default every mtl-train "
            f"gets its own), or retrain from this stage on with rerun_from={stage.name}{later}: the old "
            f"stage directories then move to {self.run_dir / 'replaced'}/."
        )

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
        report = load_weights(model, path, stage.init_key_map, where=f"schedule.stages.{stage.name}.init_key_map")
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
        return resolve_in_run(self.run_dir, (previous or {}).get("best_checkpoint") or "")

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

    def run_stage(self, stage: Stage, previous: dict | None, fingerprint: tuple[dict, str] | None = None) -> dict[str, Any]:
        """Train (or skip, or resume) one stage; returns its result (see :mod:`mtl.results`).

        Args:
            stage: the stage.
            previous: the previous stage's result (its best checkpoint initialises ``init: previous``).
            fingerprint: ``(fingerprint, hash)`` of the stage (default: computed here, unchained).
        """
        if fingerprint is None:
            fp = self.fingerprint(stage)
            fingerprint = (fp, fingerprint_hash(fp))
        fp, fp_hash = fingerprint
        rank0 = is_rank_zero()
        stage_dir = self.stage_dir(stage)
        done = stage_dir / "result.json"
        if done.is_file():
            self.log(f"[{stage.name}] already finished in {stage_dir} under this config; skipping.")
            return read_json(done)
        stage_dir.mkdir(parents=True, exist_ok=True)
        if rank0 and not (stage_dir / "fingerprint.json").is_file():
            write_json(stage_dir / "fingerprint.json", fp)
        start = time.perf_counter()
        pl.seed_everything(stage_seed(self.seed, stage.name), workers=True, verbose=False)
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
        checkpoint = StageCheckpoint(
            dirpath=ckpt_dir,
            filename="best",
            monitor=stage.monitor,
            mode=stage.mode,
            save_last=True,
            enable_version_counter=False,
        )
        guard = NonFiniteGuard(stage.name, self.nonfinite)
        info = _RunInfo({"stage": stage.name, "fingerprint": fp_hash, **dict(self.builders.model_spec or {})})
        with warnings.catch_warnings():
            if resume is None:  # the directory holds only fingerprint.json: nothing a logger would clobber
                warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
            trainer = self.builders.trainer(stage, stage_dir, [checkpoint, guard, info], balancer)
            if resume is not None:
                epoch = load_checkpoint(resume, "The interrupted stage's checkpoint").get("epoch", "?")
                self.log(f"[{stage.name}] resuming the interrupted stage from {resume} (after epoch {epoch}).")
            else:
                sources = f" with sources {stage.source_tasks}" if stage.source_tasks else ""
                self.log(f"[{stage.name}] training tasks {stage.tasks}{sources}")
            trainer.fit(module, datamodule=self.datamodule, ckpt_path=str(resume) if resume else None)
        if trainer.interrupted:
            raise RuntimeError(f"Stage '{stage.name}' was interrupted; run the same command again to resume it.")
        best = self._best(stage, trainer, checkpoint, last)
        finite_or_raise(best, stage.name)  # never report or hand over a non-finite model
        val = trainer.validate(module, datamodule=self.datamodule, ckpt_path=best, verbose=False)
        test = trainer.test(module, datamodule=self.datamodule, ckpt_path=best, verbose=False)
        val_flat = {k: float(v) for d in val for k, v in d.items()}
        test_flat = {k: float(v) for d in test for k, v in d.items()}
        nonfinite = sorted(k for k, v in {**val_flat, **test_flat}.items() if not math.isfinite(v))
        if nonfinite:
            msg = f"stage '{stage.name}': the best checkpoint gives non-finite {nonfinite}"
            if self.nonfinite == "stop":
                raise NonFiniteError(
                    f"{msg}. Nothing is reported; check the targets' scale (a regression target near 1e20 "
                    f"overflows float32 squared errors) or set guard.nonfinite=skip to record them."
                )
            rank_zero_warn(f"{msg}; recorded in result.json under 'nonfinite'.")
        best_epoch = load_checkpoint(best).get("epoch")
        val_tasks, test_tasks = nest(val_flat, "val"), nest(test_flat, "test")
        result = {
            "stage": stage.name,
            "tasks": {t: {"val": val_tasks.get(t, {}), "test": test_tasks.get(t, {})} for t in used},
            "directions": task_directions({t: self.datamodule.tasks[t] for t in used}),
            "target_tasks": stage.tasks,
            "source_tasks": stage.source_tasks,
            "val_loss": val_flat.get("val/loss"),
            "best_epoch": best_epoch,
            "epochs": trainer.current_epoch,
            "best_checkpoint": relative_to_run(self.run_dir, best),
            "fingerprint": fp_hash,
            "seed": stage_seed(self.seed, stage.name),
            "skipped_steps": guard.skipped,
            **({"nonfinite": nonfinite} if nonfinite else {}),
            "wall_time_s": round(time.perf_counter() - start, 2),
            "resumed": resume is not None,
        }
        if rank0:
            write_json(done, result)
        return result

    def _best(self, stage: Stage, trainer: pl.Trainer, checkpoint: StageCheckpoint, last: Path) -> str:
        """The checkpoint a stage reports and hands over: its best, else (no validation) its last."""
        best = checkpoint.best_model_path
        if best and Path(best).is_file():
            return best
        if trainer.fast_dev_run:  # Lightning saves nothing in a fast_dev_run: keep what it trained
            trainer.save_checkpoint(str(last))
            return str(last)
        if trainer.callback_metrics.get(stage.monitor) is not None:
            raise NonFiniteError(
                f"stage '{stage.name}': no epoch gave a finite model and a finite {stage.monitor} "
                f"(last: {float(trainer.callback_metrics[stage.monitor]):g}), so there is no best "
                f"checkpoint to report or hand over. Lower the learning rate, clip gradients, check the "
                f"targets' scale; then retrain it (rerun_from={stage.name})."
            )
        if last.is_file():
            return str(last)
        raise ValueError(
            f"stage '{stage.name}' trained no step and left no checkpoint: trainer.limit_train_batches "
            f"or trainer.max_epochs leaves nothing to train, or its training split is empty."
        )

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
            load_weights(model, resolve_in_run(self.run_dir, st["best_checkpoint"]))
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
        """Run (or skip, or resume) every stage; write and return ``results.json``'s content.

        Holds the run directory's lock throughout (rank 0 only under DDP: the other ranks are its
        children), refuses a directory holding stages of another config before anything trains,
        and writes only from rank 0.
        """
        rank0 = is_rank_zero()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with RunLock(self.run_dir) if rank0 else contextlib.nullcontext():
            fingerprints = self.fingerprints()
            if rank0:  # the other ranks are rank 0's children: they follow its decisions
                self.check_run_dir(fingerprints)
            start = time.perf_counter()
            results: dict[str, Any] = {}
            previous = None
            for stage in self.stages:
                previous = self.run_stage(stage, previous, fingerprints[stage.name])
                results[stage.name] = previous
            fusion = self.evaluate_fusion(results) if self.fuse else None
            summary = {
                **self.extra,
                "stages": results,
                **({"fusion": fusion} if fusion else {}),
                "wall_time_s": round(time.perf_counter() - start, 2),
                "fingerprints": {name: h for name, (_, h) in fingerprints.items()},
                "config_hash": config_hash(self.config),
                "config": self.config,
            }
            if rank0:
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

