"""``mtl-train``: compose the config, check it, run the schedule, print and return the results.

Usage: ``mtl-train [group=option ...] [key=value ...]``, ``mtl-train -m key=a,b``,
``mtl-train --cfg job``.

Everything that can be checked without training is checked before the first stage trains: config
types and values (:func:`check_config`), every stage's parts (the runner), the ``optimized_metric``
names, and the run directory (a stage trained under another config is refused).
"""

from __future__ import annotations

import logging
import os
import warnings
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import hydra
import pytorch_lightning as pl
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mtl.balancing import GradientAggregator
from mtl.extras import apply_extras, check_tags
from mtl.model import MultiTaskModel
from mtl.report import print_results
from mtl.results import check_metric_name, lookup_metric
from mtl.schedule import Builders, ScheduleConfig, ScheduleRunner, resolve_epochs, single_task_stages, stages_from_dict
from mtl.schedule.guards import NONFINITE_MODES, is_rank_zero
from mtl.schedule.runner import RunDirectoryError
from mtl.sweeps import objective_names, run_job
from mtl.tasks import Task

#: Lightning's info lines that a user of mtl-train cannot act on (adverts, device inventory, the
#: checkpoint restores the runner itself asks for): dropped from its loggers' output
_NOISE = (
    "💡 Tip", "GPU available", "TPU available", "HPU available", "Seed set to", "`Trainer.fit` stopped",
    "Restoring states from the checkpoint path", "Loaded model weights from the checkpoint",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_NOISE)


