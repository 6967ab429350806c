"""The GPU path in one run: throughput and framework overhead, bf16, torch.compile, host syncs.

Prepared for a GPU machine (``python scripts/bench_gpu.py``, a few minutes); ``--device cpu
--quick`` runs the same code on a CPU in seconds (that is how the test suite checks it). Prints
one JSON row per check:

- ``throughput``: images per second of a ResNet-18 backbone (3x32x32 inputs, batch 256, three
  10-class heads, AdamW, EW) trained by ``MultiTaskModule`` under a ``pl.Trainer`` and by a
  hand-written loop doing the same work (same model copy, batches, optimizer, per-task
  metrics), alternated epoch by epoch in one process; wall time with the device synchronised
  at epoch boundaries. ``ratio`` = framework / loop epoch time (median, min-max over epochs), at
  ``32-true`` and ``bf16-mixed``.
- ``mixed_precision``: UPGrad in the representation space and PCGrad in the parameter space
  under ``bf16-mixed`` train to finite losses and finite weights.
- ``compile``: ``torch.compile`` of the backbone, trained with EW and with UPGrad (representation
  space); ``ok`` or the error it raised.
- ``host_syncs``: per training step of EW and of UPGrad (representation space), the syncing
  operations the dispatcher sees (``mtl.syncs.HostSyncCounter``) and, on CUDA, the synchronising
  calls CUDA reports (``torch.cuda.set_sync_debug_mode``).
- ``deterministic_metrics``: the built-in metrics' updates under
  ``torch.use_deterministic_algorithms(True)`` (ok, or the error).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from mtl import MultiTaskModel, MultiTaskModule, Task  # noqa: E402
from mtl.backbones import ResNet  # noqa: E402
from mtl.balancing import PCGrad, UPGrad  # noqa: E402
from mtl.balancing.jacobian import JacobianEngine  # noqa: E402
from mtl.data.base import ArrayDataset, collate_batch  # noqa: E402
from mtl.train import quiet_lightning  # noqa: E402
from mtl.syncs import HostSyncCounter  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from bench_overhead import Alternate, HandWrittenLoop  # noqa: E402  (the same loop and alternation)

TASKS = ("a", "b", "c")


def make_loader(n: int, batch: int, size: int = 32) -> DataLoader:
    """Random images ``[n, 3, size, size]`` whose labels depend on them (so a model can learn)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g)
    pooled = x.mean(dim=(2, 3))
    labels = {t: ((pooled[:, i % 3] * (i + 2)).floor().long() % 10) for i, t in enumerate(TASKS)}
    return DataLoader(ArrayDataset(x, labels), batch_size=batch, shuffle=False, collate_fn=collate_batch,
                      pin_memory=torch.cuda.is_available())


def make_model(width: int) -> MultiTaskModel:
    torch.manual_seed(0)
    return MultiTaskModel(ResNet(input_shape=(3, 32, 32), depth=18, width=width), [Task(t, num_classes=10) for t in TASKS])


def _trainer(device: str, precision: str, epochs: int, steps: int | None = None, callbacks=()) -> pl.Trainer:
    return pl.Trainer(
        accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1, precision=precision,
        max_epochs=epochs, limit_train_batches=steps, limit_val_batches=0, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=list(callbacks),
    )


def throughput(device: str, precision: str, epochs: int, n: int, batch: int, width: int) -> dict:
    loader = make_loader(n, batch)
    model = make_model(width)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    timer = Alternate(HandWrittenLoop(copy.deepcopy(model), loader, device, precision), clock=time.perf_counter, sync=sync)
    module = MultiTaskModule(model, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))
    _trainer(device, precision, epochs + 1, callbacks=[timer]).fit(module, loader)
    fw, hw = timer.framework[1:], timer.hand[1:]  # the first epoch of each warms up
    ratios = [f / h for f, h in zip(fw, hw)]
    steps = timer.steps[0]
    images = steps * batch
    return {
        "check": "throughput", "precision": precision, "batch": batch, "width": width,
        "framework_images_per_s": round(images / statistics.median(fw), 1),
        "loop_images_per_s": round(images / statistics.median(hw), 1),
        "ratio": round(statistics.median(ratios), 3), "ratio_min": round(min(ratios), 3),
        "ratio_max": round(max(ratios), 3), "epochs": len(fw), "steps_per_epoch": steps,
    }


def _train_steps(device: str, precision: str, balancer, space: str, steps: int, compile_backbone: bool = False) -> dict:
    loader = make_loader(steps * 32, 32)
    model = make_model(16)
    if compile_backbone:
        model.backbone = torch.compile(model.backbone)
    module = MultiTaskModule(model, balancer=balancer, engine=JacobianEngine(space=space) if balancer is not None else None)
    trainer = _trainer(device, precision, 1, steps)
    trainer.fit(module, loader)
    loss = float(trainer.callback_metrics.get("train/loss", torch.tensor(float("nan"))))
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return {"train_loss": round(loss, 4), "finite": finite and loss == loss}


