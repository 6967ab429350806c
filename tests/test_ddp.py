"""DDP on CPU (2 processes, gloo): a gradient aggregator's update equals the single-process one."""

import functools

import pytest
import pytorch_lightning as pl
import torch

from mtl.balancing import JacobianEngine
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from mtl import MultiTaskModel, MultiTaskModule, Task
from mtl.backbones import MLP
from mtl.balancing import UPGrad

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


class Pairs(Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 6, generator=g)
        self.a = (self.x[:, 0] > 0).long()
        self.b = self.x[:, 1] - self.x[:, 2]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], {"a": self.a[i], "b": self.b[i]}


def train(devices: int, space: str, state: dict, batches: int = 4) -> dict:
    torch.manual_seed(0)
    tasks = [Task("a", num_classes=2), Task("b", kind="regression")]
    model = MultiTaskModel(MLP(input_shape=(6,), hidden=[16, 8]), tasks)
    model.load_state_dict(state)
    module = MultiTaskModule(
        model, optimizer=functools.partial(torch.optim.SGD, lr=0.1), balancer=UPGrad(2), engine=JacobianEngine(space=space)
    )
    # The global batch is 16 either way: 16 on one process, or 8 on each of two. Lightning's
    # DistributedSampler shuffles with seed 0 and deals indices to the ranks in turn, so global
    # batch k is positions 16k..16k+15 of that permutation; the single process reads it in order.
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0)).tolist()
    loader = DataLoader(Pairs(), batch_size=16 // devices, sampler=order if devices == 1 else None)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", max_epochs=1,
        limit_train_batches=batches, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("space", ["params", "representation"])
def test_ddp_aggregator_matches_single_process(space):
    torch.manual_seed(0)
    init = MultiTaskModel(MLP(input_shape=(6,), hidden=[16, 8]), [Task("a", num_classes=2), Task("b", kind="regression")]).state_dict()
    single = train(1, space, init)
    multi = train(2, space, init)
    assert any(not torch.equal(single[k], init[k]) for k in init)  # it trained
    for k in single:
        assert torch.allclose(single[k], multi[k], atol=1e-5), k
