"""lightning-hydra-template's extras: tags, the config tree, the warnings switch."""

import json
import warnings

import pytest

from mtl.extras import apply_extras, check_tags, config_tree
from mtl.train import check_config, train


def test_check_tags():
    assert check_tags(["a", 2], enforce=True) == ["a", "2"]
    assert check_tags(None, enforce=False) == []
    with pytest.raises(ValueError, match=r"tags=\[ablation\]"):
        check_tags([], enforce=True)
    with pytest.raises(ValueError, match="list of names"):
        check_tags("ablation", enforce=False)


def test_config_tree_lists_the_groups_in_order_with_interpolations_unresolved(make_cfg):
    cfg = make_cfg()
    tree = config_tree(cfg)
    branches = [line[4:] for line in tree.splitlines() if line[:4] in ("├── ", "└── ")]
    assert branches[:6] == ["data", "backbone", "sharing", "model", "balancer", "schedule"]
    assert "seed" in branches and "tags" in branches
    assert "seed: ${seed}" in tree  # data.seed, as written
    assert "MultiDigitsDataModule" in tree


def test_enforce_tags_refuses_before_training(make_cfg):
    with pytest.raises(ValueError, match="extras.enforce_tags"):
        check_config(make_cfg("extras.enforce_tags=true", "tags=[]"))


def test_apply_extras_writes_the_tree_and_can_silence_warnings(make_cfg, tmp_path):
    printed = []
    with warnings.catch_warnings():
        apply_extras(make_cfg("extras.ignore_warnings=true", "extras.print_config=true"), tmp_path, echo=printed.append)
        assert any(f[0] == "ignore" and f[2] is Warning for f in warnings.filters)
    assert (tmp_path / "config_tree.log").read_text() == printed[0]


def test_tags_and_task_name_reach_results_json(make_cfg, tmp_path):
    cfg = make_cfg("schedule=multitask", "tags=[ablation,v2]", "task_name=study")
    train(cfg, tmp_path / "run", log=lambda m: None)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["tags"] == ["ablation", "v2"] and results["task_name"] == "study"
    assert (tmp_path / "run" / "config_tree.log").is_file()


def test_task_name_names_the_output_directory(make_cfg):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tests.conftest import CONF

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["task_name=study"], return_hydra_config=True)
    assert cfg.hydra.run.dir.startswith("outputs/study/runs/")
    assert cfg.hydra.sweep.dir.startswith("outputs/study/multiruns/")
    GlobalHydra.instance().clear()


def test_ckpt_path_says_how_to_resume(make_cfg):
    with pytest.raises(ValueError, match=r"hydra.run.dir=outputs/r` .*'finetune' continues"):
        check_config(make_cfg("ckpt_path=outputs/r/stages/finetune/checkpoints/last.ckpt"))
    with pytest.raises(ValueError, match=r"schedule.stages.<stage>.init=w.ckpt"):
        check_config(make_cfg("ckpt_path=w.ckpt"))
