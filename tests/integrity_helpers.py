"""Callbacks the integrity tests put into real runs (``+callbacks.<name>._target_=integrity_helpers...``)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytorch_lightning as pl


class KillAt(pl.Callback):
    """SIGKILLs its own process at the start of epoch ``e`` of stage ``s``, for each ``"s:e"`` of ``at``.

    Each point kills once: a marker file in the run directory (``killed-<s>-<e>``) records that it
    was reached, so the same command run again goes past it. Epoch 0 of a stage is "between
    stages": the previous stage has finished and this one has trained no step.
    """

    def __init__(self, at: list[str]) -> None:
        self.at = [str(a) for a in at]

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage_dir = Path(trainer.default_root_dir)
        stage, epoch = stage_dir.name, trainer.current_epoch
        marker = stage_dir.parents[1] / f"killed-{stage}-{epoch}"
        if f"{stage}:{epoch}" in self.at and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)


class Crash(pl.Callback):
    """Raises at the start of epoch ``epoch`` of stage ``stage`` (after the previous epoch's
    checkpoint), once per run directory (marker ``crashed-<stage>-<epoch>``), like :class:`KillAt`."""

    def __init__(self, stage: str, epoch: int = 1) -> None:
        self.stage, self.epoch = stage, epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage_dir = Path(trainer.default_root_dir)
        marker = stage_dir.parents[1] / f"crashed-{self.stage}-{self.epoch}"
        if stage_dir.name == self.stage and trainer.current_epoch == self.epoch and not marker.exists():
            marker.touch()
            raise RuntimeError("simulated crash")


class LastEpochs(pl.Callback):
    """Records, at the start of every epoch, the epoch stored in the stage's last.ckpt."""

    seen: list = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import torch

        last = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        LastEpochs.seen.append(torch.load(last, weights_only=True)["epoch"] if last.is_file() else None)