def quiet_lightning() -> None:
    """Drop Lightning's adverts and routine info lines (see ``_NOISE``), its own deprecation
    warning about torch's pytree API and its warning about modules in eval mode (ours are frozen
    on purpose); other warnings and errors stay."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # frozen teachers (LwF, DELTA, Born-Again) and frozen normalisation statistics are in eval mode
    # on purpose; Lightning's warning about them is not something a user can act on
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.seed",
                 "lightning_fabric.utilities.rank_zero", "pytorch_lightning.trainer.connectors.checkpoint_connector"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())


# mtl/conf links to the repository's conf/ (a wheel carries the files themselves)
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")

# the schedule presets extend this schema (conf/schedule/*.yaml: `defaults: [base, _self_]`)
ConfigStore.instance().store(group="schedule", name="base", node=ScheduleConfig)

#: Trainer strategies that start new processes for every fit/validate/test call; a schedule makes
#: several such calls per stage and needs their results back in this process.
SPAWNING_STRATEGIES = ("ddp_spawn", "ddp_fork", "ddp_notebook")


# ---------------------------------------------------------------------------------- checks
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _got(v: Any) -> str:
    return f"{v!r} ({type(v).__name__})"


def resume_hint(ckpt_path: str) -> str:
    """What to run instead of ``mtl-train ckpt_path=...``: a run resumes from its directory."""
    path = Path(ckpt_path)
    parts = path.parts
    if len(parts) >= 4 and parts[-2] == "checkpoints" and parts[-4] == "stages":
        run, stage = Path(*parts[:-4]) if len(parts) > 4 else Path("."), parts[-3]
        return (
            f"ckpt_path: mtl-train resumes a run from its directory, not from one checkpoint. Run "
            f"`mtl-train hydra.run.dir={run}` with that run's overrides: finished stages are skipped and "
            f"'{stage}' continues from its last.ckpt. To start a stage from these weights instead, use "
            f"schedule.stages.<stage>.init={ckpt_path}."
        )
    return (
        f"ckpt_path: '{ckpt_path}' is not a checkpoint of an mtl-train run (<run>/stages/<stage>/checkpoints/"
        f"last.ckpt). To start a stage from a checkpoint's weights, use schedule.stages.<stage>.init={ckpt_path}; "
        f"to resume a run, mtl-train hydra.run.dir=<run>."
    )


def check_config(cfg: DictConfig) -> None:
    """Refuse wrong types and values of the run's settings, naming the key and what to write.

    The stages are a structured config (typed when composed); this covers the rest that a run
    reads: ``seed``, the trainer's epoch and batch limits, the batch size, the learning rate, the
    guard, ``rerun_from`` and the trainer strategy.
    """
    check_tags(cfg.get("tags"), bool((cfg.get("extras") or {}).get("enforce_tags")))
    if cfg.get("ckpt_path"):
        raise ValueError(resume_hint(str(cfg.ckpt_path)))
    seed = cfg.get("seed")
    if not _is_int(seed):
        raise ValueError(f"seed must be an integer, got {_got(seed)}; e.g. seed=0.")
    trainer = cfg.get("trainer") or {}
    max_epochs = trainer.get("max_epochs")
    if not (_is_int(max_epochs) and max_epochs >= 1):
        raise ValueError(f"trainer.max_epochs must be a positive integer, got {_got(max_epochs)}; e.g. trainer.max_epochs=3.")
    for split in ("train", "val", "test"):
        key = f"limit_{split}_batches"
        v = trainer.get(key)
        if v is None:
            continue
        if not _is_number(v) or v < 0 or (isinstance(v, float) and v > 1.0):
            raise ValueError(
                f"trainer.{key} must be null (all batches), a number of batches >= 1 or a fraction in "
                f"(0, 1], got {_got(v)}."
            )
        if v == 0:
            what = {
                "train": "no stage would train a step and none would leave a checkpoint",
                "val": "no best checkpoint could be picked (stages are validated every epoch)",
                "test": "no test metrics would be reported",
            }[split]
            raise ValueError(f"trainer.{key}=0: {what}. Use null for all batches or a positive number.")
    for key in ("accumulate_grad_batches", "check_val_every_n_epoch"):
        v = trainer.get(key)
        if v is not None and not (_is_int(v) and v >= 1):
            raise ValueError(f"trainer.{key} must be a positive integer, got {_got(v)}.")
    clip = trainer.get("gradient_clip_val")
    if clip is not None and not (_is_number(clip) and clip >= 0):
        raise ValueError(f"trainer.gradient_clip_val must be null or a number >= 0, got {_got(clip)}.")
    strategy = trainer.get("strategy")
    name = str(strategy.get("_target_", "")) + str(strategy.get("start_method", "")) if isinstance(strategy, Mapping) else str(strategy or "")
    if any(word in name for word in SPAWNING_STRATEGIES) or (isinstance(strategy, Mapping) and strategy.get("start_method") in ("spawn", "fork", "forkserver")):
        raise ValueError(
            f"trainer.strategy={strategy} is not supported by mtl-train: each stage calls fit, validate "
            f"and test, and a spawning strategy would start new processes for every call, whose results "
            f"do not come back to the schedule. Use trainer=ddp (GPUs) or trainer=ddp_cpu (CPU, gloo): "
            f"they start the other ranks once, as copies of this job."
        )
    data = cfg.get("data") or {}
    bs = data.get("batch_size")
    if bs is not None and not (_is_int(bs) and bs >= 1):
        raise ValueError(f"data.batch_size must be a positive integer, got {_got(bs)}.")
    lr = (cfg.get("optimizer") or {}).get("lr")
    if lr is not None and not (_is_number(lr) and lr > 0):
        raise ValueError(f"optimizer.lr must be a positive number, got {_got(lr)}.")
    mode = (cfg.get("guard") or {}).get("nonfinite", "stop")
    if mode not in NONFINITE_MODES:
        raise ValueError(f"guard.nonfinite must be one of {list(NONFINITE_MODES)}, got {_got(mode)}.")
    rerun = cfg.get("rerun_from")
    if rerun is not None and not isinstance(rerun, str):
        raise ValueError(f"rerun_from must be a stage name or null, got {_got(rerun)}.")


def check_overrides(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Refuse ``key={}`` overrides that would silently do nothing.

    Hydra merges a mapping given on the command line into the existing one, so
    ``schedule.stages={}`` keeps the preset's stages (and would run them).
    """
    for override in overrides:
        key, sep, value = str(override).lstrip("+~").partition("=")
        if not sep or value.replace(" ", "") != "{}":
            continue
        node = OmegaConf.select(cfg, key, default=None)
        if isinstance(node, DictConfig) and len(node) > 0:
            entries = list(node.keys())
            if key == "schedule.stages":
                raise ValueError(
                    f"schedule.stages={{}} does not empty the schedule: Hydra merges a mapping into the "
                    f"preset's stages {entries}, which would run. A schedule needs at least one stage; to "
                    f"drop a stage set schedule.stages.<name>=null, or pick another schedule=<preset>."
                )
            raise ValueError(
                f"{key}={{}} does not empty {key}: Hydra merges a mapping into its entries {entries}. Set "
                f"entries to null one by one ({key}.{entries[0]}=null) or override them."
            )


# ---------------------------------------------------------------------------------- builders
def instantiate_data(node: Any) -> Any:
    """The DataModule of ``node``; the data's own errors (which name the key) come out unwrapped."""
    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as err:
        if isinstance(err.__cause__, (ValueError, TypeError, FileNotFoundError)):
            raise err.__cause__ from None
        raise


