"""GPU checks (skipped without CUDA): balancers under bf16 and fp16 mixed precision through the module."""

import functools

import pytest
import pytorch_lightning as pl
import torch

from mtl.balancing import JacobianEngine

from mtl import MultiTaskModel, MultiTaskModule
from mtl.backbones import CNN
from mtl.balancing import FAMO, UW, PCGrad, UPGrad
from mtl.data import MultiDigitsDataModule

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize(
    "make,space",
    [(PCGrad, "params"), (UPGrad, "params"), (UPGrad, "representation"), (UW, "params"), (FAMO, "params")],
)
def test_bf16_balancers_train_on_gpu(make, space):
    acc = {p: train_once(make, space, p) for p in ("32-true", "bf16-mixed", "16-mixed")}
    assert acc["32-true"] > 0.3  # chance is 0.1
    # mixed precision (bf16; fp16 with loss scaling) trains about as well as float32
    assert acc["bf16-mixed"] > acc["32-true"] - 0.1
    assert acc["16-mixed"] > acc["32-true"] - 0.1


def train_once(make, space, precision, accelerator="gpu"):
    dm = MultiDigitsDataModule(n_train=1536, n_val=128, n_test=128, batch_size=64)
    dm.setup()
    torch.manual_seed(0)
    model = MultiTaskModel(CNN(channels=[16, 32], pool_size=[1, 2]), dm.tasks)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = functools.partial(torch.optim.AdamW, lr=3e-3)
    module = MultiTaskModule(model, balancer=make(3), engine=JacobianEngine(space=space), optimizer=optimizer)
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, precision=precision, max_epochs=6, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    after = model.state_dict()
    assert all(torch.isfinite(v.float()).all() for v in after.values())
    assert not torch.equal(before["sharing.backbone.stages.0.conv.weight"].cpu(), after["sharing.backbone.stages.0.conv.weight"].cpu())
    return float(trainer.callback_metrics["val/left/acc"])
