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

from mtl.balancing.aggregators.base import GradientAggregator
from mtl.balancing.jacobian import (
    all_reduce_gradients,
    gather_representation_jacobian,
    reduce_jacobian,
    representation_backward,
    task_jacobian,
    unscale,
    write_gradient,
)
from mtl.balancing.weightings.base import LossWeighting
from mtl.model import MultiTaskModel
from mtl.tasks import Task
from mtl.transfer.alpha import alpha_at
from mtl.transfer.policies import FineTunePolicy, LinearProbe, ProbeThenFull, backbone_blocks
from mtl.transfer.regularizers import bss, delta, l2sp, lwf_distillation, snapshot

#: ``frozen_epochs`` at or above this freezes the backbone for the whole stage
ALWAYS_FROZEN = 10**9

SPACES = ("params", "representation")
#: pairwise gradient cosines are logged up to this many tasks
MAX_COSINE_TASKS = 8

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
        balancer: objective sharing: a :class:`~mtl.balancing.LossWeighting` (one backward of the
            weighted sum; automatic optimization) or a :class:`~mtl.balancing.GradientAggregator`
            (per-task gradients combined into one update; manual optimization), built for the
            module's tasks in order (targets, then sources). It acts on the statically weighted
            losses ``w_t L_t`` (so a combined stage's ``alpha`` mix still applies). None: the
            static sum.
        balancer_space: ``params`` (task gradients over the shared parameters) or
            ``representation`` (over the shared representation; cheaper) for aggregators.
        jacobian_method: ``auto``, ``loop`` or ``batched`` (see :mod:`mtl.balancing.jacobian`).
        chunk_size: rows per batched Jacobian call (None: all tasks at once).
        gradient_clip_val: gradient norm clipping for aggregators (Lightning clips automatically
            only under automatic optimization, so the entry point hands the trainer's value here).
        policy: a :class:`~mtl.transfer.policies.FineTunePolicy` giving each backbone block's
            learning-rate multiplier per epoch (0: frozen, with its normalisation statistics
            fixed). None: ``frozen_epochs`` and ``backbone_lr_scale`` (probe, then all at a scale).
        regularizers: ``{"l2sp": alpha, "bss": weight, "delta": weight}`` (0 or absent: off).
        regularizer_options: ``l2sp_beta`` (weight of the heads' L2 under L2-SP, default 0.01) and
            ``bss_k`` (singular values shrunk, default 1).
        alpha_schedule, alpha_end: move ``alpha`` from its value to ``alpha_end`` across the stage
            (``constant``, ``linear``, ``cosine``, ``step``), recomputed each epoch.
        teacher: a frozen model whose outputs on ``distill_tasks`` are distilled with
            ``distill_weight`` and ``temperature`` (LwF, Born-Again generations).
        source_model: a frozen copy of the starting model whose stage features DELTA follows.
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
        balancer: LossWeighting | GradientAggregator | None = None,
        balancer_space: str = "params",
        jacobian_method: str = "auto",
        chunk_size: int | None = None,
        gradient_clip_val: float | None = None,
        policy: FineTunePolicy | None = None,
        regularizers: Mapping[str, float] | None = None,
        regularizer_options: Mapping[str, Any] | None = None,
        alpha_schedule: str = "constant",
        alpha_end: float | None = None,
        teacher: nn.Module | None = None,
        distill_tasks: Sequence[str] = (),
        distill_weight: float = 1.0,
        temperature: float = 2.0,
        source_model: nn.Module | None = None,
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
        if policy is None:
            if int(frozen_epochs) >= ALWAYS_FROZEN:
                policy = LinearProbe()
            else:
                policy = ProbeThenFull(probe_epochs=int(frozen_epochs), backbone_lr_scale=float(backbone_lr_scale))
        self.policy = policy
        self.blocks = backbone_blocks(model.backbone)
        self.alpha_schedule = alpha_schedule
        self.alpha_start = float(alpha)
        self.alpha_end = float(alpha if alpha_end is None else alpha_end)
        self.regularizers = {k: float(v) for k, v in (regularizers or {}).items() if v and k != "lwf"}
        unknown = sorted(set(self.regularizers) - {"l2sp", "bss", "delta"})
        if unknown:
            raise ValueError(f"regularizers: unknown {unknown}; choose among l2sp, bss, delta (and lwf in a stage).")
        self.regularizer_options = dict(regularizer_options or {})
        if "l2sp" in self.regularizers:
            # the starting weights, as buffers so that a resumed stage keeps pulling towards them
            self._l2sp_params = [p for p in model.shared_parameters() if p.requires_grad]
            for i, t in enumerate(snapshot(self._l2sp_params)):
                self.register_buffer(f"l2sp_start_{i}", t)
        if "delta" in self.regularizers and source_model is None:
            raise ValueError("regularizers.delta needs the source model (the runner passes a frozen copy).")
        self.source_model = source_model
        self.teacher = teacher
        self.distill_tasks = [str(t) for t in distill_tasks] if teacher is not None else []
        missing = [t for t in self.distill_tasks if t not in model.tasks]
        if missing:
            raise ValueError(f"distill_tasks {missing} have no head in the model ({model.task_names}).")
        self.distill_weight = float(distill_weight)
        self.temperature = float(temperature)
        for frozen in (teacher, source_model):
            if frozen is not None:
                frozen.requires_grad_(False)
        self.monitor = monitor
        if balancer is not None and not isinstance(balancer, (LossWeighting, GradientAggregator)):
            raise TypeError(
                f"balancer must be a LossWeighting or a GradientAggregator, got {type(balancer).__name__}."
            )
        if balancer is not None and getattr(balancer, "num_tasks", len(all_tasks)) != len(all_tasks):
            raise ValueError(
                f"The balancer was built for {balancer.num_tasks} tasks but the stage trains "
                f"{len(all_tasks)}: {all_tasks}."
            )
        if balancer_space not in SPACES:
            raise ValueError(f"balancer.space must be one of {SPACES}, got '{balancer_space}'.")
        self.balancer = balancer
        self.balancer_space = balancer_space
        self.jacobian_method = jacobian_method
        self.chunk_size = chunk_size
        self.gradient_clip_val = gradient_clip_val
        self.automatic_optimization = not isinstance(balancer, GradientAggregator)
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

    def task_losses(
        self,
        batch,
        split: str | None,
        representations: list[Tensor] | None = None,
        records: list[tuple[Tensor, dict[str, Tensor], Tensor | None]] | None = None,
    ) -> dict[str, Tensor]:
        """``{task: scalar loss}`` for this module's tasks present in the batch.

        Updates the ``split``'s metrics (none when ``split`` is None). When ``representations`` is
        a list, the shared representation of every forward pass is appended to it; when
        ``records`` is a list, ``(x, outputs, representation)`` of every forward pass is appended,
        with the outputs of the distillation tasks too.
        """
        losses: dict[str, Tensor] = {}
        for x, ys in self._groups(batch):
            names = list(ys)
            if records is not None:
                names += [t for t in self.distill_tasks if t not in ys]
            outputs, rep = self.model.forward_with_representation(x, names)
            if representations is not None:
                representations.append(rep)
            if records is not None:
                records.append((x, outputs, rep))
            for t, y in ys.items():
                task = self.tasks[t]
                if split is not None:
                    task.check_targets(y)
                losses[t] = task.loss(outputs[t], y)
                pair = task.metric_inputs(outputs[t], y) if split is not None else None
                if pair is not None:
                    self.metrics[f"{split}_metrics"][t].update(*pair)
                    self.metrics[f"{split}_loss"][t].update(losses[t].detach(), pair[0].shape[0])
        return losses

    def loss_vector(self, losses: Mapping[str, Tensor]) -> Tensor:
        """``[T]`` statically weighted losses ``w_t L_t`` in the module's task order (0 if absent)."""
        ref = next(iter(losses.values()))
        zero = ref.new_zeros(())
        return torch.stack([self.loss_weights[t] * losses[t] if t in losses else zero for t in self.task_names])

    def combine(self, losses: Mapping[str, Tensor]) -> Tensor:
        """The stage's static combination ``sum_t w_t L_t`` of the task losses."""
        return sum(self.loss_weights[t] * loss for t, loss in losses.items())

    # ------------------------------------------------------------------ steps
    def training_step(self, batch, batch_idx: int) -> Tensor:
        if not self.automatic_optimization:
            return self._aggregated_step(batch)
        records: list = []
        losses = self.task_losses(batch, "train", records=records)
        if self.balancer is None:
            total = self.combine(losses)
        else:
            vec = self.loss_vector(losses)
            shared = self._last_shared_parameters() if self.balancer.needs_shared_parameters else None
            total, weights = self.balancer.weighted_loss(vec, shared_parameters=shared)
            self._log_weights(weights)
        reg = self._sharing_regularization()
        if reg is not None:
            total = total + reg
        extra = self.transfer_terms(records)
        if extra is not None:
            total = total + extra
        self.log("train/loss", total.detach(), on_step=False, on_epoch=True, prog_bar=True)
        return total

    # ------------------------------------------------------------------ transfer terms
    def on_fit_start(self) -> None:
        self._captured: list[Tensor] = []
        if "delta" in self.regularizers and not getattr(self, "_delta_hooks", None):
            # DELTA compares this model's stage outputs with the source model's: record them
            self._delta_hooks = [
                stage.register_forward_hook(lambda _m, _i, out: self._captured.append(out) if self.training else None)
                for stage in self.model.backbone.stages
            ]

    def transfer_terms(self, records: list[tuple[Tensor, dict[str, Tensor], Tensor | None]]) -> Tensor | None:
        """Fine-tuning regularizers and distillation for the forward passes in ``records``.

        L2-SP (distance of the shared weights to the starting ones, plus the heads' L2), BSS (the
        smallest singular values of the shared representation), DELTA (distance of the backbone's
        stage outputs to the source model's) and distillation of the teacher's outputs on
        ``distill_tasks`` (LwF, Born-Again). None when none is configured.
        """
        terms: list[Tensor] = []
        if "l2sp" in self.regularizers:
            start = [getattr(self, f"l2sp_start_{i}") for i in range(len(self._l2sp_params))]
            new = [p for t in self.target_tasks for p in self.model.heads[t].parameters()]
            beta = float(self.regularizer_options.get("l2sp_beta", 0.01))
            terms.append(l2sp(self._l2sp_params, start, alpha=self.regularizers["l2sp"], new_params=new, beta=beta))
        if "bss" in self.regularizers:
            k = int(self.regularizer_options.get("bss_k", 1))
            for _, _, rep in records:
                if rep is not None:
                    terms.append(bss(rep.flatten(1).float(), k=k, weight=self.regularizers["bss"]))
        if "delta" in self.regularizers:
            captured, self._captured = self._captured, []
            n = len(self.model.backbone.stages)
            for g, (x, _, _) in enumerate(records):
                with torch.no_grad():
                    source = self.source_model.backbone.forward_stages(x)
                terms.append(delta(captured[g * n : (g + 1) * n], source, weight=self.regularizers["delta"]))
        if self.teacher is not None and self.distill_tasks and self.distill_weight > 0:
            for x, outputs, _ in records:
                with torch.no_grad():
                    target = self.teacher(x, self.distill_tasks)
                kd = [
                    lwf_distillation(outputs[t], target[t], self.model.tasks[t].kind, temperature=self.temperature)
                    for t in self.distill_tasks
                ]
                terms.append(self.distill_weight * torch.stack(kd).mean())
        if not terms:
            return None
        total = torch.stack(terms).sum()
        self.log("train/transfer_terms", total.detach(), on_step=False, on_epoch=True)
        return total

    def _sharing_regularization(self) -> Tensor | None:
        """The sharing structure's own loss term (DSelect-k's gate regularizer), if it has one."""
        fn = getattr(self.model.sharing, "regularization", None)
        return fn() if callable(fn) else None

    # ------------------------------------------------------------------ objective sharing
    def _last_shared_parameters(self) -> list[Tensor]:
        """Parameters of the backbone's last stage (GradNorm's "last shared layer")."""
        return [p for p in self.model.backbone.stages[-1].parameters() if p.requires_grad]

    def _log_weights(self, weights: Tensor | None) -> None:
        if weights is None:
            return
        for t, w in zip(self.task_names, weights.detach()):
            self.log(f"train/weight/{t}", w, on_step=False, on_epoch=True)

    def _log_gradients(self, J: Tensor) -> None:
        """Per-task gradient norms and pairwise cosines (from the Jacobian, no host sync)."""
        Jf = J.detach().float()
        norms = Jf.norm(dim=1)
        for t, n in zip(self.task_names, norms):
            self.log(f"train/grad_norm/{t}", n, on_step=False, on_epoch=True)
        if len(self.task_names) <= MAX_COSINE_TASKS:
            unit = Jf / norms.clamp_min(1e-12).unsqueeze(1)
            cos = unit @ unit.T
            for i, a in enumerate(self.task_names):
                for j in range(i + 1, len(self.task_names)):
                    self.log(f"train/cos/{a}/{self.task_names[j]}", cos[i, j], on_step=False, on_epoch=True)

    def _loss_scaler(self):
        """The fp16 GradScaler of Lightning's precision plugin, or None (fp32, bf16)."""
        trainer = getattr(self, "_trainer", None)
        return getattr(trainer.precision_plugin, "scaler", None) if trainer is not None else None

    def _aggregated_step(self, batch) -> Tensor:
        """One step of a gradient aggregator: Jacobian, aggregation, per-task head gradients.

        Under fp16 mixed precision the losses are multiplied by the GradScaler's scale before
        differentiating; the aggregator sees the unscaled float32 Jacobian, the gradients are
        written scaled, and the scaler's step unscales them and skips the step after an overflow
        (an overflowing Jacobian poisons the update with inf so that the scaler sees it).
        """
        optimizer = self.optimizers()
        reps: list[Tensor] = []
        records: list = []
        losses = self.task_losses(batch, "train", reps, records=records)
        vec = self.loss_vector(losses)
        shared = [p for p in self.model.shared_parameters() if p.requires_grad]
        if self.balancer_space == "representation":
            if any(r is None for r in reps):
                raise ValueError(
                    f"balancer.space=representation needs a shared representation, but "
                    f"{type(self.model.sharing).__name__} has none; use balancer.space=params."
                )
            inputs = reps
        else:
            inputs = shared
        scaler = self._loss_scaler()
        scale = None
        if scaler is not None:
            if self.gradient_clip_val:
                raise ValueError(
                    "Gradient clipping with fp16 mixed precision and a gradient aggregator is not "
                    "supported; use trainer.precision=bf16-mixed or unset trainer.gradient_clip_val."
                )
            scaled = scaler.scale(vec)  # also initialises the scale on the first step
            get = getattr(scaler, "_get_scale_async", None)  # a tensor: no host sync
            scale = get() if callable(get) else torch.tensor(scaler.get_scale(), device=vec.device)
            scale = scale.to(vec.device).float()
        else:
            scaled = vec
        J = task_jacobian(scaled, inputs, method=self.jacobian_method, chunk_size=self.chunk_size)
        finite = None
        if scale is not None:
            J, finite = unscale(J, scale, zero_nonfinite=True)
        if self.balancer_space == "params":
            J = reduce_jacobian(J)
            g = self.balancer(J, vec.detach())
        else:
            J_global, mine = gather_representation_jacobian(J)
            g = self.balancer(J_global, vec.detach())[mine]
            J = J_global
        if scale is not None:
            g = torch.where(finite, g * scale, torch.full_like(g, float("inf")))
        self._log_weights(self.balancer.last_weights)
        self._log_gradients(J)
        optimizer.zero_grad()
        shared_ids = {id(p) for p in shared}
        own = [p for p in self.model.parameters() if p.requires_grad and id(p) not in shared_ids]
        # heads (and task-specific sharing parts) get their own task's gradient: d(sum_t L_t)/d theta_t
        if own:
            own_loss = scaled.sum()
            reg = self._sharing_regularization()  # acts on task-specific parts (gates) only
            if reg is not None and reg.requires_grad:
                own_loss = own_loss + (reg * scale if scale is not None else reg)
            torch.autograd.backward(own_loss, inputs=own, retain_graph=self.balancer_space == "representation")
            all_reduce_gradients(own, average=True)  # what DDP would do; its own hooks are off
        if self.balancer_space == "representation":
            sizes = [r.numel() for r in reps]
            for rep, piece in zip(reps, torch.split(g, sizes)):
                representation_backward(rep, piece, retain_graph=rep is not reps[-1])
            all_reduce_gradients(shared)
        else:
            write_gradient(shared, g)
        extra = self.transfer_terms(records)
        if extra is not None:  # regularizers act outside the balancing: their gradient is added
            params = [p for p in self.model.parameters() if p.requires_grad]
            torch.autograd.backward(extra * scale if scale is not None else extra, inputs=params)
            all_reduce_gradients(params, average=True)
        if self.gradient_clip_val:
            torch.nn.utils.clip_grad_norm_([p for p in self.parameters() if p.grad is not None], self.gradient_clip_val)
        self._step_with_freeze(optimizer, None)
        total = vec.detach().sum()
        self.log("train/loss", total, on_step=False, on_epoch=True, prog_bar=True)
        return total

    def on_train_start(self) -> None:
        # An aggregator reduces across ranks itself (the Jacobian, then the gradients it writes),
        # so DDP's gradient hooks, which expect one ordinary backward, are switched off.
        wrapped = getattr(self.trainer.strategy, "model", None)
        if not self.automatic_optimization and isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            wrapped.require_backward_grad_sync = False

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if isinstance(self.balancer, LossWeighting) and self.balancer.needs_losses_after_step:
            with torch.no_grad():  # the losses of the same batch after the step (FAMO)
                self.balancer.after_optimizer_step(self.loss_vector(self.task_losses(batch, None)))

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
        if isinstance(self.balancer, LossWeighting):
            self.balancer.on_train_epoch_end()
        if not self.automatic_optimization:
            # under manual optimization Lightning leaves epoch-interval schedulers to the module
            scheduler = self.lr_schedulers()
            if scheduler is not None:
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    value = self.trainer.callback_metrics.get(self.monitor)
                    if value is not None:
                        scheduler.step(value)
                else:
                    scheduler.step()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    # ------------------------------------------------------------------ fine-tuning policy
    def lr_multipliers(self, epoch: int | None = None) -> dict[str, float]:
        """Learning-rate multiplier of every named parameter group at ``epoch`` (default: now).

        ``backbone.<i>`` are the backbone's blocks (its stages, bottom first), set by the policy;
        0 means frozen.
        """
        epoch = self.current_epoch if epoch is None else epoch
        mults = self.policy.multipliers(epoch, len(self.blocks))
        out = {f"backbone.{i}": m for i, m in enumerate(mults)}
        out["heads"] = self.policy.head_multiplier(epoch)
        return out

    def backbone_frozen(self) -> bool:
        """Whether every backbone block is frozen in the current epoch."""
        return all(self.policy.frozen_blocks(self.current_epoch, len(self.blocks)))

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # frozen normalisation statistics: a frozen block runs in eval mode
        frozen = self.policy.frozen_blocks(self.current_epoch, len(self.blocks))
        for stage, is_frozen in zip(self.model.backbone.stages, frozen):
            if stage.training == is_frozen:
                stage.train(not is_frozen)
        for other in (self.teacher, self.source_model):
            if other is not None and other.training:
                other.eval()

    def on_train_epoch_start(self) -> None:
        if self.source_tasks and self.alpha_schedule != "constant":
            total = max(1, (self.trainer.max_epochs or 1) - 1)
            alpha = alpha_at(self.alpha_schedule, min(1.0, self.current_epoch / total), self.alpha_start, self.alpha_end)
            self.loss_weights = mixing_weights(self.tasks, self.target_tasks, self.source_tasks, alpha)
            self.alpha = alpha
        if self.source_tasks:
            self.log("train/alpha", float(self.alpha), on_step=False, on_epoch=True)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        self._step_with_freeze(optimizer, optimizer_closure)

    def _step_with_freeze(self, optimizer, closure) -> None:
        # The policy acts through each group's learning rate for this one step (0 freezes), rather
        # than by toggling requires_grad: the set of trainable parameters stays fixed, which DDP
        # and checkpoint resume both rely on. The scheduler's learning rates are restored after.
        inner = getattr(optimizer, "optimizer", optimizer)
        mults = self.lr_multipliers()
        groups = [g for g in inner.param_groups if mults.get(g.get("name"), 1.0) != 1.0]
        saved = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = g["lr"] * mults[g["name"]]
        try:
            optimizer.step(closure=closure)
        finally:
            for g, lr in zip(groups, saved):
                g["lr"] = lr

    # ------------------------------------------------------------------ optimizer
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Named parameter groups: ``backbone.<i>`` (one per backbone block), ``sharing`` (the rest of
        the shared structure), ``heads`` and ``balancer`` (learned task weights, not decayed)."""
        blocks = [[p for p in block if p.requires_grad] for block in self.blocks]
        ids = {id(p) for block in blocks for p in block}
        sharing = [p for p in self.model.sharing.parameters() if p.requires_grad and id(p) not in ids]
        heads = [p for p in self.model.heads.parameters() if p.requires_grad]
        balancer = [p for p in self.balancer.parameters() if p.requires_grad] if self.balancer is not None else []
        groups = [{"name": f"backbone.{i}", "params": block} for i, block in enumerate(blocks)]
        groups += [
            {"name": "sharing", "params": sharing},
            {"name": "heads", "params": heads},
            {"name": "balancer", "params": balancer, "weight_decay": 0.0},
        ]
        if "l2sp" in self.regularizers:  # L2-SP replaces weight decay on the shared and head weights
            for g in groups[:-1]:
                g["weight_decay"] = 0.0
        return [g for g in groups if g["params"]]

    def configure_optimizers(self):
        factory = self.optimizer_factory or functools.partial(torch.optim.AdamW, lr=1e-3)
        if self.lr is not None:
            factory = functools.partial(factory, lr=self.lr)
        optimizer = factory(self.parameter_groups())
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