def _input_shape(cfg: DictConfig, datamodule: Any) -> list[int]:
    return list(cfg.backbone.get("input_shape") or datamodule.input_shape)


def build_model(cfg: DictConfig, datamodule: Any) -> Callable[[dict[str, Task]], MultiTaskModel]:
    """``tasks -> MultiTaskModel`` from the ``backbone``, ``sharing`` and ``model`` configs.

    Every backbone takes ``input_shape`` (the shape of one example); left null in config it is the
    data's. Used by ``mtl-train`` and ``mtl-eval`` alike.
    """
    shape = _input_shape(cfg, datamodule)

    def make(tasks: dict[str, Task]) -> MultiTaskModel:
        backbone = instantiate(cfg.backbone, input_shape=shape, _convert_="all")
        sharing = instantiate(cfg.sharing, _convert_="all") if cfg.get("sharing") else None
        # a partial, so that the Task objects are handed over as they are (not converted to dicts)
        return instantiate(cfg.model, _partial_=True, _convert_="all")(backbone=backbone, tasks=tasks, sharing=sharing)

    return make


def model_spec(cfg: DictConfig, datamodule: Any) -> dict[str, Any]:
    """What ``mtl-eval`` needs to rebuild a checkpoint's model, as plain data saved inside it."""
    def plain(node: Any) -> Any:
        return OmegaConf.to_container(node, resolve=True) if node is not None else None

    return {
        "backbone": {**plain(cfg.backbone), "input_shape": _input_shape(cfg, datamodule)},
        "sharing": plain(cfg.get("sharing")),
        "model": plain(cfg.model),
        "data": plain(cfg.data),
        "seed": int(cfg.seed),
    }


def build_trainer(cfg: DictConfig) -> Callable[..., pl.Trainer]:
    """``(stage, stage_dir, callbacks, balancer) -> pl.Trainer`` from the ``trainer``, ``logger``
    and ``callbacks`` configs."""

    def make(stage, stage_dir: Path, callbacks: list, balancer: Any) -> pl.Trainer:
        overrides: dict[str, Any] = {"max_epochs": stage.max_epochs} if stage.max_epochs is not None else {}
        if isinstance(balancer, GradientAggregator):
            if int(cfg.trainer.get("accumulate_grad_batches") or 1) != 1:
                raise ValueError(
                    f"trainer.accumulate_grad_batches={cfg.trainer.accumulate_grad_batches} is not supported "
                    f"with the gradient aggregator {type(balancer).__name__} (it aggregates each batch's task "
                    f"gradients); use a larger data.batch_size or a loss weighting balancer."
                )
            overrides["gradient_clip_val"] = None  # the module clips under manual optimization
        loggers = [instantiate(lg, save_dir=str(stage_dir)) for lg in (cfg.get("logger") or {}).values() if lg]
        extra = [instantiate(cb) for cb in (cfg.get("callbacks") or {}).values() if cb]
        return instantiate(
            cfg.trainer, default_root_dir=str(stage_dir), callbacks=callbacks + extra, logger=loggers or False, **overrides
        )

    return make


def build_runner(cfg: DictConfig, run_dir: str | Path, log: Callable[[str], None] = print) -> ScheduleRunner:
    """Everything a run needs, from a composed config (used by ``mtl-train`` and the tests).

    Checks the config (:func:`check_config`), every stage's parts and the ``optimized_metric``
    names before returning: nothing has trained yet when any of them is refused.
    """
    check_config(cfg)
    datamodule = instantiate_data(cfg.data)
    datamodule.setup()
    stages = stages_from_dict(OmegaConf.to_container(cfg.schedule.stages, resolve=True))
    stages = resolve_epochs(stages, cfg.trainer.max_epochs, cfg.schedule.get("epoch_cap"))
    extra = {"task_name": str(cfg.get("task_name") or "train"), "tags": check_tags(cfg.get("tags"), False)}
    baseline = (cfg.get("baseline") or {}).get("name")
    if baseline == "single_task":
        stages = single_task_stages(stages, list(datamodule.tasks))
        extra["baseline"] = "single_task"
    elif baseline:
        raise ValueError(f"baseline.name must be 'single_task' or null, got '{baseline}'.")
    builders = Builders(
        model=build_model(cfg, datamodule),
        trainer=build_trainer(cfg),
        optimizer=instantiate(cfg.optimizer) if cfg.get("optimizer") else None,
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        balancer=OmegaConf.to_container(cfg.balancer, resolve=True) if cfg.get("balancer") else None,
        gradient_clip_val=cfg.trainer.get("gradient_clip_val"),
        model_spec=model_spec(cfg, datamodule),
    )
    runner = ScheduleRunner(
        stages,
        datamodule,
        builders,
        run_dir=run_dir,
        config=OmegaConf.to_container(cfg, resolve=True),
        extra=extra,
        fuse=list(cfg.schedule.get("fuse") or []),
        seed=cfg.seed,
        nonfinite=(cfg.get("guard") or {}).get("nonfinite", "stop"),
        rerun_from=cfg.get("rerun_from"),
        log=log,
    )
    produced = {
        st.name: {t: list(datamodule.tasks[t].metric_directions) for t in st.trained_tasks} for st in runner.stages
    }
    key = "optimized_metrics" if cfg.get("optimized_metrics") else "optimized_metric"
    for name in objective_names(cfg):
        check_metric_name(name, produced, key)
    return runner


