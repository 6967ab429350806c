"""``mtl-eval ckpt_path=...``: evaluate a checkpoint on the test split and print per-task metrics.

The model's tasks come from the checkpoint. The data, backbone, sharing and model configs come from
the checkpoint too (``mtl-train`` saves them inside every checkpoint, as data), or from where
``config_from`` says: ``command`` (this command's config groups) or a config file the user names.
No file found near the checkpoint is ever read: a config planted beside a downloaded checkpoint
must not choose what code runs. From a checkpoint's own spec only classes of the ``mtl`` package
are built (modules for the model, DataModules for the data).
"""

from __future__ import annotations

import copy

import inspect
import logging
import shutil
from pathlib import Path
from typing import Any, Mapping

import hydra
from hydra.core.hydra_config import HydraConfig
import pytorch_lightning as pl
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from mtl.module import MultiTaskModule
from mtl.report import print_results
from mtl.results import nest, task_directions, write_json
from mtl.tasks import Task
from mtl.train import CONFIG_DIR, build_model, instantiate_data
from mtl.transfer.loading import load_checkpoint, load_weights

SPEC_KEYS = ("data", "backbone", "sharing", "model")

# conf/eval.yaml puts the results next to the checkpoint: ${mtl.parent:${ckpt_path}}
for _name, _fn in (("mtl.parent", lambda p: str(Path(str(p)).parent)), ("mtl.stem", lambda p: Path(str(p)).stem)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)


def check_spec_targets(node: Any, where: str, base: type) -> None:
    """Refuse a checkpoint's config node whose ``_target_`` (at any depth) is not an ``mtl`` class
    derived from ``base``; nothing outside the package is imported to find out."""
    if isinstance(node, Mapping):
        target = node.get("_target_")
        if target is not None:
            target = str(target)
            if not (target == "mtl" or target.startswith("mtl.")):
                raise ValueError(
                    f"{where}._target_ is '{target}': a checkpoint's own config may only build classes of "
                    f"the mtl package. If you trust it, name a config explicitly: config_from=<file> or "
                    f"config_from=command with data=..., backbone=...."
                )
            cls = get_class(target)
            if not (inspect.isclass(cls) and issubclass(cls, base)):
                raise ValueError(f"{where}._target_ '{target}' is not a {base.__name__}; refusing to build it.")
        for key, value in node.items():
            if key != "_target_":
                check_spec_targets(value, f"{where}.{key}", (nn.Module, pl.LightningDataModule))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            check_spec_targets(value, f"{where}[{i}]", (nn.Module, pl.LightningDataModule))


def model_source(cfg: DictConfig, checkpoint: Mapping[str, Any], ckpt: Path) -> tuple[DictConfig, str]:
    """The config (``data``, ``backbone``, ``sharing``, ``model``, ``seed``) to rebuild from, and
    where it came from (for the log)."""
    choice = str(cfg.get("config_from") or "checkpoint")
    if choice == "command":
        return cfg, "this command's config groups"
    if choice != "checkpoint":
        path = Path(choice)
        if not path.is_file():
            raise FileNotFoundError(f"config_from: '{path}' does not exist (use checkpoint, command or a config file).")
        loaded = OmegaConf.load(path)
        missing = [k for k in ("data", "backbone", "model") if k not in loaded]
        if missing:
            raise ValueError(f"config_from: '{path}' has no {missing}; name a run's .hydra/config.yaml.")
        return loaded, f"the config file {path}"
    spec = checkpoint.get("mtl_run")
    if not isinstance(spec, Mapping) or not all(spec.get(k) for k in ("data", "backbone", "model")):
        raise ValueError(
            f"ckpt_path: '{ckpt}' holds no model config (written by an older mtl-train?). Name one: "
            f"config_from=<run>/.hydra/config.yaml, or config_from=command with the run's data=..., "
            f"backbone=..., sharing=... options."
        )
    bases = {"data": pl.LightningDataModule, "backbone": nn.Module, "sharing": nn.Module, "model": nn.Module}
    for key in SPEC_KEYS:
        if spec.get(key) is not None:
            check_spec_targets(spec[key], f"{ckpt}:mtl_run.{key}", bases[key])
    node = OmegaConf.create({k: spec.get(k) for k in SPEC_KEYS})
    node.seed = int(spec.get("seed", cfg.get("seed", 0)))
    return node, "the checkpoint"


