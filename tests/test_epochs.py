"""How long stages are: trainer.max_epochs, a stage's own max_epochs, the debug cap, and epochs
over few labels (data.min_steps_per_epoch)."""

import pytest
import torch

from mtl.data import MultiDigitsDataModule
from mtl.data.base import EpochShuffleSampler
from mtl.schedule import Stage, resolve_epochs, stages_from_dict
from omegaconf import OmegaConf


def test_sampler_one_pass_by_default_and_deterministic_per_epoch():
    s = EpochShuffleSampler(10, seed=3)
    first = list(s)
    assert sorted(first) == list(range(10)) and len(s) == 10
    assert list(s) == first  # same epoch, same order
    s.set_epoch(1)
    assert list(s) != first and sorted(s) == list(range(10))


def test_sampler_chains_passes_when_asked_for_more():
    s = EpochShuffleSampler(4, seed=0, num_samples=10)
    order = list(s)
    assert len(order) == len(s) == 10
    # two full passes (each index once per pass), then the start of a third
    assert sorted(order[:4]) == sorted(order[4:8]) == [0, 1, 2, 3]
    assert len(set(order[8:])) == 2
    # never fewer than one pass
    assert len(EpochShuffleSampler(7, num_samples=3)) == 7


def test_min_steps_per_epoch_makes_scarce_label_epochs_longer():
    common = dict(n_train=256, n_val=32, n_test=32, batch_size=16, label_budget={"sum": 20}, seed=0,
                  source_tasks=["left", "right"], target_tasks=["sum"])
    one_pass = MultiDigitsDataModule(**common)
    longer = MultiDigitsDataModule(**common, min_steps_per_epoch=6)
    for dm in (one_pass, longer):
        dm.select_tasks(["sum"])
    assert len(one_pass.train_dataloader()) == 2  # 20 labels, batches of 16
    assert len(longer.train_dataloader()) == 6
    seen = torch.cat([y["sum"] for _, y in longer.train_dataloader()])
    assert len(seen) == 96 and (seen >= 0).all()  # only labelled examples, cycled
    # a set larger than the minimum is still one pass
    longer.select_tasks(["left"])
    assert len(longer.train_dataloader()) == 16
    with pytest.raises(ValueError, match="data.min_steps_per_epoch"):
        MultiDigitsDataModule(**common, min_steps_per_epoch=0)


def test_resolve_epochs_follows_the_trainer_then_caps():
    stages = [Stage(name="a"), Stage(name="b", max_epochs=60)]
    assert [s.max_epochs for s in resolve_epochs(stages, 8)] == [8, 60]
    assert [s.max_epochs for s in resolve_epochs(stages, 8, cap=2)] == [2, 2]
    assert [s.max_epochs for s in resolve_epochs(stages, 1, cap=30)] == [1, 30]
    with pytest.raises(ValueError, match="schedule.epoch_cap"):
        resolve_epochs(stages, 8, cap=0)


def _epochs(cfg):
    stages = stages_from_dict(OmegaConf.to_container(cfg.schedule.stages, resolve=True))
    return {s.name: s.max_epochs for s in resolve_epochs(stages, cfg.trainer.max_epochs, cfg.schedule.get("epoch_cap"))}


@pytest.mark.parametrize("schedule", ["multitask", "transfer", "combined", "generations"])
def test_trainer_max_epochs_sets_every_preset_stage(make_cfg, schedule):
    # the README's quick sweep: -m schedule=multitask,transfer,combined trainer.max_epochs=1
    cfg = make_cfg(f"schedule={schedule}", "trainer.max_epochs=1", tiny=False)
    assert set(_epochs(cfg).values()) == {1}


@pytest.mark.parametrize("debug", ["limit", "default", "profiler", "fdr"])
def test_debug_presets_cap_stages_with_their_own_length(make_cfg, debug):
    cfg = make_cfg(f"debug={debug}", "schedule.stages.finetune.max_epochs=60", tiny=False)
    assert max(_epochs(cfg).values()) <= 2


def test_default_job_lengths(make_cfg):
    cfg = make_cfg(tiny=False)
    assert _epochs(cfg) == {"pretrain": 8, "finetune": 8}
    assert cfg.data.min_steps_per_epoch == 40  # 300 sum labels: 8 passes per epoch
    assert _epochs(make_cfg("schedule.stages.finetune.max_epochs=20", tiny=False))["finetune"] == 20
