"""Every ``conf/sharing/*.yaml`` through the real entry point: compose, train a few batches, test.

Plus objective sharing in representation space on top of structure sharing: supported where the
sharing module has a shared representation (MMoE), a clear error where it has none (cross-stitch).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mtl.train import train

SHARINGS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "conf" / "sharing").glob("*.yaml"))
TASKS = {"left", "right", "sum"}
# the tiny multidigits run of conftest.TINY, one stage on every task, no log files
QUICK = ["schedule=multitask", "logger=none", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]


def test_every_sharing_config_is_covered():
    assert {"hard", "cross_stitch", "mtan", "mmoe", "omoe", "cgc", "ple", "dselect_k"} <= set(SHARINGS)


def check_results(results: dict, run_dir: Path) -> None:
    tasks = results["stages"]["train"]["tasks"]
    assert set(tasks) == TASKS
    for task, metrics in tasks.items():
        assert math.isfinite(metrics["test"]["loss"]), (task, metrics)
        assert 0.0 <= metrics["test"]["acc"] <= 1.0
    assert json.loads((run_dir / "results.json").read_text())["stages"]["train"]["tasks"].keys() == TASKS


@pytest.mark.parametrize("sharing", SHARINGS)
def test_sharing_trains_end_to_end(sharing, make_cfg, tmp_path):
    cfg = make_cfg(*QUICK, f"sharing={sharing}")
    assert cfg.sharing._target_.startswith("mtl.sharing.")
    _, results = train(cfg)
    check_results(results, Path(cfg.paths.output_dir))


def test_representation_space_balancing_with_mmoe(make_cfg):
    cfg = make_cfg(*QUICK, "sharing=mmoe", "balancer=upgrad", "balancer.engine.space=representation")
    _, results = train(cfg)
    check_results(results, Path(cfg.paths.output_dir))


def test_representation_space_balancing_with_cross_stitch_says_what_to_do(make_cfg):
    cfg = make_cfg(*QUICK, "sharing=cross_stitch", "balancer=upgrad", "balancer.engine.space=representation")
    with pytest.raises(ValueError, match="balancer.engine.space=representation.*CrossStitch.*balancer.engine.space=params"):
        train(cfg)
