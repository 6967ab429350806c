"""Per-example metrics of the built-in vector kinds, updated without a host sync.

A training step on a GPU should never wait for the device. torchmetrics' classification metrics
wait several times per update: ``ignore_index`` rows are dropped by boolean indexing, the confusion
matrix is a ``bincount`` (whose output size depends on the data), and argument validation reads
values back. The metrics here take the whole batch and a label mask ``[B]`` instead, and add
mask-weighted counts and sums to fixed-size states (``scatter_add_`` of integers, which is exact in
any order, so also deterministic). Everything data-dependent waits until :meth:`compute`, once per
epoch.

Each ``update(preds, target, mask=None)`` also takes the labelled rows alone (``mask=None``), the
pair :meth:`mtl.tasks.Task.metric_inputs` returns. Values are those of the torchmetrics metric
named beside each one (tested against it), over the labelled rows of the split:

=====================  =========================================  ===============================
metric                 values                                     equals torchmetrics'
=====================  =========================================  ===============================
:class:`MulticlassScores`  ``acc`` (micro), ``f1`` (macro)        ``Accuracy``, ``F1Score(average="macro")``
:class:`BinaryScores`      ``acc`` (at 0.5), ``auroc`` (exact)    ``Accuracy``, ``AUROC`` (task binary)
:class:`MultilabelScores`  ``acc``, ``auroc`` (macro over labels)  ``Accuracy``, ``AUROC`` (task multilabel)
:class:`RegressionErrors`  ``mae``, ``rmse`` (over all elements)  ``MeanAbsoluteError``, ``MeanSquaredError(squared=False)``
:class:`WeightedMean`      the weighted mean                      ``MeanMetric`` (NaN is kept, not dropped)
=====================  =========================================  ===============================

The exact AUROC needs every score: the binary and multilabel metrics keep the scores, targets and
masks of the split (as torchmetrics' ``AUROC`` does without ``thresholds``) and select the labelled
rows at :meth:`compute`.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc, multilabel_auroc
from torchmetrics.utilities import dim_zero_cat

__all__ = ["BinaryScores", "MulticlassScores", "MultilabelScores", "RegressionErrors", "WeightedMean"]


def _rows_mask(mask: Tensor | None, rows: int, device: torch.device) -> Tensor:
    """The label mask ``[B]`` as given, or all rows labelled."""
    if mask is None:
        return torch.ones(rows, dtype=torch.bool, device=device)
    if mask.shape != (rows,):
        raise ValueError(f"The label mask must be [{rows}] (one flag per row), got shape {tuple(mask.shape)}.")
    return mask.bool()


def _nan(like: Tensor) -> Tensor:
    return torch.tensor(float("nan"), dtype=torch.float64, device=like.device)


class WeightedMean(Metric):
    """``sum(w * value) / sum(w)`` over the updates (float64 states).

    Unlike torchmetrics' ``MeanMetric``, a NaN value is neither checked for (a host sync) nor dropped:
    it makes the mean NaN, so a diverged epoch is not reported as a finite one. A weight of 0 adds
    nothing (a batch without labels). :meth:`compute` is NaN while the total weight is 0.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: Tensor | float, weight: Tensor | float = 1.0) -> None:
        value = torch.as_tensor(value, device=self.total.device).double()
        weight = torch.broadcast_to(torch.as_tensor(weight, device=self.total.device).double(), value.shape)
        # a zero weight adds nothing, whatever the value
        self.total += torch.where(weight != 0, value * weight, 0.0).sum()
        self.weight += weight.sum()

    def compute(self) -> Tensor:
        return self.total / self.weight if self.weight > 0 else _nan(self.total)


