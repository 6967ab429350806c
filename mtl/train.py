"""``mtl-train``: compose the config, run the schedule, print and return the results.

Usage: ``mtl-train [group=option ...] [key=value ...]``, ``mtl-train -m key=a,b``,
``mtl-train --cfg job``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from mtl.balancing import GradientAggregator
from mtl.report import print_results
from mtl.schedule import (
    Builders,
    ScheduleRunner,
    default_module,
    lookup_metric,
    single_task_stages,
    stages_from_dict,
)
from mtl.sweeps import run_job

# mtl/conf links to the repository's conf/ (a wheel carries the files themselves)
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")


def input_kwargs(backbone_cfg: DictConfig, datamodule: Any) -> dict[str, int]:
    """Fill a backbone's ``in_features`` / ``in_channels`` left null in config from the data."""
    shape = datamodule.input_shape
    out = {}
    if "in_features" in backbone_cfg and backbone_cfg.in_features is None:
        if any(d < 0 for d in shape):
            raise ValueError(
                f"backbone.in_features cannot be inferred: the datasets' input shapes differ ({shape}, "
                f"-1 where they differ). Use a backbone that pools, such as backbone=cnn."
            )
        out["in_features"] = int(math.prod(shape))
    if "in_channels" in backbone_cfg and backbone_cfg.in_channels is None:
        out["in_channels"] = int(shape[0]) if len(shape) == 3 else 1
    return out


def balancer_config(spec: Any, where: str) -> DictConfig | None:
    """A stage's balancer: None, a preset name (``pcgrad``) or a ``{method: ..., space: ...}`` mapping."""
    if spec is None:
        return None
    if isinstance(spec, str):
        path = Path(CONFIG_DIR) / "balancer" / f"{spec}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in path.parent.glob("*.yaml"))
            raise ValueError(f"{where}: no balancer preset '{spec}'; choose one of {names}.")
        return OmegaConf.load(path)
    return OmegaConf.create(spec)


def check_trainer_for_aggregator(trainer_cfg: DictConfig, bcfg: DictConfig) -> None:
    """Refuse trainer settings that manual optimization cannot honour, with what to do instead."""
    name = str(bcfg.method.get("_target_", "")).rsplit(".", 1)[-1]
    if int(trainer_cfg.get("accumulate_grad_batches") or 1) != 1:
        raise ValueError(
            f"trainer.accumulate_grad_batches={trainer_cfg.accumulate_grad_batches} is not supported "
            f"with the gradient aggregator {name} (it aggregates each batch's task gradients); use a "
            f"larger data.batch_size or a loss weighting balancer."
        )


def build_runner(cfg: DictConfig, run_dir: str | Path) -> ScheduleRunner:
    """Everything a run needs, from a composed config (used by ``mtl-train`` and the tests)."""
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup()
    backbone_inputs = input_kwargs(cfg.backbone, datamodule)

    def make_model(tasks):
        backbone = instantiate(cfg.backbone, **backbone_inputs)
        sharing = instantiate(cfg.sharing, _convert_="all") if cfg.get("sharing") else None
        return instantiate(cfg.model, backbone=backbone, tasks=tasks, sharing=sharing, _convert_="all")

    optimizer = instantiate(cfg.optimizer) if cfg.get("optimizer") else None
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None

    def stage_balancer(stage) -> DictConfig | None:
        """The stage's own balancer config, else the run's."""
        return balancer_config(stage.balancer, where=f"schedule.stages.{stage.name}.balancer") or cfg.get("balancer")

    def make_module(model, stage, **extra):
        bcfg = stage_balancer(stage)
        num_tasks = len(stage.tasks) + len([s for s in stage.source_tasks if s not in stage.tasks])
        kwargs = {}
        if bcfg:
            kwargs["balancer"] = instantiate(bcfg.method, num_tasks=num_tasks, _convert_="all")
            kwargs["balancer_space"] = bcfg.get("space", "params")
            kwargs["jacobian_method"] = bcfg.get("jacobian", "auto")
            kwargs["chunk_size"] = bcfg.get("chunk_size")
            if isinstance(kwargs["balancer"], GradientAggregator):
                check_trainer_for_aggregator(cfg.trainer, bcfg)
                kwargs["gradient_clip_val"] = cfg.trainer.get("gradient_clip_val")
        return default_module(model, stage, optimizer=optimizer, scheduler=scheduler, **kwargs, **extra)

    def make_trainer(stage, stage_dir, callbacks, max_epochs):
        loggers = [
            instantiate(lg, save_dir=str(stage_dir)) for lg in (cfg.get("logger") or {}).values() if lg
        ]
        extra = [instantiate(cb) for cb in (cfg.get("callbacks") or {}).values() if cb]
        overrides = {"max_epochs": max_epochs} if max_epochs is not None else {}
        if is_aggregator(stage):  # clipping moves into the module under manual optimization
            overrides["gradient_clip_val"] = None
        return instantiate(
            cfg.trainer,
            default_root_dir=str(stage_dir),
            callbacks=callbacks + extra,
            logger=loggers or False,
            **overrides,
        )

    def is_aggregator(stage) -> bool:
        bcfg = stage_balancer(stage)
        target = bcfg.method.get("_target_") if bcfg else None
        return bool(target) and issubclass(get_class(target), GradientAggregator)

    stages = stages_from_dict(OmegaConf.to_container(cfg.schedule.stages, resolve=True))
    extra = {}
    baseline = (cfg.get("baseline") or {}).get("name")
    if baseline == "single_task":
        stages = single_task_stages(stages, list(datamodule.tasks))
        extra["baseline"] = "single_task"
    elif baseline:
        raise ValueError(f"baseline.name must be 'single_task' or null, got '{baseline}'.")
    return ScheduleRunner(
        stages,
        datamodule,
        Builders(model=make_model, trainer=make_trainer, module=make_module),
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