def train(
    cfg: DictConfig, run_dir: str | Path | None = None, log: Callable[[str], None] = print
) -> tuple[float | None, dict]:
    """Run the configured schedule; returns (the optimized metric or None, results). ``log``
    receives the runner's progress messages (``mtl-train`` logs them, so they reach ``train.log``)."""
    check_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    run_dir = run_dir or cfg.paths.output_dir
    if is_rank_zero():
        apply_extras(cfg, run_dir, echo=log)
    results = build_runner(cfg, run_dir, log=log).run()
    if is_rank_zero():
        print_results(results)
        print(f"Results: {Path(run_dir) / 'results.json'}")
    metric = lookup_metric(results, cfg.optimized_metric) if cfg.get("optimized_metric") else None
    return metric, results


# ---------------------------------------------------------------------------------- DDP under Hydra
#: environment a DDP launcher sets in rank 0; cleared after each job so the next job of a
#: multirun starts its own ranks
DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def ddp_child_command(local_rank: int) -> tuple[list[str], str]:
    """The command Lightning runs for DDP rank ``local_rank`` of this Hydra job.

    Lightning's own re-runs ``sys.argv``: in a multirun that is the whole sweep, and the run
    directory it passes is ``hydra.run.dir``, not the job's. Here the other ranks start from the
    job's saved config (``<job dir>/.hydra/config.yaml``) in the job's directory, so every rank
    runs exactly this job.
    """
    from hydra.utils import get_original_cwd

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    saved = run_dir / str(hc.output_subdir) / "config.yaml" if hc.output_subdir else None
    if saved is None or not saved.is_file():
        raise RuntimeError(
            f"DDP needs this job's saved config ({run_dir}/.hydra/config.yaml) to start the other ranks; "
            f"do not set hydra.output_subdir=null."
        )
    command = [
        sys.executable, "-m", "mtl.train", f"--config-path={saved.parent}", "--config-name=config",
        f'hydra.run.dir="{run_dir}"', f"hydra.job.name=train_ddp_process_{local_rank}", "hydra.output_subdir=null",
    ]
    return command, get_original_cwd()


def _use_job_config_for_ddp() -> None:
    import lightning_fabric.strategies.launchers.subprocess_script as fabric_launcher
    import pytorch_lightning.strategies.launchers.subprocess_script as pl_launcher

    pl_launcher._hydra_subprocess_cmd = ddp_child_command
    fabric_launcher._hydra_subprocess_cmd = ddp_child_command


def _end_ddp(env: Mapping[str, str | None]) -> None:
    """Close the job's process group and restore the environment Lightning's launcher changed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | tuple[float, ...] | None:
    quiet_lightning()
    run_dir = HydraConfig.get().runtime.output_dir
    _use_job_config_for_ddp()
    env = {k: os.environ.get(k) for k in DDP_ENV}
    launched_here = is_rank_zero()

    def job() -> dict:
        check_overrides(cfg, HydraConfig.get().overrides.task)
        return train(cfg, run_dir, log=logging.getLogger("mtl").info)[1]

    try:
        # in a multirun a failing job is recorded (error.txt, a failed results.json) and the sweep goes on
        return run_job(cfg, run_dir, job)
    except RunDirectoryError as err:
        # the run directory refuses this run (another config, another process): the message says what
        # to do, a traceback would only bury it
        print(f"mtl-train: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        if launched_here:
            _end_ddp(env)


if __name__ == "__main__":
    main()
