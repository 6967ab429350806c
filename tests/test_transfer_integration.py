"""Transfer toolkit through the module and the schedule: policies, regularizers, alpha schedules,
distillation, generations and fusion, resume."""

import json

import pytest
import pytorch_lightning as pl
import torch

from mtl import MultiTaskModel, MultiTaskModule, Task
from mtl.backbones import CNN
from mtl.data import MultiDigitsDataModule
from functools import partial

from mtl.transfer import L2SP, AlphaSchedule, TransferTerms
from mtl.transfer.policies import DiscriminativeLR, GradualUnfreeze, LayerDecay, LinearProbe
from mtl.train import build_runner, train


@pytest.fixture(scope="module")
def data():
    dm = MultiDigitsDataModule(n_train=128, n_val=32, n_test=32, batch_size=32)
    dm.setup()
    return dm


def fit(module, dm, epochs=1):
    trainer = pl.Trainer(
        max_epochs=epochs, limit_val_batches=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    return trainer


def cnn_model(dm):
    torch.manual_seed(0)
    return MultiTaskModel(CNN(channels=[4, 8, 8]), dm.tasks)


def test_gradual_unfreeze_trains_top_blocks_first(data):
    model = cnn_model(data)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(MultiTaskModule(model, policy=GradualUnfreeze()), data, epochs=1)
    after = model.state_dict()
    # epoch 0: only the top block (stage 2) trains; stages 0 and 1 (weights and BN statistics) untouched
    for k in before:
        if k.startswith("sharing.backbone.stages.0.") or k.startswith("sharing.backbone.stages.1."):
            assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["sharing.backbone.stages.2.conv.weight"], after["sharing.backbone.stages.2.conv.weight"])


@pytest.mark.parametrize(
    "policy,expected",
    [
        (DiscriminativeLR(factor=2.0), [0.125, 0.25, 0.5]),
        (LayerDecay(decay=0.5), [0.125, 0.25, 0.5]),
        (LinearProbe(), [0.0, 0.0, 0.0]),
    ],
)
def test_policy_learning_rates_reach_the_optimizer(data, policy, expected):
    model = cnn_model(data)
    module = MultiTaskModule(model, policy=policy, optimizer=partial(torch.optim.AdamW, lr=0.01))
    seen = {}
    original = torch.optim.AdamW.step

    def spy(self, closure=None):
        for g in self.param_groups:
            seen[g["name"]] = g["lr"]
        return original(self, closure)

    torch.optim.AdamW.step = spy
    try:
        trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, accelerator="cpu", logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, datamodule=data)
    finally:
        torch.optim.AdamW.step = original
    assert [seen[f"backbone.{i}"] for i in range(3)] == pytest.approx([0.01 * e for e in expected])
    assert seen["heads"] == pytest.approx(0.01)
    # after the step the scheduler-visible learning rates are restored
    assert all(g["lr"] == pytest.approx(0.01) for g in trainer.optimizers[0].param_groups)


def test_l2sp_pulls_towards_the_start_and_disables_weight_decay(data):
    model = cnn_model(data)
    module = MultiTaskModule(model, transfer=TransferTerms({"l2sp": L2SP(alpha=0.5)}))
    groups = module.configure_optimizers().param_groups
    assert all(g.get("weight_decay") == 0.0 for g in groups)
    records = []
    module.task_losses(next(iter(data.train_dataloader())), None, records=records)
    first = module.transfer(records)
    heads = sum((p**2).sum() for t in module.target_tasks for p in model.heads[t].parameters())
    assert first.item() == pytest.approx(0.005 * heads.item(), rel=1e-5)  # at the start only beta/2 |w_new|^2
    with torch.no_grad():
        model.backbone.stages[0].conv.weight.add_(1.0)
    n = model.backbone.stages[0].conv.weight.numel()
    assert module.transfer(records).item() == pytest.approx(first.item() + 0.5 / 2 * n, rel=1e-4)


def test_alpha_schedule_moves_the_source_weight(data):
    model = cnn_model(data)
    module = MultiTaskModule(model, tasks=["sum"], source_tasks=["left", "right"], alpha=AlphaSchedule(1.0, 0.0, "linear"))
    data.select_tasks(["sum"], ["left", "right"])
    seen = []

    class Spy(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append((pl_module.loss_weights["left"] * 2, pl_module.loss_weights["sum"]))

    trainer = pl.Trainer(max_epochs=3, limit_val_batches=0, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Spy()])
    trainer.fit(module, datamodule=data)
    data.select_tasks(list(data.tasks))
    assert [a for a, _ in seen] == pytest.approx([1.0, 0.5, 0.0])
    assert [w for _, w in seen] == pytest.approx([0.0, 0.5, 1.0])


