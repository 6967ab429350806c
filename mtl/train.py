"""``mtl-train``: compose the config, run the schedule, print and return the results.

Usage: ``mtl-train [group=option ...] [key=value ...]``, ``mtl-train -m key=a,b``,
``mtl-train --cfg job``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import hydra
import pytorch_lightning as pl
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mtl.balancing import GradientAggregator
from mtl.model import MultiTaskModel
from mtl.report import print_results
from mtl.results import lookup_metric
from mtl.schedule import Builders, ScheduleConfig, ScheduleRunner, single_task_stages, stages_from_dict
from mtl.sweeps import run_job
from mtl.tasks import Task

# mtl/conf links to the repository's conf/ (a wheel carries the files themselves)
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")

# the schedule presets extend this schema (conf/schedule/*.yaml: `defaults: [base, _self_]`)
ConfigStore.instance().store(group="schedule", name="base", node=ScheduleConfig)


def build_model(cfg: DictConfig, datamodule: Any) -> Callable[[dict[str, Task]], MultiTaskModel]:
    """``tasks -> MultiTaskModel`` from the ``backbone``, ``sharing`` and ``model`` configs.

    Every backbone takes ``input_shape`` (the shape of one example); left null in config it is the
    data's. Used by ``mtl-train`` and ``mtl-eval`` alike.
    """
    shape = cfg.backbone.get("input_shape") or list(datamodule.input_shape)

    def make(tasks: dict[str, Task]) -> MultiTaskModel:
        backbone = instantiate(cfg.backbone, input_shape=shape, _convert_="all")
        sharing = instantiate(cfg.sharing, _convert_="all") if cfg.get("sharing") else None
        return instantiate(cfg.model, backbone=backbone, tasks=tasks, sharing=sharing, _convert_="all")

    return make


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


def build_runner(cfg: DictConfig, run_dir: str | Path) -> ScheduleRunner:
    """Everything a run needs, from a composed config (used by ``mtl-train`` and the tests)."""
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup()
    stages = stages_from_dict(OmegaConf.to_container(cfg.schedule.stages, resolve=True))
    extra = {}
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
    )
    return ScheduleRunner(
        stages,
        datamodule,
        builders,
        run_dir=run_dir,
        config=OmegaConf.to_container(cfg, resolve=True),
        extra=extra,
        fuse=list(cfg.schedule.get("fuse") or []),
    )


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> tuple[float | None, dict]:
    """Run the configured schedule; returns (the optimized metric or None, results)."""
    pl.seed_everything(cfg.seed, workers=True)
    run_dir = run_dir or cfg.paths.output_dir
    results = build_runner(cfg, run_dir).run()
    print_results(results)
    print(f"Results: {Path(run_dir) / 'results.json'}")
    metric = lookup_metric(results, cfg.optimized_metric) if cfg.get("optimized_metric") else None
    return metric, results


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | tuple[float, ...] | None:
    run_dir = HydraConfig.get().runtime.output_dir
    # in a multirun a failing job is recorded (error.txt, a failed results.json) and the sweep goes on
    return run_job(cfg, run_dir, lambda: train(cfg, run_dir)[1])


if __name__ == "__main__":
    main()
