"""Every balancer trains end to end through MultiTaskModule; the aggregator path is exact."""

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mtl import MultiTaskModel, MultiTaskModule
from mtl.backbones import CNN
from mtl.balancing import GradientAggregator, JacobianEngine, aggregators, weightings
from mtl.data import MultiDigitsDataModule

CONF = Path(__file__).resolve().parents[1] / "conf" / "balancer"
AGGREGATORS = sorted(p.stem for p in CONF.glob("*.yaml") if OmegaConf.load(p).method._target_.split(".")[-1] in aggregators.__all__)
WEIGHTINGS = sorted(p.stem for p in CONF.glob("*.yaml") if OmegaConf.load(p).method._target_.split(".")[-1] in weightings.__all__)


@pytest.fixture(scope="module")
def data():
    dm = MultiDigitsDataModule(n_train=96, n_val=32, n_test=32, batch_size=32)
    dm.setup()
    return dm


def fit(module, dm, batches=2):
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=batches, limit_val_batches=1, accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    return trainer


def model(dm):
    torch.manual_seed(0)
    return MultiTaskModel(CNN(channels=[4, 8], pool_size=[1, 2]), dm.tasks)


def build(name, num_tasks=3):
    return instantiate(OmegaConf.load(CONF / f"{name}.yaml").method, num_tasks=num_tasks)


def test_presets_cover_every_method():
    assert len(AGGREGATORS) == 17 and len(WEIGHTINGS) == 10


@pytest.mark.parametrize("space", ["params", "representation"])
@pytest.mark.parametrize("name", AGGREGATORS)
def test_aggregator_trains_end_to_end(data, name, space):
    if name == "dbmtl" and space == "representation":
        pytest.skip("DB-MTL keeps a [T, P] moving average; P changes with the batch in representation space")
    m = model(data)
    before = m.backbone.stages[0].conv.weight.clone()
    module = MultiTaskModule(m, balancer=build(name), engine=JacobianEngine(space=space))
    trainer = fit(module, data)
    assert not torch.equal(before, m.backbone.stages[0].conv.weight)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    metrics = trainer.callback_metrics
    assert "train/grad_norm/left" in metrics and "train/cos/left/right" in metrics


@pytest.mark.parametrize("name", WEIGHTINGS)
def test_weighting_trains_end_to_end(data, name):
    m = model(data)
    balancer = build(name)
    module = MultiTaskModule(m, balancer=balancer)
    trainer = fit(module, data)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert "train/weight/sum" in trainer.callback_metrics
    if any(True for _ in balancer.parameters()):  # learned task weights are optimised with the model
        opt = trainer.optimizers[0]
        group = [g for g in opt.param_groups if g["name"] == "balancer"][0]
        assert group["weight_decay"] == 0.0 and len(group["params"]) > 0


class Sum(GradientAggregator):
    """J -> sum of rows: the aggregator equivalent of the plain summed loss."""

    def aggregate(self, J, losses):
        weights = torch.ones(J.shape[0], dtype=J.dtype, device=J.device)
        return weights @ J, weights


@pytest.mark.parametrize("space", ["params", "representation"])
def test_sum_aggregator_matches_automatic_optimization_exactly(data, space):
    """The manual path (Jacobian, write .grad, per-task heads) reproduces one backward of the sum."""
    torch.manual_seed(1)
    auto = model(data)
    manual = model(data)
    manual.load_state_dict(auto.state_dict())
    opt = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    pl.seed_everything(3)
    fit(MultiTaskModule(auto, optimizer=opt), data, batches=3)
    pl.seed_everything(3)
    fit(MultiTaskModule(manual, optimizer=opt, balancer=Sum(3), engine=JacobianEngine(space=space)), data, batches=3)
    for (k, a), (_, b) in zip(auto.state_dict().items(), manual.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), k


def test_representation_space_needs_a_representation(data):
    from functools import partial

    from mtl.sharing import CrossStitch

    torch.manual_seed(0)
    m = MultiTaskModel(CNN(channels=[4, 8]), data.tasks, sharing=partial(CrossStitch))
    module = MultiTaskModule(m, balancer=build("pcgrad"), engine=JacobianEngine(space="representation"))
    with pytest.raises(ValueError, match="CrossStitch has none; use balancer.engine.space=params"):
        fit(module, data, batches=1)


def test_stage_balancer_and_trainer_checks(make_cfg):
    from mtl.train import train

    cfg = make_cfg("schedule=combined", "+balancer@schedule.stages.finetune.balancer=pcgrad", "schedule.stages.finetune.max_epochs=1")
    _, results = train(cfg)
    assert results["stages"]["finetune"]["tasks"]["sum"]["test"]["acc"] >= 0.0
    # the stage's aggregator ran there (it logs gradient norms) and only there (the run's EW elsewhere)
    run = Path(cfg.paths.output_dir) / "stages"
    assert "train/grad_norm/sum" in (run / "finetune" / "metrics.csv").read_text().splitlines()[0]
    assert "train/grad_norm" not in (run / "pretrain" / "metrics.csv").read_text().splitlines()[0]
    with pytest.raises(ValueError, match="accumulate_grad_batches=2 is not supported with the gradient aggregator UPGrad"):
        train(make_cfg("schedule=multitask", "balancer=upgrad", "trainer.accumulate_grad_batches=2"))
    with pytest.raises(ValueError, match=r"schedule\.stages\.train\.balancer must be a balancer config with a 'method' node"):
        train(make_cfg("schedule=multitask", "schedule.stages.train.balancer=nope"))


def test_aggregator_honours_clipping_and_epoch_scheduler(data):
    """Manual optimization still clips gradients and steps an epoch-interval LR scheduler."""
    m = model(data)
    opt = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    sched = lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)  # noqa: E731
    module = MultiTaskModule(m, optimizer=opt, scheduler=sched, balancer=build("upgrad"), gradient_clip_val=1e-3)
    seen = []
    original = module.finetuning.step

    def spy(optimizer, epoch, closure=None):
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        original(optimizer, epoch, closure)

    module.finetuning.step = spy
    trainer = pl.Trainer(
        max_epochs=2, limit_train_batches=2, limit_val_batches=1, accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    assert len(seen) == 4 and max(seen) <= 1e-3 * (1 + 1e-4)  # clipped to the configured norm
    lrs = [g["lr"] for g in trainer.optimizers[0].param_groups]
    assert lrs == pytest.approx([0.1 * 0.5**2] * len(lrs))  # stepped once per epoch


@pytest.mark.parametrize("backbone", ["cnn", "mlp"])
def test_gramian_engine_from_the_config(make_cfg, backbone, tmp_path):
    """`balancer/engine=gramian` trains (conv parameters by chunks, the MLP's linear layers per layer)."""
    from mtl.train import train

    cfg = make_cfg("schedule=multitask", "balancer=upgrad", "balancer/engine=gramian", f"backbone={backbone}")
    _, results = train(cfg)
    assert results["stages"]["train"]["tasks"]["left"]["test"]["acc"] >= 0.0
    with pytest.raises(ValueError, match="DBMTL does not update along a weighting.*balancer/engine=jacobian"):
        train(make_cfg("schedule=multitask", "balancer=dbmtl", "balancer/engine=gramian", f"paths.output_dir={tmp_path}/other"))
