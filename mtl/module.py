"""MultiTaskModule: the thin Lightning glue around a MultiTaskModel.

It computes every task's loss on the examples labelled for it, hands the losses to the balancer,
logs per-task losses and metrics, and builds the optimizer. Everything else is a part it is
given: the model (``mtl.model``), the balancer and its Jacobian engine (``mtl.balancing``), the
fine-tuning policy and the transfer terms (``mtl.transfer``).

Reading order: construction, forward and losses, the training step (loss weighting, or gradient
aggregation through :func:`~mtl.balancing.balanced_backward`), evaluation steps, epoch hooks and
logging, optimizer, checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Mapping, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from mtl.balancing.aggregators.base import GradientAggregator
from mtl.balancing.backward import balanced_backward
from mtl.balancing.gramian import GramianEngine
from mtl.balancing.jacobian import JacobianEngine
from mtl.balancing.weightings.base import LossWeighting
from mtl.metrics.rows import WeightedMean
from mtl.model import MultiTaskModel
from mtl.tasks import Task
from mtl.transfer.alpha import AlphaSchedule, mixing_weights
from mtl.transfer.finetuning import FineTuning
from mtl.transfer.policies import FineTunePolicy
from mtl.transfer.terms import ForwardRecord, TransferTerms

#: pairwise gradient cosines are logged up to this many tasks
MAX_COSINE_TASKS = 8

SPLITS = ("train", "val", "test")


class EpochMeans:
    """Means over an epoch's training steps, accumulated on the tensors' device.

    Each step adds its detached scalars and vectors (one tensor add each, no host sync and no
    ``self.log`` call); the epoch end logs the means once. ``self.log`` costs the better part of a
    millisecond per call on a CPU, which per step and per task dominated the framework's overhead.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, value: Tensor) -> None:
        value = value.detach()
        self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.counts[name] = self.counts.get(name, 0) + 1

    def pop(self) -> dict[str, Tensor]:
        """The means since the last call, then reset."""
        means = {k: v / self.counts[k] for k, v in self.sums.items()}
        self.sums, self.counts = {}, {}
        return means


