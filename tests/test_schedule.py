"""End-to-end: the real Hydra config, composed and run for a few batches."""

import json

import pytest
import pytorch_lightning as pl
import torch

from mtl.schedule import Stage, stages_from_dict
from mtl.train import build_runner, train


def _results(tmp_path):
    return json.loads((tmp_path / "run" / "results.json").read_text())


@pytest.mark.parametrize("schedule", ["multitask", "transfer", "combined"])
def test_each_schedule_runs_and_writes_results(make_cfg, tmp_path, schedule):
    cfg = make_cfg(f"schedule={schedule}")
    _, results = train(cfg)
    saved = _results(tmp_path)
    assert saved["stages"].keys() == results["stages"].keys()
    last = list(saved["stages"].values())[-1]
    target = last["target_tasks"][0]
    assert 0.0 <= last["tasks"][target]["test"]["acc"] <= 1.0
    assert "loss" in last["tasks"][target]["val"]
    assert saved["config"]["schedule"]["name"] == schedule and len(saved["config_hash"]) == 12
    for name in saved["stages"]:
        stage_dir = tmp_path / "run" / "stages" / name
        assert (stage_dir / "checkpoints" / "last.ckpt").is_file()
        assert (stage_dir / "metrics.csv").is_file()
    if schedule == "combined":
        fin = saved["stages"]["finetune"]
        assert fin["source_tasks"] == ["left", "right"] and set(fin["tasks"]) == {"sum", "left", "right"}


def test_transfer_carries_the_backbone(make_cfg, tmp_path):
    cfg = make_cfg("schedule=transfer", "policy@schedule.stages.finetune.policy=linear_probe")
    train(cfg)
    pre = torch.load(tmp_path / "run/stages/pretrain/checkpoints/best.ckpt", weights_only=True)["state_dict"]
    fin = torch.load(tmp_path / "run/stages/finetune/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    conv = "model.sharing.backbone.stages.0.conv.weight"
    assert torch.equal(pre[conv], fin[conv])  # frozen throughout: bit-identical to the pretrained one
    assert any(k.startswith("model.heads.sum.") for k in fin)
    assert not any(k.startswith("model.heads.left.") for k in fin)


class Crash(pl.Callback):
    """Dies at the start of the second epoch, after the first epoch's checkpoint was written."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated crash")


def test_resume_skips_finished_and_continues_interrupted(make_cfg, tmp_path, capsys):
    cfg = make_cfg("schedule=combined", "schedule.stages.finetune.max_epochs=2")
    runner = build_runner(cfg, tmp_path / "run")
    make_trainer = runner.builders.trainer
    runner.builders.trainer = lambda stage, d, cbs, me: make_trainer(
        stage, d, cbs + ([Crash()] if stage.name == "finetune" else []), me
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        runner.run()
    assert (tmp_path / "run/stages/pretrain/result.json").is_file()
    assert not (tmp_path / "run/stages/finetune/result.json").exists()
    assert (tmp_path / "run/stages/finetune/checkpoints/last.ckpt").is_file()
    capsys.readouterr()
    _, results = train(cfg)  # the same command again
    out = capsys.readouterr().out
    assert "[pretrain] already finished" in out
    assert "[finetune] resuming the interrupted stage" in out
    fin = results["stages"]["finetune"]
    assert fin["resumed"] is True and fin["epochs"] == 2


def test_optimized_metric(make_cfg):
    metric, results = train(make_cfg("schedule=multitask", "optimized_metric=train/val/left/acc"))
    assert metric == results["stages"]["train"]["tasks"]["left"]["val"]["acc"]
    with pytest.raises(ValueError, match=r"optimized_metric 'train/val/nope/acc'.*train/val/left/acc"):
        train(make_cfg("schedule=multitask", "optimized_metric=train/val/nope/acc"))


def test_unknown_task_in_stage_lists_data_tasks(make_cfg, tmp_path):
    cfg = make_cfg("schedule=multitask", "schedule.stages.train.tasks=[left,colour]")
    with pytest.raises(ValueError, match=r"stages.train.tasks: unknown task\(s\) \['colour'\]; the data declares \['left', 'right', 'sum'\]"):
        build_runner(cfg, tmp_path / "run")


def test_bad_schedules():
    with pytest.raises(ValueError, match="schedule.stages is empty"):
        stages_from_dict({})
    with pytest.raises(ValueError, match="stages.ft.tasks is empty"):
        stages_from_dict({"ft": {"tasks": []}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['epochs'\]"):
        stages_from_dict({"ft": {"tasks": ["a"], "epochs": 3}})
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
        Stage(name="ft", tasks=["a"], mode="lowest")
    with pytest.raises(ValueError, match=r"stages.ft.distill: unknown key\(s\) \['teachr'\]"):
        Stage(name="ft", tasks=["a"], distill={"teachr": "init"})
    with pytest.raises(ValueError, match="stages.ft.source_tasks must be a list of task names"):
        Stage(name="ft", tasks=["a"], source_tasks="b")


def test_stage_config_errors_name_the_key(make_cfg, tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="schedule.stages.finetune.freeze"):
        make_cfg("schedule.stages.finetune.freeze=backbone")  # an old key: not a Stage field
    with pytest.raises(ConfigCompositionException, match="schedule.stages.finetune.max_epochs=three"):
        make_cfg("schedule.stages.finetune.max_epochs=three")
    # a wrong part in the LAST stage is refused before the first stage trains
    cfg = make_cfg("schedule=transfer", "schedule.stages.finetune.policy._target_=mtl.transfer.policies.Nope")
    with pytest.raises(ValueError, match=r"(?s)schedule\.stages\.finetune\.policy: .*Nope"):
        build_runner(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "stages").exists()


def test_missing_init_checkpoint(make_cfg, tmp_path):
    cfg = make_cfg("schedule=multitask", f"schedule.stages.train.init={tmp_path}/nothing.ckpt")
    with pytest.raises(FileNotFoundError, match="nothing.ckpt' does not exist"):
        train(cfg)


def test_init_checkpoint_with_another_backbone_lists_keys(make_cfg, tmp_path):
    train(make_cfg("schedule=multitask", "backbone=mlp"))
    ckpt = tmp_path / "run/stages/train/checkpoints/best.ckpt"
    other = make_cfg("schedule=multitask", f"schedule.stages.train.init={ckpt}", "paths.output_dir=" + str(tmp_path / "run2"))
    with pytest.raises(ValueError, match=r"do not fit(.|\n)*missing keys(.|\n)*unexpected keys"):
        train(other)


def test_single_task_baseline_expands_stages(make_cfg, tmp_path):
    _, results = train(make_cfg("schedule=combined", "baseline=single_task", "schedule.stages.finetune.max_epochs=1"))
    assert results["baseline"] == "single_task"
    assert list(results["stages"]) == ["pretrain-left", "pretrain-right", "finetune-sum"]
    for name, stage in results["stages"].items():
        assert len(stage["target_tasks"]) == 1 and stage["source_tasks"] == [] and len(stage["tasks"]) == 1
