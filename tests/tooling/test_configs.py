"""The tooling presets compose with the real config, and the loggers work with the runner's call."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from tooling_helpers import group_override

from conftest import CONF


def instantiate_loggers(cfg, stage_dir: Path):
    """The loggers of the trainer that the entry point's real trainer builder makes for a stage."""
    from mtl.schedule import Stage
    from mtl.train import build_trainer

    trainer = build_trainer(cfg)(Stage(name=stage_dir.name, tasks=["left"]), stage_dir, [], None)
    return trainer.loggers


def test_csv_logger_writes_metrics_csv_in_the_stage_dir(make_cfg, tmp_path):
    (logger,) = instantiate_loggers(make_cfg("logger=csv"), tmp_path / "stages" / "s")
    logger.log_metrics({"val/a/acc": 0.5}, step=0)
    logger.save()
    assert (tmp_path / "stages" / "s" / "metrics.csv").is_file()


def test_many_is_csv_and_tensorboard(make_cfg, tmp_path):
    cfg = make_cfg("logger=many")
    assert sorted(cfg.logger) == ["csv", "tensorboard"]
    pytest.importorskip("tensorboard")
    csv, tb = instantiate_loggers(cfg, tmp_path / "s")
    assert Path(tb.log_dir).parent == tmp_path / "s"


def test_mlflow_logs_to_a_sqlite_store_in_the_run_dir(make_cfg, tmp_path):
    cfg = make_cfg("logger=mlflow")
    assert cfg.logger.mlflow.tracking_uri == f"sqlite:///{tmp_path / 'run'}/mlflow.db"
    pytest.importorskip("mlflow")
    (logger,) = instantiate_loggers(cfg, tmp_path / "run" / "stages" / "s")
    logger.log_metrics({"val/a/acc": 0.5}, step=0)
    assert (tmp_path / "run" / "mlflow.db").is_file()


def test_wandb_is_offline_with_one_run_per_stage(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg("logger=wandb")
    assert cfg.logger.wandb.offline is True
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    ids = []
    for stage in ("pretrain", "finetune"):
        (logger,) = instantiate_loggers(cfg, tmp_path / "run" / "stages" / stage)
        logger.log_metrics({"x": 1.0})
        ids.append(logger.experiment.id)
        assert (tmp_path / "run" / "stages" / stage / "wandb").is_dir()
    assert ids[0] != ids[1]
    import wandb

    wandb.finish()


def test_rich_callbacks_instantiate(make_cfg):
    cfg = make_cfg("callbacks=rich")
    names = sorted(type(instantiate(c)).__name__ for c in cfg.callbacks.values())
    assert names == ["RichModelSummary", "RichProgressBar"]


def test_baseline_preset(make_cfg):
    cfg = make_cfg(group_override("baseline", "single_task"))
    assert cfg.baseline.name == "single_task"


def hydra_cfg(*overrides):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            return compose("train", overrides=list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.parametrize("preset", ["multidigits_optuna", "multidigits_pareto"])
def test_hparams_search_presets_select_the_optuna_sweeper(preset):
    cfg = hydra_cfg(group_override("hparams_search", preset), "hydra.sweep.dir=/tmp/x")
    assert cfg.hydra.sweeper._target_.endswith("mtl_optuna_sweeper.optuna_sweeper.OptunaSweeper")
    assert cfg.hydra.sweeper.storage == "sqlite:////tmp/x/optuna.db"
    assert cfg.hydra.sweeper.params
    directions = cfg.hydra.sweeper.direction
    objectives = cfg.get("optimized_metrics") or [cfg.optimized_metric]
    assert len(objectives) == (len(directions) if not isinstance(directions, str) else 1)


def test_launcher_presets():
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    cfg = hydra_cfg("hydra/launcher=parallel")
    assert cfg.hydra.launcher.n_jobs == 2 and "JoblibLauncher" in cfg.hydra.launcher._target_
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = hydra_cfg("hydra/launcher=slurm")
    assert cfg.hydra.launcher.max_num_timeout == 3 and "Slurm" in cfg.hydra.launcher._target_


def test_debug_and_callback_presets_build_real_trainers(make_cfg, tmp_path):
    """debug=default|profiler and callbacks=early_stopping through the real trainer builder."""
    from pytorch_lightning.callbacks import EarlyStopping
    from pytorch_lightning.profilers import SimpleProfiler

    from mtl.schedule import Stage
    from mtl.train import build_trainer

    stage = Stage(name="s", tasks=["left"])
    trainer = build_trainer(make_cfg("debug=default"))(stage, tmp_path / "a", [], None)
    assert trainer.max_epochs == 1 and trainer._detect_anomaly
    trainer = build_trainer(make_cfg("debug=profiler"))(stage, tmp_path / "b", [], None)
    assert isinstance(trainer.profiler, SimpleProfiler)
    trainer = build_trainer(make_cfg("callbacks=early_stopping"))(stage, tmp_path / "c", [], None)
    stopping = [cb for cb in trainer.callbacks if isinstance(cb, EarlyStopping)]
    assert len(stopping) == 1 and stopping[0].monitor == "val/loss"
