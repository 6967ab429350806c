"""MultiTaskModule: the thin Lightning glue around a MultiTaskModel.

It computes every task's loss on the examples labelled for it, combines them, logs per-task losses
and metrics, and builds the optimizer. The math lives in ``mtl.tasks``, ``mtl.model`` and
``mtl.balancing``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Mapping, Sequence

import pytorch_lightning as pl
import torch
import torchmetrics
from torch import Tensor, nn

from mtl.model import MultiTaskModel
from mtl.tasks import Task

SPLITS = ("train", "val", "test")


def mixing_weights(
    tasks: Mapping[str, Task], targets: Sequence[str], sources: Sequence[str] = (), alpha: float = 0.5
) -> dict[str, float]:
    """Static loss weights of a stage.

    Without source tasks every target's weight is its ``Task.weight`` (the loss is
    ``sum_t w_t L_t``). With source tasks (a combined stage) the loss is
    ``alpha * mean_s(w_s L_s) + (1 - alpha) * mean_t(w_t L_t)``.
    """
    if not sources:
        return {t: float(tasks[t].weight) for t in targets}
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    w = {t: (1.0 - alpha) * tasks[t].weight / len(targets) for t in targets}
    w.update({s: alpha * tasks[s].weight / len(sources) for s in sources})
    return w


class MultiTaskModule(pl.LightningModule):
    """Trains a :class:`~mtl.model.MultiTaskModel` on batches ``(x, {task: y})``.

    Batches may also be ``{dataset: (x, {task: y})}`` (several datasets in one step, see
    :class:`~mtl.data.CombinedDataModule`); each task's loss then uses its own dataset's batch.

    Args:
        model: the network.
        tasks: the tasks this module trains and evaluates (names or Tasks; default: all of the
            model's tasks).
        optimizer: ``callable(params) -> Optimizer`` such as a Hydra ``_partial_`` optimizer;
            default ``AdamW(lr=1e-3)``.
        scheduler: ``callable(optimizer) -> LRScheduler`` (stepped each epoch), or None.
        lr: if set, overrides the optimizer's learning rate.
        source_tasks: auxiliary source tasks of a combined stage (trained, weighted by ``alpha``).
        alpha: weight of the source tasks: ``alpha * mean(L_source) + (1 - alpha) * mean(L_target)``.
        frozen_epochs: the backbone is frozen (learning rate 0, normalisation statistics fixed)
            during the first ``frozen_epochs`` epochs; use a large number to freeze it throughout.
        backbone_lr_scale: multiplies the learning rate of the backbone when it is trainable.
        monitor: name of the metric that selects the best checkpoint (logged by this module).
    """

    def __init__(
        self,
        model: MultiTaskModel,
        tasks: Iterable[str | Task] | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        lr: float | None = None,
        source_tasks: Sequence[str] = (),
        alpha: float = 0.5,
        frozen_epochs: int = 0,
        backbone_lr_scale: float = 1.0,
        monitor: str = "val/loss",
    ) -> None:
        super().__init__()
        self.model = model
        names = [t.name if isinstance(t, Task) else str(t) for t in (tasks or model.task_names)]
        self.target_tasks = names
        self.source_tasks = [str(s) for s in source_tasks]
        all_tasks = self.target_tasks + [s for s in self.source_tasks if s not in self.target_tasks]
        missing = [t for t in all_tasks if t not in model.tasks]
        if missing:
            raise ValueError(f"The model has no head for task(s) {missing}; it has {model.task_names}.")
        self.task_names = all_tasks
        self.tasks: dict[str, Task] = {t: model.tasks[t] for t in all_tasks}
        self.loss_weights = mixing_weights(self.tasks, self.target_tasks, self.source_tasks, alpha)
        self.alpha = float(alpha)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.lr = lr
        self.frozen_epochs = int(frozen_epochs)
        self.backbone_lr_scale = float(backbone_lr_scale)
        self.monitor = monitor
        self.metrics = nn.ModuleDict(
            {
                f"{split}_{kind}": nn.ModuleDict(
                    {
                        t: (task.make_metrics() if kind == "metrics" else torchmetrics.MeanMetric())
                        for t, task in self.tasks.items()
                    }
                )
                for split in SPLITS
                for kind in ("metrics", "loss")
            }
        )

    # ------------------------------------------------------------------ forward and losses
    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        return self.model(x, tasks)

    def _groups(self, batch) -> list[tuple[Tensor, dict[str, Tensor]]]:
        """Normalise a batch to a list of ``(x, {task: y})`` restricted to this module's tasks."""
        if isinstance(batch, Mapping):
            groups = [b for b in batch.values() if b is not None]
        else:
            groups = [batch]
        out = []
        for x, ys in groups:
            ys = {t: y for t, y in ys.items() if t in self.tasks}
            if ys:
                out.append((x, ys))
        return out

    def task_losses(self, batch, split: str) -> dict[str, Tensor]:
        """``{task: scalar loss}`` for this module's tasks present in the batch; updates metrics."""
        losses: dict[str, Tensor] = {}
        for x, ys in self._groups(batch):
            outputs = self.model(x, list(ys))
            for t, y in ys.items():
                task = self.tasks[t]
                task.check_targets(y)
                losses[t] = task.loss(outputs[t], y)
                pair = task.metric_inputs(outputs[t], y)
                if pair is not None:
                    self.metrics[f"{split}_metrics"][t].update(*pair)
                    self.metrics[f"{split}_loss"][t].update(losses[t].detach(), pair[0].shape[0])
        return losses

    def combine(self, losses: Mapping[str, Tensor]) -> Tensor:
        """The stage's static combination ``sum_t w_t L_t`` of the task losses."""
        return sum(self.loss_weights[t] * loss for t, loss in losses.items())

    # ------------------------------------------------------------------ steps
    def training_step(self, batch, batch_idx: int) -> Tensor:
        losses = self.task_losses(batch, "train")
        total = self.combine(losses)
        self.log("train/loss", total.detach(), on_step=False, on_epoch=True, prog_bar=True)
        return total

    def validation_step(self, batch, batch_idx: int) -> None:
        self.task_losses(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self.task_losses(batch, "test")

    def _log_epoch(self, split: str) -> None:
        target_losses = []
        for t in self.task_names:
            loss_metric = self.metrics[f"{split}_loss"][t]
            collection = self.metrics[f"{split}_metrics"][t]
            if loss_metric.update_count == 0:
                continue
            loss = loss_metric.compute()
            self.log(f"{split}/{t}/loss", loss)
            if t in self.target_tasks:
                target_losses.append(loss)
            for name, value in collection.compute().items():
                self.log(f"{split}/{t}/{name}", value, prog_bar=(split == "val" and t in self.target_tasks and name == self.tasks[t].metric))
            loss_metric.reset()
            collection.reset()
        if target_losses and split != "train":
            self.log(f"{split}/loss", torch.stack(target_losses).mean(), prog_bar=(split == "val"))

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    # ------------------------------------------------------------------ freezing
    def backbone_frozen(self) -> bool:
        """Whether the backbone is frozen in the current epoch."""
        return self.current_epoch < self.frozen_epochs

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # frozen normalisation statistics: the backbone runs in eval mode while frozen
        if self.backbone_frozen():
            self.model.backbone.eval()
        elif not self.model.backbone.training:
            self.model.backbone.train()

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        # Freezing by a learning rate of 0 (rather than toggling requires_grad) keeps the set of
        # trainable parameters fixed, which DDP and checkpoint resume both rely on. The scheduler's
        # learning rates are left untouched and restored right after the step.
        inner = getattr(optimizer, "optimizer", optimizer)
        frozen = [g for g in inner.param_groups if g.get("name") == "backbone"] if self.backbone_frozen() else []
        saved = [g["lr"] for g in frozen]
        for g in frozen:
            g["lr"] = 0.0
        try:
            optimizer.step(closure=optimizer_closure)
        finally:
            for g, lr in zip(frozen, saved):
                g["lr"] = lr

    # ------------------------------------------------------------------ optimizer
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Named parameter groups: ``backbone``, ``sharing`` (the rest of the shared structure), ``heads``."""
        backbone = [p for p in self.model.backbone.parameters() if p.requires_grad]
        ids = {id(p) for p in backbone}
        sharing = [p for p in self.model.sharing.parameters() if p.requires_grad and id(p) not in ids]
        heads = [p for p in self.model.heads.parameters() if p.requires_grad]
        groups = [
            {"name": "backbone", "params": backbone, "lr_scale": self.backbone_lr_scale},
            {"name": "sharing", "params": sharing, "lr_scale": 1.0},
            {"name": "heads", "params": heads, "lr_scale": 1.0},
        ]
        return [g for g in groups if g["params"]]

    def configure_optimizers(self):
        factory = self.optimizer_factory or functools.partial(torch.optim.AdamW, lr=1e-3)
        if self.lr is not None:
            factory = functools.partial(factory, lr=self.lr)
        optimizer = factory(self.parameter_groups())
        for g in optimizer.param_groups:  # groups carry their scale; the optimizer set the base lr
            g["lr"] = g["lr"] * g["lr_scale"]
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch", "monitor": self.monitor},
        }

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mtl"] = {
            "tasks": {t: dataclasses.asdict(task) for t, task in self.model.tasks.items()},
            "target_tasks": self.target_tasks,
            "source_tasks": self.source_tasks,
        }