def test_lwf_and_delta_and_bss_in_a_transfer_stage(make_cfg, tmp_path):
    cfg = make_cfg(
        "schedule=transfer", "schedule.stages.finetune.max_epochs=2",
        "schedule.stages.finetune.distill={teacher:init,tasks:[left,right]}",
        "+regularizer@schedule.stages.finetune.regularizers.delta=delta",
        "+regularizer@schedule.stages.finetune.regularizers.bss=bss",
    )
    _, results = train(cfg)
    fin = results["stages"]["finetune"]
    assert set(fin["tasks"]) == {"sum"}
    metrics = (tmp_path / "run/stages/finetune/metrics.csv").read_text()
    assert "train/transfer_terms" in metrics
    ckpt = torch.load(tmp_path / "run/stages/finetune/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("transfer.terms.distill.teacher.heads.left.") for k in ckpt)  # the source heads LwF distils
    assert any(k.startswith("transfer.terms.delta.source.") for k in ckpt)  # DELTA's reference


def test_generations_distil_and_fuse(make_cfg, tmp_path):
    _, results = train(make_cfg("schedule=generations", "data=digits", "data.label_budget=null"))
    assert list(results["stages"]) == ["gen0", "gen1", "gen2"]
    fusion = results["fusion"]
    assert fusion["stages"] == ["gen0", "gen1", "gen2"]
    for kind in ("ensemble", "soup"):
        assert 0.0 <= fusion[kind]["high"]["test"]["acc"] <= 1.0


def test_resumed_stage_ends_with_the_same_parameters(make_cfg, tmp_path):
    class Crash(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                raise RuntimeError("simulated crash")

    overrides = ("schedule=multitask", "trainer.max_epochs=3", "trainer.limit_train_batches=4")
    train(make_cfg(*overrides, f"paths.output_dir={tmp_path}/straight"))
    cfg = make_cfg(*overrides, f"paths.output_dir={tmp_path}/resumed")
    pl.seed_everything(cfg.seed, workers=True)  # as train() does
    runner = build_runner(cfg, tmp_path / "resumed")
    make_trainer = runner.builders.trainer
    runner.builders.trainer = lambda stage, d, cbs, me: make_trainer(stage, d, cbs + [Crash()], me)
    with pytest.raises(RuntimeError, match="simulated crash"):
        runner.run()
    train(cfg)
    a = torch.load(tmp_path / "straight/stages/train/checkpoints/last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "resumed/stages/train/checkpoints/last.ckpt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert json.loads((tmp_path / "resumed/results.json").read_text())["stages"]["train"]["resumed"] is True


def test_fusion_rows_in_the_printed_table():
    from mtl.report import results_table

    results = {
        "stages": {"gen0": {"tasks": {"high": {"val": {"acc": 0.5}, "test": {"acc": 0.4}}}, "source_tasks": []}},
        "fusion": {"stages": ["gen0", "gen1"], "ensemble": {"high": {"val": {"acc": 0.7}, "test": {"acc": 0.6}}},
                   "soup": {"high": {"val": {"acc": 0.2}, "test": {"acc": 0.1}}}},
    }
    table = results_table(results)
    assert table.row_count == 6
    assert "ensemble of gen0+gen1" in [c for c in table.columns[0]._cells]


def test_linear_probe_freezes_the_shared_parts_of_the_sharing_structure(data):
    """A frozen policy covers every shared parameter: backbone blocks and MMoE's experts (bit-identical,
    normalisation statistics included); the task-specific gates and the heads train."""
    from mtl.backbones import MLP
    from mtl.sharing import MMoE

    torch.manual_seed(0)
    model = MultiTaskModel(MLP(input_shape=data.input_shape, hidden=[16, 16], norm=True), data.tasks, sharing=partial(MMoE, num_experts=2))
    module = MultiTaskModule(model, policy=LinearProbe())
    groups = {g["name"]: g for g in module.configure_optimizers().param_groups}
    assert set(groups) == {"backbone.0", "backbone.1", "sharing", "task_parts", "heads"}
    assert {id(p) for p in groups["sharing"]["params"]} == {id(p) for p in model.sharing.experts.parameters()}
    assert {id(p) for p in groups["task_parts"]["params"]} == {id(p) for p in model.sharing.gates.parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(module, data, epochs=1)
    after = model.state_dict()
    for k in before:
        if k.startswith(("sharing.backbone.", "sharing.experts.")):
            assert torch.equal(before[k], after[k]), k
    for prefix in ("sharing.gates.", "heads."):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)), prefix