def mixed_precision(device: str, steps: int) -> dict:
    rows = {}
    for name, make, space in (("upgrad_representation", UPGrad, "representation"), ("pcgrad_params", PCGrad, "params")):
        rows[name] = _train_steps(device, "bf16-mixed", make(len(TASKS)), space, steps)
    return {"check": "mixed_precision", "precision": "bf16-mixed", **rows}


def compiled(device: str, steps: int) -> dict:
    rows = {}
    for name, balancer, space in (("ew", None, "params"), ("upgrad_representation", UPGrad(len(TASKS)), "representation")):
        try:
            rows[name] = {"status": "ok", **_train_steps(device, "32-true", balancer, space, steps, compile_backbone=True)}
        except Exception as err:  # the point of the check: say what fails, do not stop the others
            rows[name] = {"status": "error", "error": f"{type(err).__name__}: {str(err)[:300]}"}
    return {"check": "compile", **rows}


def host_syncs(device: str, steps: int) -> dict:
    """Per training step: the syncing operations the dispatcher sees (``mtl.syncs.HostSyncCounter``,
    any device) and, on CUDA, the synchronising calls CUDA reports."""
    rows = {}
    for name, balancer, space in (("ew", None, "params"), ("upgrad_representation", UPGrad(len(TASKS)), "representation")):
        loader = make_loader(steps * 32, 32)
        module = MultiTaskModule(make_model(16), balancer=balancer,
                                 engine=JacobianEngine(space=space) if balancer is not None else None)
        counter = SyncCounter(cuda=device.startswith("cuda"))
        trainer = _trainer(device, "32-true", 1, steps, callbacks=[counter])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, loader)
        row = {"dispatcher_syncs_per_step": round(counter.dispatch.total / max(counter.steps, 1), 2),
               "dispatcher_where": sorted(counter.dispatch.where)[:10]}
        if device.startswith("cuda"):
            syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
            row.update(cuda_syncs_per_step=round(len(syncs) / max(counter.steps, 1), 2),
                       cuda_where=sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})[:20])
        rows[name] = row
    return {"check": "host_syncs", **rows}


def deterministic_metrics(device: str) -> dict:
    """The built-in vector metrics' updates (``scatter_add_`` of integers) under
    ``torch.use_deterministic_algorithms(True)``: ok or the error."""
    rows = {}
    g = torch.Generator().manual_seed(0)
    batch = {
        "multiclass": (Task("m", num_classes=10), torch.randn(64, 10, generator=g), torch.randint(0, 10, (64,), generator=g)),
        "binary": (Task("b", kind="binary"), torch.randn(64, 1, generator=g), (torch.rand(64, generator=g) > 0.5).float()),
        "regression": (Task("r", kind="regression"), torch.randn(64, 1, generator=g), torch.randn(64, generator=g)),
    }
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for kind, (task, out, y) in batch.items():
            try:
                metrics = task.make_metrics().to(device)
                _, update, _ = task.loss_and_metric_inputs(out.to(device), y.to(device))
                metrics.update(*update)
                rows[kind] = {"status": "ok", **{k: round(float(v), 4) for k, v in metrics.compute().items()}}
            except Exception as err:  # report, do not stop the other checks
                rows[kind] = {"status": "error", "error": f"{type(err).__name__}: {str(err)[:300]}"}
    finally:
        torch.use_deterministic_algorithms(previous)
    return {"check": "deterministic_metrics", **rows}


class SyncCounter(pl.Callback):
    """Counts syncs in the training steps only (not setup or epoch ends): the dispatcher's count
    always, CUDA's sync warnings on CUDA."""

    def __init__(self, cuda: bool) -> None:
        self.steps, self.cuda = 0, cuda
        self.dispatch = HostSyncCounter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode("warn")
        self.dispatch.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.dispatch.__exit__(None, None, None)
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
        self.steps += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds on a CPU)")
    args = parser.parse_args(argv)
    quiet_lightning()
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    if args.quick:
        sizes = dict(epochs=2, n=64, batch=32, width=8)
        steps = 2
    else:
        sizes = dict(epochs=5, n=256 * 40, batch=256, width=64)
        steps = 20
    for precision in ("32-true", "bf16-mixed"):
        print(json.dumps(throughput(args.device, precision, **sizes)), flush=True)
    print(json.dumps(mixed_precision(args.device, steps)), flush=True)
    print(json.dumps(compiled(args.device, steps)), flush=True)
    print(json.dumps(host_syncs(args.device, steps)), flush=True)
    print(json.dumps(deterministic_metrics(args.device)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
