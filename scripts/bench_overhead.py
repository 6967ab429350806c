"""Framework overhead: MultiTaskModule under a pl.Trainer against a hand-written loop doing the same work.

Both train the same model (CNN backbone, three heads: multidigits ``left``, ``right``, ``sum``, all
labelled), on the same batches (batch 64), with the same AdamW, updating the same per-task metrics
(accuracy and macro F1, ``Task.make_metrics``) and per-task mean losses, with equal weighting.
The framework's steps run inside one ``trainer.fit``; before each of its steps a callback runs one
step of the hand-written loop (on its own copy of the model and its own batches), so the two
alternate step by step in one process and see the same machine load (``--per-epoch`` alternates
whole epochs instead). A framework step is timed from its start to the next one's, so everything
Lightning does between steps and at the epoch's end and start (hooks, metrics, logging) is
counted; the loop's epoch-end metric reduction is counted on its side. Times are CPU time
(``time.process_time``) with one torch thread; validation is off. The first epoch of each is a
warm-up and is not counted.

The same measurement is then made for a minimal LightningModule doing the same work
(:class:`MinimalLightning`): Lightning's own loop cost, the floor for any LightningModule.

    python scripts/bench_overhead.py            # 8 timed epochs of 94 steps each
    python scripts/bench_overhead.py --quick    # 3 timed epochs of 20 steps

Prints one JSON object: ``ratio`` (median over epochs of framework / loop epoch time), its
``ratio_min``/``ratio_max`` spread, ``framework_ms`` and ``loop_ms`` (median per step), steps and
epochs, and the same for the minimal LightningModule under ``lightning``.
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

from mtl import MultiTaskModel, MultiTaskModule  # noqa: E402
from mtl.backbones import CNN  # noqa: E402
from mtl.data import MultiDigitsDataModule  # noqa: E402
from mtl.metrics.rows import WeightedMean  # noqa: E402


def make_data(n_train: int) -> MultiDigitsDataModule:
    dm = MultiDigitsDataModule(n_train=n_train, n_val=64, n_test=64, batch_size=64, label_budget=None, seed=0)
    dm.setup()
    return dm


def make_model(dm: MultiDigitsDataModule) -> MultiTaskModel:
    torch.manual_seed(0)
    return MultiTaskModel(CNN(input_shape=dm.input_shape, channels=[32, 64], pool_size=[1, 2]), dm.tasks, head_hidden=[128])


class HandWrittenLoop:
    """The same epoch without the framework: forward (under bf16 autocast for ``bf16-mixed``),
    per-task losses and metrics from one label mask, backward, step (``scripts/bench_gpu.py`` runs
    it on a GPU)."""

    def __init__(self, model: MultiTaskModel, loader, device: str = "cpu", precision: str = "32-true") -> None:
        self.model = model.to(device)
        self.loader, self.device, self.precision = loader, device, precision
        self.tasks = dict(model.tasks)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.metrics = {t: task.make_metrics().to(device) for t, task in self.tasks.items()}
        self.losses = {t: WeightedMean().to(device) for t in self.tasks}

    def start_epoch(self) -> None:
        self.model.train()
        self._batches = iter(self.loader)

    def step(self) -> bool:
        """One training step on the loop's next batch; False at the end of the epoch."""
        try:
            x, ys = next(self._batches)
        except StopIteration:
            return False
        x = x.to(self.device, non_blocking=True)
        ys = {t: y.to(self.device, non_blocking=True) for t, y in ys.items()}
        with torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.precision == "bf16-mixed"):
            outputs = self.model(x)
        total = 0.0
        for t, y in ys.items():
            loss, update, count = self.tasks[t].loss_and_metric_inputs(outputs[t].float(), y)
            self.metrics[t].update(*update)
            self.losses[t].update(loss.detach(), count)
            total = total + loss
        self.optimizer.zero_grad()
        total.backward()
        self.optimizer.step()
        return True

    def end_epoch(self) -> None:
        """The epoch-end reduction the framework logs."""
        for t in self.tasks:
            self.metrics[t].compute()
            self.losses[t].compute()
            self.metrics[t].reset()
            self.losses[t].reset()

    def epoch(self) -> int:
        self.start_epoch()
        steps = 0
        while self.step():
            steps += 1
        self.end_epoch()
        return steps


