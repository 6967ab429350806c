"""Tasks: what a head predicts, how it is scored, and how missing labels are marked.

A :class:`Task` is plain data. Everything task-specific elsewhere in the package (the size of a head,
its loss, its metrics, which way is better) is derived from it, so a data config that declares its
tasks is the single source of truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor

KINDS = ("multiclass", "binary", "multilabel", "regression")

#: Primary metric of each kind (directions: :attr:`Task.metric_directions`).
PRIMARY_METRIC = {"multiclass": "acc", "binary": "auroc", "multilabel": "auroc", "regression": "mae"}


@dataclass
class Task:
    """One prediction target.

    Args:
        name: unique name; used in logs (``val/<name>/acc``), configs and ``{name: y}`` label dicts.
        kind: ``multiclass`` (integer labels in ``[0, num_classes)``), ``binary`` (0/1 labels, one
            logit), ``multilabel`` (``num_classes`` 0/1 columns) or ``regression`` (``out_features``
            real columns).
        num_classes: number of classes (multiclass, multilabel).
        out_features: number of regression outputs (default 1).
        weight: static weight of this task's loss.
        ignore_index: label value that marks a missing class label (multiclass). Missing binary,
            multilabel and regression labels are marked with NaN.
        metric: name of the primary metric (defaults to the kind's: acc, auroc, mae).
    """

    name: str
    kind: str = "multiclass"
    num_classes: int | None = None
    out_features: int | None = None
    weight: float = 1.0
    ignore_index: int = -100
    metric: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Task '{self.name}': kind must be one of {KINDS}, got '{self.kind}'.")
        if self.kind in ("multiclass", "multilabel"):
            if self.num_classes is None or int(self.num_classes) < 2:
                raise ValueError(
                    f"Task '{self.name}' of kind '{self.kind}' needs num_classes >= 2, "
                    f"got {self.num_classes}."
                )
            self.num_classes = int(self.num_classes)
        if self.kind == "regression":
            self.out_features = int(self.out_features or 1)
        if self.metric is None:
            self.metric = PRIMARY_METRIC[self.kind]
        if self.metric not in self.metric_names:
            raise ValueError(
                f"Task '{self.name}': metric '{self.metric}' is not one of {self.metric_names}."
            )

    # ----------------------------------------------------------------------------------- shape
    @property
    def output_size(self) -> int:
        """Width of this task's head output."""
        if self.kind == "multiclass":
            return int(self.num_classes)
        if self.kind == "binary":
            return 1
        if self.kind == "multilabel":
            return int(self.num_classes)
        return int(self.out_features)

    @property
    def metric_names(self) -> tuple[str, ...]:
        if self.kind == "multiclass":
            return ("acc", "f1")
        if self.kind in ("binary", "multilabel"):
            return ("acc", "auroc")
        return ("mae", "rmse")

    @property
    def metric_directions(self) -> dict[str, bool]:
        """``{metric: higher_is_better}`` for every metric of this task and its ``loss``."""
        up = self.kind != "regression"
        return {**{name: up for name in self.metric_names}, "loss": False}

    # ----------------------------------------------------------------------------------- labels
    def label_mask(self, target: Tensor) -> Tensor:
        """Boolean mask ``[B]`` of the examples that carry a label for this task."""
        if self.kind == "multiclass":
            return target != self.ignore_index
        target = target.reshape(target.shape[0], -1)
        return ~torch.isnan(target).any(dim=1)

    def check_targets(self, target: Tensor) -> None:
        """Raise a clear error if labels are out of range for this task (missing labels allowed)."""
        mask = self.label_mask(target)
        y = target[mask]
        if y.numel() == 0:
            return
        if self.kind == "multiclass":
            bad = (y < 0) | (y >= self.num_classes)
            if bad.any():
                value = y[bad][0].item()
                raise ValueError(
                    f"Task '{self.name}': label {value} is out of range [0, {self.num_classes}) "
                    f"(missing labels must be {self.ignore_index}). Check num_classes in the data "
                    f"config (data.tasks.{self.name}.num_classes)."
                )
        elif self.kind in ("binary", "multilabel"):
            bad = (y != 0) & (y != 1)
            if bad.any():
                value = y[bad][0].item()
                raise ValueError(
                    f"Task '{self.name}' ({self.kind}): label {value} is not 0 or 1 "
                    f"(mark missing labels with NaN)."
                )
        elif not torch.isfinite(y).all():
            raise ValueError(f"Task '{self.name}': regression labels must be finite or NaN.")

    # ----------------------------------------------------------------------------------- loss
    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Mean loss over the labelled examples; 0 (with a graph) when none is labelled.

        Args:
            output: head output ``[B, output_size]``.
            target: ``[B]`` integer classes (multiclass), ``[B]`` or ``[B, 1]`` 0/1 (binary),
                ``[B, C]`` 0/1 (multilabel), ``[B]`` or ``[B, D]`` reals (regression).
        Returns:
            scalar tensor.
        """
        mask = self.label_mask(target)
        if not bool(mask.any()):
            return output.sum() * 0.0
        out, y = output[mask], target[mask]
        if self.kind == "multiclass":
            return F.cross_entropy(out, y.long())
        y = y.reshape(out.shape).to(out.dtype)
        if self.kind in ("binary", "multilabel"):
            return F.binary_cross_entropy_with_logits(out, y)
        return F.mse_loss(out, y)

    # ----------------------------------------------------------------------------------- metrics
    def make_metrics(self) -> torchmetrics.MetricCollection:
        """A fresh :class:`torchmetrics.MetricCollection` of this task's metrics."""
        if self.kind == "multiclass":
            metrics = {
                "acc": torchmetrics.Accuracy(task="multiclass", num_classes=self.num_classes),
                "f1": torchmetrics.F1Score(
                    task="multiclass", num_classes=self.num_classes, average="macro"
                ),
            }
        elif self.kind == "binary":
            metrics = {
                "acc": torchmetrics.Accuracy(task="binary"),
                "auroc": torchmetrics.AUROC(task="binary"),
            }
        elif self.kind == "multilabel":
            metrics = {
                "acc": torchmetrics.Accuracy(task="multilabel", num_labels=self.num_classes),
                "auroc": torchmetrics.AUROC(task="multilabel", num_labels=self.num_classes),
            }
        else:
            metrics = {
                "mae": torchmetrics.MeanAbsoluteError(),
                "rmse": torchmetrics.MeanSquaredError(squared=False),
            }
        return torchmetrics.MetricCollection(metrics)

    def metric_inputs(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor] | None:
        """The (prediction, target) pair to feed this task's metrics, labelled examples only.

        Returns None when no example in the batch is labelled.
        """
        mask = self.label_mask(target)
        if not bool(mask.any()):
            return None
        out, y = output[mask].detach(), target[mask]
        if self.kind == "multiclass":
            return out, y.long()
        if self.kind == "binary":
            return out.reshape(-1).sigmoid(), y.reshape(-1).long()
        if self.kind == "multilabel":
            return out.sigmoid(), y.reshape(out.shape).long()
        return out.reshape(-1).float(), y.reshape(-1).to(out.dtype).float()


def tasks_from_config(spec: Mapping[str, Mapping] | None) -> dict[str, Task]:
    """Build ``{name: Task}`` from a mapping ``{name: {kind: ..., num_classes: ...}}``."""
    tasks: dict[str, Task] = {}
    for name, options in (spec or {}).items():
        options = dict(options or {})
        options.pop("name", None)
        try:
            tasks[str(name)] = Task(name=str(name), **options)
        except TypeError as err:
            raise ValueError(f"data.tasks.{name}: {err}") from None
    return tasks


def as_task_dict(tasks) -> dict[str, Task]:
    """Accept a list of Tasks, a ``{name: Task}`` dict, or a config mapping; return ``{name: Task}``."""
    if isinstance(tasks, Mapping):
        if all(isinstance(t, Task) for t in tasks.values()):
            return dict(tasks)
        return tasks_from_config(tasks)
    out: dict[str, Task] = {}
    for t in tasks:
        if not isinstance(t, Task):
            raise TypeError(f"Expected Task objects, got {type(t).__name__}.")
        if t.name in out:
            raise ValueError(f"Task name '{t.name}' appears twice.")
        out[t.name] = t
    return out
