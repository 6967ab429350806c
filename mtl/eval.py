"""``mtl-eval ckpt_path=...``: evaluate a checkpoint on the test split and print per-task metrics.

The model's tasks come from the checkpoint. The data, backbone, sharing and model configs come
from the run that wrote the checkpoint (its ``.hydra/config.yaml``, found above the checkpoint),
or from this command's config when the checkpoint is not inside a run directory.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mtl.module import MultiTaskModule
from mtl.report import print_results
from mtl.results import nest, task_directions
from mtl.tasks import Task
from mtl.train import CONFIG_DIR, build_model
from mtl.transfer.loading import load_weights


def find_run_config(ckpt: Path) -> Path | None:
    """The ``.hydra/config.yaml`` of the run directory that holds ``ckpt``, if any."""
    for parent in ckpt.resolve().parents:
        candidate = parent / ".hydra" / "config.yaml"
        if candidate.is_file():
            return candidate
    return None


def evaluate(cfg: DictConfig) -> dict:
    """Test the checkpoint ``cfg.ckpt_path``; returns ``{"stages": {"eval": {...}}}`` results."""
    ckpt = Path(cfg.ckpt_path)
    if not ckpt.is_file():
        raise FileNotFoundError(f"ckpt_path: '{ckpt}' does not exist.")
    meta = torch.load(ckpt, map_location="cpu", weights_only=True).get("mtl")
    if not meta:
        raise ValueError(f"ckpt_path: '{ckpt}' was not written by mtl-train (no task information).")
    run_cfg_path = find_run_config(ckpt) if cfg.get("use_run_config", True) else None
    source = cfg
    if run_cfg_path is not None:
        print(f"Using the config of the run that wrote the checkpoint: {run_cfg_path}")
        source = OmegaConf.load(run_cfg_path)
    pl.seed_everything(source.seed, workers=True)
    tasks = {name: Task(**spec) for name, spec in meta["tasks"].items()}
    datamodule = instantiate(source.data, _convert_="all")
    missing = [t for t in tasks if t not in datamodule.tasks]
    if missing:
        raise ValueError(f"The checkpoint's task(s) {missing} are not in the data {list(datamodule.tasks)}.")
    used = meta["target_tasks"] + [s for s in meta["source_tasks"] if s not in meta["target_tasks"]]
    datamodule.select_tasks(meta["target_tasks"], meta["source_tasks"])
    model = build_model(source, datamodule)(tasks)
    report = load_weights(model, ckpt)
    print(report.summary())
    module = MultiTaskModule(model, tasks=meta["target_tasks"], source_tasks=meta["source_tasks"])
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    out = trainer.test(module, datamodule=datamodule, verbose=False)
    test = nest({k: v for d in out for k, v in d.items()}, "test")
    stage = {
        "tasks": {t: {"test": test.get(t, {})} for t in used},
        "directions": task_directions({t: tasks[t] for t in used}),
        "source_tasks": meta["source_tasks"],
    }
    return {"stages": {"eval": stage}}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    results = evaluate(cfg)
    print_results(results)


if __name__ == "__main__":
    main()
