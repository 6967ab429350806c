"""DDP on CPU (2 processes, gloo): 2 processes x batch b end where 1 process x batch 2b does.

For EW (a loss weighting: DDP averages the gradients) and PCGrad, MGDA, UPGrad (aggregators: the
engine reduces the task Jacobian across ranks) in both Jacobian spaces. The two processes are
started once and train every case; each case is a fresh ``pl.Trainer(strategy="ddp")`` in them
(the processes come from ``torch.multiprocessing``, as torchrun would start them, so Lightning
launches nothing itself). They are forked where the platform allows it: a fork starts at once,
where a spawned process would spend most of this test importing torch and Lightning again.
"""

import functools
import os
import socket

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset

from mtl import MultiTaskModel, MultiTaskModule, Task
from mtl.backbones import MLP
from mtl.balancing import EW, MGDA, JacobianEngine, PCGrad, UPGrad

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

N, GLOBAL_BATCH, BATCHES = 64, 16, 4
BALANCERS = {
    "ew": lambda: EW(2),
    "pcgrad": lambda: PCGrad(2, seed=0),  # seeded: every rank draws the same task order
    "mgda": lambda: MGDA(2),
    "upgrad": lambda: UPGrad(2),
}
CASES = [(b, space) for b in BALANCERS for space in ("params", "representation")]


class Pairs(Dataset):
    def __init__(self, n=N):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 6, generator=g)
        self.a = (self.x[:, 0] > 0).long()
        self.b = self.x[:, 1] - self.x[:, 2]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], {"a": self.a[i], "b": self.b[i]}


def _model() -> MultiTaskModel:
    return MultiTaskModel(MLP(input_shape=(6,), hidden=[16, 8]), [Task("a", num_classes=2), Task("b", kind="regression")])


def train(devices: int, balancer: str, space: str, state: dict, rank: int = 0) -> dict:
    """Train ``BATCHES`` steps of global batch 16 on 1 process, or as rank ``rank`` of 2."""
    torch.manual_seed(0)
    model = _model()
    model.load_state_dict(state)
    module = MultiTaskModule(
        model, optimizer=functools.partial(torch.optim.SGD, lr=0.1), balancer=BALANCERS[balancer](),
        engine=JacobianEngine(space=space),
    )
    # One fixed order of the examples; global batch k is positions 16k..16k+15 of it. One process
    # reads it in order; rank r of two reads positions r, r+2, r+4, ... (8 per batch), so the two
    # ranks' batches k together are exactly the single process's batch k.
    order = torch.randperm(N, generator=torch.Generator().manual_seed(0)).tolist()
    sampler = order if devices == 1 else order[rank::devices]
    loader = DataLoader(Pairs(), batch_size=GLOBAL_BATCH // devices, sampler=sampler)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_epochs=1,
        limit_train_batches=BATCHES, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False,
    )
    trainer.fit(module, loader)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank: int, port: int, init: dict, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    results = {case: train(2, *case, init, rank=rank) for case in CASES}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    init = _model().state_dict()
    out = str(tmp_path_factory.mktemp("ddp") / "multi.pt")
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_worker, args=(_free_port(), init, out), nprocs=2, join=True, start_method=method)
    multi = torch.load(out, weights_only=True)
    single = {case: train(1, *case, init) for case in CASES}
    return init, single, multi


@pytest.mark.parametrize("balancer,space", CASES)
def test_two_processes_match_one_with_twice_the_batch(trained, balancer, space):
    init, single, multi = trained
    one, two = single[(balancer, space)], multi[(balancer, space)]
    assert any(not torch.equal(one[k], init[k]) for k in init)  # it trained
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-5), (k, (one[k] - two[k]).abs().max())