class Alternate(pl.Callback):
    """Alternates the hand-written loop with the framework, in one process, and times both.

    ``per_step=True`` (what the CPU benchmark uses): before each framework step, one hand-written step on the
    loop's own next batch. A framework step is timed from its start to the next one's, so
    everything Lightning does between steps, and at the epoch's end and the next one's start
    (metrics, logging, hooks), is counted; the loop's epoch start and epoch-end reduction are
    counted on its side. Alternating step by step means both see the same machine load, which on a
    shared machine drifts within an epoch. ``per_step=False``: one whole hand-written epoch before
    each framework epoch (on a GPU, so that neither contender is synchronised every step).

    ``clock`` is CPU time by default; on a GPU, wall time with ``sync`` (the device synchronised)
    called before each reading. ``framework`` and ``hand`` hold one total per epoch.
    """

    def __init__(self, loop: HandWrittenLoop, clock=time.process_time, sync=None, per_step: bool = False) -> None:
        self.loop = loop
        self.clock, self.sync, self.per_step = clock, sync, per_step
        self.framework: list[float] = []
        self.hand: list[float] = []
        self.steps: list[int] = []
        self._start: float | None = None
        self._fw = self._hw = 0.0

    def _now(self) -> float:
        if self.sync is not None:
            self.sync()
        return self.clock()

    def _close_framework_interval(self) -> None:
        if self._start is not None:
            self._fw += self._now() - self._start

    def _close_epoch(self) -> None:
        self._close_framework_interval()
        if self._start is not None:
            self.framework.append(self._fw)
            self.hand.append(self._hw)
        self._fw = self._hw = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._close_epoch()
        start = self._now()
        if self.per_step:
            self.loop.start_epoch()
            self.steps.append(0)
        else:
            self.steps.append(self.loop.epoch())
        self._hw += self._now() - start
        self._start = self._now()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if not self.per_step:
            return
        self._close_framework_interval()
        start = self._now()
        if self.loop.step():
            self.steps[-1] += 1
        self._hw += self._now() - start
        self._start = self._now()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.per_step:
            return
        self._close_framework_interval()
        start = self._now()
        while self.loop.step():  # the loop's epoch is never shorter than the framework's
            self.steps[-1] += 1
        self.loop.end_epoch()
        self._hw += self._now() - start
        self._start = self._now()

    def on_train_end(self, trainer, pl_module) -> None:
        self._close_epoch()


class MinimalLightning(pl.LightningModule):
    """The least a LightningModule does for the same work (a peer: Lightning's own loop cost)."""

    def __init__(self, model: MultiTaskModel) -> None:
        super().__init__()
        self.model = model
        self.tasks = dict(model.tasks)
        self.metrics = torch.nn.ModuleDict({t: task.make_metrics() for t, task in self.tasks.items()})
        self.losses = torch.nn.ModuleDict({t: WeightedMean() for t in self.tasks})

    def training_step(self, batch, batch_idx):
        x, ys = batch
        outputs = self.model(x)
        total = 0.0
        for t, y in ys.items():
            loss, update, count = self.tasks[t].loss_and_metric_inputs(outputs[t], y)
            self.metrics[t].update(*update)
            self.losses[t].update(loss.detach(), count)
            total = total + loss
        return total

    def on_train_epoch_end(self) -> None:
        for t in self.tasks:
            self.log(f"train/{t}/loss", self.losses[t].compute())
            self.log_dict({f"train/{t}/{k}": v for k, v in self.metrics[t].compute().items()})
            self.metrics[t].reset()
            self.losses[t].reset()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def run(epochs: int, n_train: int, contender: str = "framework", per_step: bool = True) -> dict:
    """``contender``: ``framework`` (MultiTaskModule) or ``lightning`` (:class:`MinimalLightning`)."""
    dm = make_data(n_train)
    model = make_model(dm)
    loop = HandWrittenLoop(copy.deepcopy(model), dm.train_dataloader())
    if contender == "framework":
        module = MultiTaskModule(model, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))
    else:
        module = MinimalLightning(model)
    timer = Alternate(loop, per_step=per_step)
    trainer = pl.Trainer(
        max_epochs=epochs + 1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=dm)
    fw, hw, steps = timer.framework[1:], timer.hand[1:], timer.steps[0]  # the first epoch warms up
    ratios = [f / h for f, h in zip(fw, hw)]
    return {
        "ratio": round(statistics.median(ratios), 3),
        "ratio_min": round(min(ratios), 3),
        "ratio_max": round(max(ratios), 3),
        "framework_ms": round(1000 * statistics.median(fw) / steps, 3),
        "loop_ms": round(1000 * statistics.median(hw) / steps, 3),
        "steps_per_epoch": steps,
        "epochs": len(fw),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 timed epochs of 20 steps")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--per-epoch", action="store_true", help="alternate whole epochs instead of steps")
    parser.add_argument("--no-peer", action="store_true", help="skip the minimal LightningModule")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    epochs = args.epochs or (3 if args.quick else 8)
    n_train = 20 * 64 if args.quick else 6000
    out = run(epochs, n_train, "framework", per_step=not args.per_epoch)
    if not args.no_peer:
        peer = run(epochs, n_train, "lightning", per_step=not args.per_epoch)
        out["lightning"] = {k: peer[k] for k in ("ratio", "ratio_min", "ratio_max", "framework_ms", "loop_ms")}
    out.update(alternation="epoch" if args.per_epoch else "step", threads=torch.get_num_threads(), torch=torch.__version__)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