def load_module(path: str | Path, map_location: str = "cpu") -> MultiTaskModule:
    """The :class:`MultiTaskModule` of a checkpoint written by ``mtl-train``, rebuilt from what the
    checkpoint itself stores (its tasks, and the backbone, sharing and model configs, of which only
    ``mtl`` classes are built), in eval mode. ``mtl.load`` and
    ``MultiTaskModule.load_from_checkpoint`` call this."""
    ckpt = Path(path)
    obj = load_checkpoint(ckpt, "checkpoint")
    meta = obj.get("mtl") if isinstance(obj, Mapping) else None
    spec = obj.get("mtl_run") if isinstance(obj, Mapping) else None
    if not meta or not isinstance(spec, Mapping) or not spec.get("backbone") or not spec.get("model"):
        raise ValueError(
            f"'{ckpt}' holds no task and model information (it was not written by mtl-train, or by an older "
            f"one); rebuild the model yourself and use mtl.transfer.loading.load_weights."
        )
    bases = {"backbone": nn.Module, "sharing": nn.Module, "model": nn.Module}
    for key, base in bases.items():
        if spec.get(key) is not None:
            check_spec_targets(spec[key], f"{ckpt}:mtl_run.{key}", base)
    tasks = {name: Task(**task) for name, task in meta["tasks"].items()}
    backbone = instantiate(spec["backbone"], _convert_="all")
    sharing = instantiate(spec["sharing"], _convert_="all") if spec.get("sharing") else None
    model = instantiate(spec["model"], _partial_=True, _convert_="all")(backbone=backbone, tasks=tasks, sharing=sharing)
    load_weights(model, ckpt)
    module = MultiTaskModule(model, tasks=meta["target_tasks"], source_tasks=meta["source_tasks"])
    return module.to(map_location).eval()


#: what a task learned from its training data, kept from the checkpoint when the data is read again
LEARNED_TASK_FIELDS = ("class_names", "target_mean", "target_std")


def pin_learned_task_fields(data_cfg: DictConfig, task_specs: Mapping[str, Mapping]) -> DictConfig:
    """The data config with each declared task's label coding and target scale taken from the
    checkpoint's task spec, so the data being evaluated (possibly another file) is coded and scaled
    as the training data was, not estimated again."""
    data_cfg = copy.deepcopy(data_cfg)
    declared = data_cfg.get("tasks") if isinstance(data_cfg, DictConfig) else None
    if not declared:
        return data_cfg
    with open_dict(data_cfg):
        for name, spec in task_specs.items():
            if name in declared and declared[name] is not None:
                for field in LEARNED_TASK_FIELDS:
                    if spec.get(field) is not None:
                        declared[name][field] = spec[field]
    return data_cfg


def pin_preprocessing(datamodule: Any, checkpoint: Mapping[str, Any]) -> None:
    """Give ``datamodule`` the checkpoint's saved DataModule state (a CSV's feature scaling) before
    it reads its files, so they are scaled as the training data was."""
    state = checkpoint.get(type(datamodule).__qualname__)
    if state and hasattr(datamodule, "load_state_dict") and not getattr(datamodule, "splits", None):
        datamodule.load_state_dict(state)


def evaluate(cfg: DictConfig) -> dict:
    """Test the checkpoint ``cfg.ckpt_path``; returns ``{"stages": {"eval": {...}}}`` results."""
    ckpt = Path(cfg.ckpt_path)
    obj = load_checkpoint(ckpt, "ckpt_path: checkpoint")
    meta = obj.get("mtl") if isinstance(obj, Mapping) else None
    if not meta:
        raise ValueError(f"ckpt_path: '{ckpt}' was not written by mtl-train (no task information).")
    source, where = model_source(cfg, obj, ckpt)
    print(f"Model and data config from {where}")
    pl.seed_everything(source.get("seed", 0), workers=True)
    datamodule = instantiate_data(pin_learned_task_fields(source.data, meta["tasks"]))
    pin_preprocessing(datamodule, obj)
    # the data's own Task objects where it declares them (a custom head or loss given as an object
    # is saved as a placeholder), else the checkpoint's plain-data spec
    tasks = {name: datamodule.tasks[name] if name in datamodule.tasks else Task(**spec) for name, spec in meta["tasks"].items()}
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
    out = Path(HydraConfig.get().runtime.output_dir)
    try:
        results = evaluate(cfg)
    except BaseException:
        _remove_if_only_hydra_files(out)  # a failed evaluation leaves no directory behind
        raise
    write_json(out / "eval_results.json", results)
    print_results(results)
    print(f"Results: {out / 'eval_results.json'}")


def _remove_if_only_hydra_files(out: Path) -> None:
    """Remove ``out`` if it holds nothing but what Hydra wrote there (``.hydra/``, the job log)."""
    logging.shutdown()
    if out.is_dir() and all(p.name in (".hydra", "eval.log") for p in out.iterdir()):
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