class MulticlassScores(Metric):
    """Accuracy and macro F1 from a ``C x C`` confusion matrix (rows: target, columns: prediction).

    ``acc`` is the fraction of labelled rows whose arg-max is the target; ``f1`` is the mean over
    classes of ``2 TP / (2 TP + FP + FN)``, over the classes that occur as a target or a prediction
    (torchmetrics' macro average leaves the others out too).

    Args:
        num_classes: ``C``.
        ignore_index: the target of unlabelled rows, used when no mask is given.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = -100, **kwargs) -> None:
        super().__init__(**kwargs)
        if int(num_classes) < 2:
            raise ValueError(f"MulticlassScores needs num_classes >= 2, got {num_classes}.")
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)
        self.add_state("confmat", torch.zeros(self.num_classes**2, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        """Args: ``preds`` logits ``[B, C]`` or labels ``[B]``; ``target`` ``[B]`` classes; ``mask``
        ``[B]`` labelled rows (default: the rows whose target is not ``ignore_index``)."""
        labels = preds.argmax(dim=1) if preds.dim() == 2 else preds
        target = target.reshape(-1)
        if mask is None:
            mask = target != self.ignore_index
        mask = _rows_mask(mask, target.shape[0], target.device)
        c = self.num_classes
        index = torch.where(mask, target.long() * c + labels.reshape(-1).long(), 0)
        self.confmat.scatter_add_(0, index, mask.long())

    def compute(self) -> dict[str, Tensor]:
        m = self.confmat.reshape(self.num_classes, self.num_classes).double()
        total = m.sum()
        if total == 0:
            return {"acc": _nan(m), "f1": _nan(m)}
        tp = m.diagonal()
        fp, fn = m.sum(0) - tp, m.sum(1) - tp
        present = (tp + fp + fn) > 0
        f1 = 2 * tp[present] / (2 * tp[present] + fp[present] + fn[present])
        return {"acc": tp.sum() / total, "f1": f1.mean()}


class _ScoresWithAuroc(Metric):
    """Counts of correct labels at 0.5, plus every score, target and mask for the exact AUROC."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, labels: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.labels = int(labels)
        self.add_state("correct", torch.zeros(self.labels, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        for name in ("scores", "targets", "masks"):
            self.add_state(name, [], dist_reduce_fx="cat")

    def _add(self, probs: Tensor, target: Tensor, mask: Tensor | None) -> None:
        """``probs`` and ``target`` ``[B, L]``; unlabelled rows' targets may be anything (NaN)."""
        mask = _rows_mask(mask, probs.shape[0], probs.device)
        target = torch.where(mask[:, None], target, 0).long()
        hit = ((probs > 0.5).long() == target) & mask[:, None]
        self.correct += hit.sum(dim=0)
        self.count += mask.sum()
        self.scores.append(probs.detach().float())
        self.targets.append(target)
        self.masks.append(mask)

    def _labelled(self) -> tuple[Tensor, Tensor] | None:
        if isinstance(self.scores, list) and not self.scores:
            return None
        mask = dim_zero_cat(self.masks)
        return dim_zero_cat(self.scores)[mask], dim_zero_cat(self.targets)[mask]


class BinaryScores(_ScoresWithAuroc):
    """``acc`` (score above 0.5) and the exact ``auroc`` of a binary task.

    ``update(probs [B], target [B] 0/1, mask [B])``: probabilities of class 1.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(1, **kwargs)

    def update(self, preds: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        self._add(preds.reshape(-1, 1), target.reshape(-1, 1), mask)

    def compute(self) -> dict[str, Tensor]:
        rows = self._labelled()
        if rows is None or self.count == 0:
            return {"acc": _nan(self.correct), "auroc": _nan(self.correct)}
        scores, targets = rows
        return {"acc": self.correct[0].double() / self.count, "auroc": binary_auroc(scores[:, 0], targets[:, 0]).double()}


class MultilabelScores(_ScoresWithAuroc):
    """``acc`` (each label's accuracy at 0.5, averaged over labels) and ``auroc`` (each label's exact
    AUROC, averaged) of a multilabel task.

    ``update(probs [B, L], target [B, L] 0/1, mask [B])``.
    """

    def __init__(self, num_labels: int, **kwargs) -> None:
        super().__init__(num_labels, **kwargs)

    def update(self, preds: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        self._add(preds, target.reshape(preds.shape), mask)

    def compute(self) -> dict[str, Tensor]:
        rows = self._labelled()
        if rows is None or self.count == 0:
            return {"acc": _nan(self.correct), "auroc": _nan(self.correct)}
        scores, targets = rows
        acc = (self.correct.double() / self.count).mean()
        return {"acc": acc, "auroc": multilabel_auroc(scores, targets, num_labels=self.labels, average="macro").double()}


class RegressionErrors(Metric):
    """Mean absolute error and root mean squared error over every element of the labelled rows
    (float64 sums over an integer count).

    ``update(preds, target, mask)``: ``preds`` and ``target`` ``[B]`` or ``[B, D]``, ``mask`` ``[B]``.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("abs_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sq_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        p = preds.reshape(preds.shape[0], -1).double()
        t = target.reshape(p.shape).double()
        rows = _rows_mask(mask, p.shape[0], p.device)[:, None].expand_as(p)
        err = torch.where(rows, p - torch.where(rows, t, 0.0), 0.0)
        self.abs_sum += err.abs().sum()
        self.sq_sum += (err * err).sum()
        self.count += rows.sum()

    def compute(self) -> dict[str, Tensor]:
        if self.count == 0:
            return {"mae": _nan(self.abs_sum), "rmse": _nan(self.abs_sum)}
        n = self.count.double()
        return {"mae": self.abs_sum / n, "rmse": (self.sq_sum / n).sqrt()}