class MultiTaskModule(pl.LightningModule):
    """Trains a :class:`~mtl.model.MultiTaskModel` on batches ``(x, {task: y})``.

    Batches may also be ``{dataset: (x, {task: y})}`` (several datasets in one step, see
    :class:`~mtl.data.CombinedDataModule`); each task's loss then uses its own dataset's batch.

    Args:
        model: the network.
        tasks: the target tasks this module trains and evaluates (names or Tasks; default: all of
            the model's tasks).
        source_tasks: auxiliary source tasks of a combined stage, trained alongside.
        alpha: the source weight, a float or an :class:`~mtl.transfer.alpha.AlphaSchedule`: the loss
            is ``alpha * mean(w_s L_s) + (1 - alpha) * mean(w_t L_t)`` (only with source tasks).
        balancer: a :class:`~mtl.balancing.LossWeighting` (one backward of the weighted sum;
            automatic optimization) or a :class:`~mtl.balancing.GradientAggregator` (per-task
            gradients combined into one update; manual optimization), built for the module's tasks
            in order (targets, then sources). It acts on the statically weighted losses
            ``w_t L_t``. None: the static sum.
        engine: how an aggregator gets its task gradients: a :class:`~mtl.balancing.JacobianEngine`
            (space, method) or a :class:`~mtl.balancing.GramianEngine` (weights from ``J J^T``
            computed by chunks, never holding ``J``).
        optimizer: ``callable(params) -> Optimizer`` such as a Hydra ``_partial_`` optimizer;
            default ``AdamW(lr=1e-3)``.
        scheduler: ``callable(optimizer) -> LRScheduler`` (stepped each epoch), or None.
        policy: the :class:`~mtl.transfer.policies.FineTunePolicy` (None: everything trains).
        transfer: the stage's :class:`~mtl.transfer.TransferTerms` (fine-tuning regularizers,
            distillation), bound here to the starting model.
        monitor: name of the metric that selects the best checkpoint (logged by this module).
        gradient_clip_val: gradient norm clipping for aggregators (Lightning clips only under
            automatic optimization).
    """

    def __init__(
        self,
        model: MultiTaskModel,
        tasks: Iterable[str | Task] | None = None,
        source_tasks: Sequence[str] = (),
        alpha: float | AlphaSchedule = 0.5,
        balancer: LossWeighting | GradientAggregator | None = None,
        engine: JacobianEngine | GramianEngine | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        policy: FineTunePolicy | None = None,
        transfer: TransferTerms | None = None,
        monitor: str = "val/loss",
        gradient_clip_val: float | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.target_tasks = [t.name if isinstance(t, Task) else str(t) for t in (tasks or model.task_names)]
        self.source_tasks = [str(s) for s in source_tasks]
        self.task_names = self.target_tasks + [s for s in self.source_tasks if s not in self.target_tasks]
        missing = [t for t in self.task_names if t not in model.tasks]
        if missing:
            raise ValueError(f"The model has no head for task(s) {missing}; it has {model.task_names}.")
        self.tasks: dict[str, Task] = {t: model.tasks[t] for t in self.task_names}
        self.alpha = alpha if isinstance(alpha, AlphaSchedule) else AlphaSchedule(float(alpha))
        self.loss_weights = self._mixing(self.alpha.start)
        if balancer is not None and not isinstance(balancer, (LossWeighting, GradientAggregator)):
            raise TypeError(f"balancer must be a LossWeighting or a GradientAggregator, got {type(balancer).__name__}.")
        if balancer is not None and balancer.num_tasks != len(self.task_names):
            raise ValueError(
                f"The balancer was built for {balancer.num_tasks} tasks but the stage trains "
                f"{len(self.task_names)}: {self.task_names}."
            )
        self.balancer = balancer
        self.engine = engine or JacobianEngine()
        if isinstance(self.engine, GramianEngine):
            if isinstance(balancer, GradientAggregator) and not balancer.gramian_based:
                raise ValueError(
                    f"{type(balancer).__name__} does not update along a weighting of the task gradients that "
                    f"depends on their Gramian only, so it cannot run under balancer.engine=GramianEngine; "
                    f"use balancer/engine=jacobian."
                )
            self.engine.attach(model.sharing)  # its linear layers take the per-layer route
        self.automatic_optimization = not isinstance(balancer, GradientAggregator)
        self.optimizer_factory = optimizer or functools.partial(torch.optim.AdamW, lr=1e-3)
        self.scheduler_factory = scheduler
        self.finetuning = FineTuning(model, policy)
        self.transfer = transfer
        self.distill_tasks = transfer.distill_tasks if transfer is not None else []
        missing = [t for t in self.distill_tasks if t not in model.tasks]
        if missing:
            raise ValueError(f"Distillation task(s) {missing} have no head in the model ({model.task_names}).")
        if transfer is not None:
            transfer.bind(model, self.target_tasks)
        self.monitor = monitor
        self.gradient_clip_val = gradient_clip_val
        #: ``{task: loss}`` (detached) of the last training step
        self.step_losses: dict[str, Tensor] = {}
        self.epoch_means = EpochMeans()
        self.metrics = nn.ModuleDict(
            {
                f"{split}_{kind}": nn.ModuleDict(
                    {t: task.make_metrics() if kind == "metrics" else WeightedMean() for t, task in self.tasks.items()}
                )
                for split in SPLITS
                for kind in ("metrics", "loss")
            }
        )

    def _mixing(self, alpha: float) -> dict[str, float]:
        weights = {t: task.weight for t, task in self.tasks.items()}
        return mixing_weights(weights, self.target_tasks, self.source_tasks, alpha)

    # ------------------------------------------------------------------ forward and losses
    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        return self.model(x, tasks)

    def _groups(self, batch) -> list[tuple[Tensor, dict[str, Tensor]]]:
        """Normalise a batch to a list of ``(x, {task: y})`` restricted to this module's tasks."""
        groups = [b for b in batch.values() if b is not None] if isinstance(batch, Mapping) else [batch]
        out = []
        for x, ys in groups:
            ys = {t: y for t, y in ys.items() if t in self.tasks}
            if ys:
                out.append((x, ys))
        return out

    def task_losses(self, batch, split: str | None, records: list[ForwardRecord] | None = None) -> dict[str, Tensor]:
        """``{task: scalar loss}`` for this module's tasks present in the batch.

        Updates the ``split``'s metrics (none when ``split`` is None). When ``records`` is a list,
        every forward pass is appended to it (with the distillation tasks' outputs too).
        """
        losses: dict[str, Tensor] = {}
        groups = self._groups(batch)
        if split is not None and self._check_batches():
            self._check_labels(groups)
        for x, ys in groups:
            names = list(ys) + ([t for t in self.distill_tasks if t not in ys] if records is not None else [])
            outputs, rep = self.model.forward_with_representation(x, names)
            if records is not None:
                records.append(ForwardRecord(x, outputs, rep))
            for t, y in ys.items():
                task = self.tasks[t]
                losses[t], update, count = task.loss_and_metric_inputs(outputs[t], y, metrics=split is not None)
                if update is not None:
                    self.metrics[f"{split}_metrics"][t].update(*update)
                    self.metrics[f"{split}_loss"][t].update(losses[t].detach(), count)
        return losses

    def _check_labels(self, groups: list[tuple[Tensor, dict[str, Tensor]]]) -> None:
        """Raise, naming the task and the label, if a batch holds a label out of range; one host
        read for every task of the batch."""
        checks = [(self.tasks[t], y) for _, ys in groups for t, y in ys.items()]
        if checks and bool(torch.stack([task.invalid_targets(y) for task, y in checks]).any()):
            for task, y in checks:
                task.check_targets(y)

    def _check_batches(self) -> bool:
        """Whether to check each batch's labels: not when the trainer's DataModule checked every
        split at setup (this package's in-memory ones do), so the step makes no host syncs for it.
        Otherwise one host read per step covers every task."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return not getattr(datamodule, "targets_checked", False)

    def loss_vector(self, losses: Mapping[str, Tensor]) -> Tensor:
        """``[T]`` statically weighted losses ``w_t L_t`` in the module's task order (0 if absent)."""
        zero = next(iter(losses.values())).new_zeros(())
        return torch.stack([self.loss_weights[t] * losses[t] if t in losses else zero for t in self.task_names])

    def _transfer_term(self, records: list[ForwardRecord]) -> Tensor | None:
        term = self.transfer(records) if self.transfer is not None else None
        if term is not None:
            self.epoch_means.add("transfer_terms", term)
        return term

    # ------------------------------------------------------------------ training step
    def training_step(self, batch, batch_idx: int) -> Tensor:
        records: list[ForwardRecord] = []
        losses = self.task_losses(batch, "train", records)
        self.step_losses = {t: loss.detach() for t, loss in losses.items()}  # read by callbacks (guards)
        if not self.automatic_optimization:
            return self._aggregated_step(losses, records)
        if self.balancer is None:
            total = sum(self.loss_weights[t] * loss for t, loss in losses.items())
        else:
            shared = self._last_shared_parameters() if self.balancer.needs_shared_parameters else None
            total, weights = self.balancer.weighted_loss(self.loss_vector(losses), shared_parameters=shared)
            if weights is not None:
                self.epoch_means.add("weights", weights)
        for extra in (self.model.sharing.regularization(), self._transfer_term(records)):
            if extra is not None:
                total = total + extra
        self.epoch_means.add("loss", total)
        return total

    def _aggregated_step(self, losses: Mapping[str, Tensor], records: list[ForwardRecord]) -> Tensor:
        """One step of a gradient aggregator around :func:`~mtl.balancing.balanced_backward`."""
        optimizer = self.optimizers()
        if self.engine.space == "representation" and any(r.representation is None for r in records):
            raise ValueError(
                f"balancer.engine.space=representation needs a shared representation, but "
                f"{type(self.model.sharing).__name__} has none; use balancer.engine.space=params."
            )
        vec = self.loss_vector(losses)
        shared = [p for p in self.model.shared_parameters() if p.requires_grad]
        shared_ids = {id(p) for p in shared}
        own = [p for p in self.model.parameters() if p.requires_grad and id(p) not in shared_ids]
        extra = self._transfer_term(records)  # regularizers act outside the balancing
        optimizer.zero_grad()
        stats = balanced_backward(
            vec,
            self.balancer,
            shared,
            own,
            engine=self.engine,
            representations=[r.representation for r in records],
            loss_scale=self._loss_scale(),
            task_term=self.model.sharing.regularization(),  # acts on task-specific parts (gates) only
            extra_term=extra,
        )
        if stats.weights is not None:
            self.epoch_means.add("weights", stats.weights)
        self.epoch_means.add("grad_norms", stats.grad_norms)
        if len(self.task_names) <= MAX_COSINE_TASKS:
            self.epoch_means.add("cosines", stats.cosines)
        if self.gradient_clip_val:
            torch.nn.utils.clip_grad_norm_([p for p in self.parameters() if p.grad is not None], self.gradient_clip_val)
        self.finetuning.step(optimizer, self.current_epoch)
        total = vec.detach().sum()
        self.epoch_means.add("loss", total)
        return total

    def _last_shared_parameters(self) -> list[Tensor]:
        """Parameters of the backbone's last stage (GradNorm's "last shared layer")."""
        return [p for p in self.model.backbone.stages[-1].parameters() if p.requires_grad]

    def _loss_scale(self) -> Tensor | None:
        """The fp16 GradScaler's scale as a tensor (no host sync), or None (fp32, bf16)."""
        trainer = getattr(self, "_trainer", None)
        scaler = getattr(trainer.precision_plugin, "scaler", None) if trainer is not None else None
        if scaler is None:
            return None
        if self.gradient_clip_val:
            raise ValueError(
                "Gradient clipping with fp16 mixed precision and a gradient aggregator is not "
                "supported; use trainer.precision=bf16-mixed or unset trainer.gradient_clip_val."
            )
        device = self.device
        scaler.scale(torch.zeros((), device=device))  # initialises the scale on the first step
        get = getattr(scaler, "_get_scale_async", None)
        scale = get() if callable(get) else torch.tensor(scaler.get_scale(), device=device)
        return scale.to(device).float()

    def on_train_start(self) -> None:
        # An aggregator reduces across ranks itself (the Jacobian, then the gradients it writes),
        # so DDP's gradient hooks, which expect one ordinary backward, are switched off.
        wrapped = getattr(self.trainer.strategy, "model", None)
        if not self.automatic_optimization and isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            wrapped.require_backward_grad_sync = False

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.finetuning.set_modes(self.current_epoch)  # frozen blocks keep their statistics

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if isinstance(self.balancer, LossWeighting) and self.balancer.needs_losses_after_step:
            with torch.no_grad():  # the losses of the same batch after the step (FAMO)
                self.balancer.after_optimizer_step(self.loss_vector(self.task_losses(batch, None)))

    # ------------------------------------------------------------------ evaluation steps
    def validation_step(self, batch, batch_idx: int) -> None:
        self.task_losses(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self.task_losses(batch, "test")

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """``{task: head output}`` for the module's tasks (a batch is ``x`` or ``(x, labels)``)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.model(x, self.task_names)

    # ------------------------------------------------------------------ epoch hooks and logging
    def on_train_epoch_start(self) -> None:
        if self.source_tasks:
            alpha = self.alpha.at(self.current_epoch, self.trainer.max_epochs)
            self.loss_weights = self._mixing(alpha)
            self.log("train/alpha", float(alpha), on_step=False, on_epoch=True)

    def on_train_epoch_end(self) -> None:
        self._log_step_means()
        self._log_epoch("train")
        if isinstance(self.balancer, LossWeighting):
            self.balancer.on_train_epoch_end()
        if not self.automatic_optimization:
            # under manual optimization Lightning leaves epoch-interval schedulers to the module
            scheduler = self.lr_schedulers()
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                value = self.trainer.callback_metrics.get(self.monitor)
                if value is not None:
                    scheduler.step(value)
            elif scheduler is not None:
                scheduler.step()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def _log_epoch(self, split: str) -> None:
        target_losses = []
        for t in self.task_names:
            loss_metric, collection = self.metrics[f"{split}_loss"][t], self.metrics[f"{split}_metrics"][t]
            if loss_metric.update_count == 0:
                continue
            # no labelled example of the task in the split (on any rank): nothing to report
            if not self.trainer.strategy.reduce(loss_metric.weight.clone(), reduce_op="sum") > 0:
                loss_metric.reset()
                collection.reset()
                continue
            loss = loss_metric.compute()
            self.log(f"{split}/{t}/loss", loss)
            if t in self.target_tasks:
                target_losses.append(loss)
            primary = split == "val" and t in self.target_tasks
            for name, value in collection.compute().items():
                self.log(f"{split}/{t}/{name}", value, prog_bar=primary and name == self.tasks[t].metric)
            loss_metric.reset()
            collection.reset()
        if target_losses and split != "train":
            self.log(f"{split}/loss", torch.stack(target_losses).mean(), prog_bar=(split == "val"))

    def _log_step_means(self) -> None:
        """The epoch's means of the training loss, task weights, gradient norms and cosines."""
        means = self.epoch_means.pop()
        sync = self.trainer.world_size > 1 if self._trainer is not None else False
        if "loss" in means:
            self.log("train/loss", means["loss"], prog_bar=True, sync_dist=sync)
        if "transfer_terms" in means:
            self.log("train/transfer_terms", means["transfer_terms"], sync_dist=sync)
        for key, prefix in (("weights", "train/weight"), ("grad_norms", "train/grad_norm")):
            for t, value in zip(self.task_names, means.get(key, ())):
                self.log(f"{prefix}/{t}", value, sync_dist=sync)
        if "cosines" in means:
            cos = means["cosines"]
            for i, a in enumerate(self.task_names):
                for j in range(i + 1, len(self.task_names)):
                    self.log(f"train/cos/{a}/{self.task_names[j]}", cos[i, j], sync_dist=sync)

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        balancer_params = list(self.balancer.parameters()) if self.balancer is not None else []
        decay = not (self.transfer is not None and self.transfer.replaces_weight_decay)
        optimizer = self.optimizer_factory(self.finetuning.parameter_groups(balancer_params, weight_decay=decay))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        config = {"scheduler": scheduler, "interval": "epoch"}
        if self.automatic_optimization:  # under manual optimization the module steps it (and reads the monitor) itself
            config["monitor"] = self.monitor
        return {"optimizer": optimizer, "lr_scheduler": config}

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        self.finetuning.step(optimizer, self.current_epoch, optimizer_closure)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, **kwargs: Any) -> "MultiTaskModule":  # type: ignore[override]
        """Rebuild the module of a checkpoint written by ``mtl-train`` from what it stores (its tasks
        and model configs): :func:`mtl.load`. A checkpoint of your own code needs its model first:
        build it and use ``mtl.transfer.loading.load_weights``."""
        from mtl.eval import load_module

        if kwargs:
            raise TypeError(f"MultiTaskModule.load_from_checkpoint takes no hyper-parameters, got {sorted(kwargs)}.")
        return load_module(checkpoint_path, str(map_location or "cpu"))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mtl"] = {
            "tasks": {t: dataclasses.asdict(task) for t, task in self.model.tasks.items()},
            "target_tasks": self.target_tasks,
            "source_tasks": self.source_tasks,
        }
