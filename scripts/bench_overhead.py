"""Framework overhead: MultiTaskModule under a pl.Trainer against a hand-written loop doing the same work.

Both train the same model (CNN backbone, three heads: multidigits ``left``, ``right``, ``sum``, all
labelled), on the same batches (batch 64), with the same AdamW, updating the same per-task
torchmetrics (accuracy and macro F1) and per-task mean losses, with equal weighting. The
framework's epochs run inside one ``trainer.fit``; before each of its epochs a callback runs one
epoch of the hand-written loop on its own copy of the model, so the two alternate in one process
and see the same machine load. A framework epoch is timed from its start to the next one's, so its
epoch-end hooks (metrics, logging) are counted, as the loop's epoch-end metric reduction is. Times are CPU time (``time.process_time``) with one torch thread;
validation is off. The first epoch of each is a warm-up and is not counted.

    python scripts/bench_overhead.py            # 8 timed epochs of 94 steps each
    python scripts/bench_overhead.py --quick    # 3 timed epochs of 20 steps

Prints one JSON object: ``ratio`` (median over epochs of framework / loop epoch time), its
``ratio_min``/``ratio_max`` spread, ``framework_ms`` and ``loop_ms`` (median per step), steps and
epochs.
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
import torchmetrics  # noqa: E402

from mtl import MultiTaskModel, MultiTaskModule  # noqa: E402
from mtl.backbones import CNN  # noqa: E402
from mtl.data import MultiDigitsDataModule  # noqa: E402


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
        self.losses = {t: torchmetrics.MeanMetric().to(device) for t in self.tasks}

    def epoch(self) -> int:
        self.model.train()
        steps = 0
        autocast = torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.precision == "bf16-mixed")
        for x, ys in self.loader:
            x = x.to(self.device, non_blocking=True)
            ys = {t: y.to(self.device, non_blocking=True) for t, y in ys.items()}
            with autocast:
                outputs = self.model(x)
            total = 0.0
            for t, y in ys.items():
                loss, (pred, target) = self.tasks[t].loss_and_metric_inputs(outputs[t].float(), y)
                self.metrics[t].update(pred, target)
                self.losses[t].update(loss.detach(), pred.shape[0])
                total = total + loss
            self.optimizer.zero_grad()
            total.backward()
            self.optimizer.step()
            steps += 1
        for t in self.tasks:  # the epoch-end reduction the framework logs
            self.metrics[t].compute()
            self.losses[t].compute()
            self.metrics[t].reset()
            self.losses[t].reset()
        return steps


class Alternate(pl.Callback):
    """Runs and times one hand-written epoch before each framework epoch, and times each framework
    epoch from its start to the next one's (so its epoch-end hooks and logging are counted).

    ``clock`` is CPU time by default; on a GPU, wall time with ``sync`` (the device synchronised)
    called before each reading.
    """

    def __init__(self, loop: HandWrittenLoop, clock=time.process_time, sync=None) -> None:
        self.loop = loop
        self.clock, self.sync = clock, sync
        self.framework: list[float] = []
        self.hand: list[float] = []
        self.steps: list[int] = []
        self._start: float | None = None

    def _now(self) -> float:
        if self.sync is not None:
            self.sync()
        return self.clock()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self._start is not None:
            self.framework.append(self._now() - self._start)
        start = self._now()
        self.steps.append(self.loop.epoch())
        self.hand.append(self._now() - start)
        self._start = self._now()

    def on_train_end(self, trainer, pl_module) -> None:
        self.framework.append(self._now() - self._start)


def run(epochs: int, n_train: int) -> dict:
    dm = make_data(n_train)
    model = make_model(dm)
    loop = HandWrittenLoop(copy.deepcopy(model), dm.train_dataloader())
    module = MultiTaskModule(model, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))
    timer = Alternate(loop)
    trainer = pl.Trainer(
        max_epochs=epochs + 1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=dm)
    fw, hw, steps = timer.framework[1:], timer.hand[1:], timer.steps[0]
    ratios = [f / h for f, h in zip(fw, hw)]
    return {
        "ratio": round(statistics.median(ratios), 3),
        "ratio_min": round(min(ratios), 3),
        "ratio_max": round(max(ratios), 3),
        "framework_ms": round(1000 * statistics.median(fw) / steps, 3),
        "loop_ms": round(1000 * statistics.median(hw) / steps, 3),
        "steps_per_epoch": steps,
        "epochs": len(fw),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 timed epochs of 20 steps")
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    epochs = args.epochs or (3 if args.quick else 8)
    print(json.dumps(run(epochs, 20 * 64 if args.quick else 6000)))


if __name__ == "__main__":
    main()
