"""The dense DataModules (scenes, NYUv2/Cityscapes .npy layout), their configs and the presets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import mtl.train  # noqa: F401  (registers the schedule schema the presets extend)
from mtl.data import DenseNpyDataModule, ScenesDataModule
from mtl.train import train

CONF = Path(__file__).resolve().parents[2] / "conf"


def write_npy_layout(root: Path, sizes=(("train", 6), ("val", 4)), hw=(8, 12), normal=True, classes=7) -> Path:
    rng = np.random.default_rng(0)
    folders = ["image", "label", "depth"] + (["normal"] if normal else [])
    for split, n in sizes:
        for f in folders:
            (root / split / f).mkdir(parents=True)
        for i in range(n):
            np.save(root / split / "image" / f"{i}.npy", rng.random((*hw, 3)).astype(np.float32))
            np.save(root / split / "label" / f"{i}.npy", rng.integers(-1, classes, hw).astype(np.float32))
            depth = rng.random((*hw, 1)).astype(np.float32) + 0.5
            depth[0] = 0.0
            np.save(root / split / "depth" / f"{i}.npy", depth)
            if normal:
                v = rng.normal(size=(*hw, 3))
                np.save(root / split / "normal" / f"{i}.npy", (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32))
    return root


def test_scenes_splits_are_fixed_by_their_seeds_not_the_run_seed():
    a = ScenesDataModule(n_train=6, n_val=3, n_test=3, size=16, seed=0)
    b = ScenesDataModule(n_train=6, n_val=3, n_test=3, size=16, seed=1)
    a.setup(), b.setup()
    assert a.input_shape == (3, 16, 16) and set(a.tasks) == {"segmentation", "depth", "normal"}
    assert torch.equal(a.splits["test"].x, b.splits["test"].x)
    assert not torch.equal(a.splits["train"].x[:3], a.splits["val"].x)
    labels = a.splits["train"].labels
    assert labels["segmentation"].shape == (6, 16, 16) and labels["depth"].shape == (6, 1, 16, 16)
    assert labels["normal"].shape == (6, 3, 16, 16)
    assert bool((labels["segmentation"] == -1).any()) and bool((labels["depth"] == 0).any())
    with pytest.raises(ValueError, match="three distinct seeds"):
        ScenesDataModule(split_seeds=[0, 0, 1])


def test_scenes_label_budget_marks_whole_scenes_unlabelled():
    dm = ScenesDataModule(n_train=8, n_val=2, n_test=2, size=8, label_budget={"depth": 3, "segmentation": 2})
    dm.setup()
    depth, seg = dm.splits["train"].labels["depth"], dm.splits["train"].labels["segmentation"]
    assert int(dm.tasks["depth"].label_mask(depth).sum()) == 3 and int(dm.tasks["segmentation"].label_mask(seg).sum()) == 2
    assert bool((seg[~dm.tasks["segmentation"].label_mask(seg)] == -1).all())
    dm.select_tasks(["segmentation"])
    assert len(dm.dataset("train")) == 2  # training keeps scenes labelled for a selected task


def test_npy_datamodule_on_a_tiny_layout(tmp_path):
    root = write_npy_layout(tmp_path / "nyu")
    tasks = {"segmentation": {"kind": "segmentation", "num_classes": 7}, "depth": {"kind": "depth"}, "normal": {"kind": "normal"}}
    dm = DenseNpyDataModule(root, tasks=tasks, batch_size=4, augment=True)
    assert dm.input_shape == (3, 8, 12)
    dm.select_tasks(["segmentation", "normal"])
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 8, 12) and set(y) == {"segmentation", "normal"}
    assert y["segmentation"].dtype == torch.int64 and y["normal"].shape == (4, 3, 8, 12)
    assert dm.datasets["test"] is dm.datasets["val"]  # no test split in this layout
    assert len(dm.test_dataloader().dataset) == 4
    with pytest.raises(ValueError, match="expected 288x384"):
        DenseNpyDataModule(root, layout="nyuv2").setup()
    with pytest.raises(ValueError, match="label_budget is not supported"):
        DenseNpyDataModule(root, tasks=tasks, label_budget={"depth": 2})
    with pytest.raises(FileNotFoundError, match="normal"):
        DenseNpyDataModule(write_npy_layout(tmp_path / "city", normal=False), tasks=tasks).setup()


@pytest.mark.parametrize("name", ["scenes", "nyuv2", "cityscapes"])
def test_data_configs_instantiate(name, tmp_path):
    cfg = OmegaConf.load(CONF / "data" / f"{name}.yaml")
    cfg.seed = 0
    if name == "scenes":
        cfg.n_train, cfg.n_val, cfg.n_test, cfg.size = 4, 2, 2, 8
    else:
        cfg.root = str(write_npy_layout(tmp_path / name, normal=name == "nyuv2"))
        cfg.layout = None
        cfg.num_workers = 0
    dm = instantiate(cfg, _convert_="all")
    dm.setup()
    expected = {"segmentation", "depth"} | ({"normal"} if name != "cityscapes" else set())
    assert set(dm.tasks) == expected and len(dm.input_shape) == 3


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("preset", ["nyuv2", "cityscapes"])
def test_gpu_presets_follow_the_libmtl_protocol(preset):
    cfg = _compose(f"experiment={preset}", "data.root=/nowhere")
    assert cfg.backbone.depth == 50 and cfg.backbone.output_stride == 8 and not cfg.backbone.small_input
    assert list(cfg.model.dense_head.rates) == [12, 24, 36] and cfg.model.dense_head._target_ == "mtl.heads.ASPPHead"
    assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.optimizer.lr == 1e-4 and cfg.optimizer.weight_decay == 1e-5
    assert cfg.scheduler.step_size == 100 and cfg.trainer.max_epochs == 200 and cfg.trainer.accelerator == "gpu"
    assert cfg.data.batch_size == (8 if preset == "nyuv2" else 64) and cfg.data.augment == (preset == "nyuv2")


def test_cityscapes_preset_trains_on_a_tiny_layout_with_single_task_baselines(tmp_path):
    root = write_npy_layout(tmp_path / "city", normal=False)
    small = [
        "data.layout=null", "data.batch_size=2", "data.num_workers=0", "data.pin_memory=false",
        "backbone.depth=10", "backbone.width=4", "model.dense_head.hidden=8", "model.dense_head.rates=[1,2]",
        "trainer=cpu", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.enable_progress_bar=false",
        "logger=none",
    ]
    cfg = _compose("experiment=cityscapes", f"data.root={root}", "baseline=single_task", *small,
                   f"paths.output_dir={tmp_path / 'run'}")
    _, results = train(cfg, tmp_path / "run")
    stages = results["stages"]
    assert set(stages) == {"train-segmentation", "train-depth"}
    seg = stages["train-segmentation"]
    assert set(seg["tasks"]["segmentation"]["test"]) == {"miou", "pix_acc", "loss"}
    assert seg["directions"]["segmentation"] == {"miou": "max", "pix_acc": "max", "loss": "min"}
    assert stages["train-depth"]["directions"]["depth"] == {"abs_err": "min", "rel_err": "min", "loss": "min"}
