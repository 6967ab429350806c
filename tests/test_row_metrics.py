"""The built-in vector metrics (mtl.metrics.rows): torchmetrics' values, without host syncs."""

from __future__ import annotations

import pytest
import torch
import torchmetrics

from mtl.metrics.rows import BinaryScores, MulticlassScores, MultilabelScores, RegressionErrors, WeightedMean
from mtl.syncs import HostSyncCounter


def _batches(kind: str, n_batches: int = 4, b: int = 16, c: int = 5, seed: int = 0):
    """Random ``(preds, target, mask)`` batches; one batch has no labelled row."""
    g = torch.Generator().manual_seed(seed)
    for i in range(n_batches):
        mask = torch.rand(b, generator=g) > 0.3
        if i == 2:
            mask[:] = False
        if kind == "multiclass":
            preds = torch.randn(b, c, generator=g)
            target = torch.randint(0, c - 1, (b,), generator=g)  # class c-1 never a target
            target[~mask] = -100
        elif kind == "binary":
            preds = torch.rand(b, generator=g)
            target = (torch.rand(b, generator=g) > 0.5).float()
            target[~mask] = float("nan")
        elif kind == "multilabel":
            preds = torch.rand(b, c, generator=g)
            target = (torch.rand(b, c, generator=g) > 0.5).float()
            target[~mask] = float("nan")
        else:
            preds = torch.randn(b, 2, generator=g)
            target = torch.randn(b, 2, generator=g)
            target[~mask] = float("nan")
        yield preds, target, mask


REFERENCE = {
    "multiclass": lambda: {
        "acc": torchmetrics.Accuracy(task="multiclass", num_classes=5),
        "f1": torchmetrics.F1Score(task="multiclass", num_classes=5, average="macro"),
    },
    "binary": lambda: {"acc": torchmetrics.Accuracy(task="binary"), "auroc": torchmetrics.AUROC(task="binary")},
    "multilabel": lambda: {
        "acc": torchmetrics.Accuracy(task="multilabel", num_labels=5),
        "auroc": torchmetrics.AUROC(task="multilabel", num_labels=5),
    },
    "regression": lambda: {"mae": torchmetrics.MeanAbsoluteError(), "rmse": torchmetrics.MeanSquaredError(squared=False)},
}
OURS = {
    "multiclass": lambda: MulticlassScores(5),
    "binary": BinaryScores,
    "multilabel": lambda: MultilabelScores(5),
    "regression": RegressionErrors,
}


@pytest.mark.parametrize("kind", ["multiclass", "binary", "multilabel", "regression"])
def test_masked_updates_equal_torchmetrics_on_the_labelled_rows(kind):
    ours, masked_free, reference = OURS[kind](), OURS[kind](), REFERENCE[kind]()
    for preds, target, mask in _batches(kind):
        ours.update(preds, target, mask)
        if mask.any():
            rows_p, rows_t = preds[mask], target[mask]
            masked_free.update(rows_p, rows_t)  # the labelled rows alone, no mask
            ref_t = rows_t if kind == "regression" else rows_t.long()
            for m in reference.values():
                m.update(rows_p.reshape(-1) if kind == "regression" else rows_p, ref_t.reshape(-1) if kind == "regression" else ref_t)
    got, rows = ours.compute(), masked_free.compute()
    assert got.keys() == reference.keys()
    for name, metric in reference.items():
        want = metric.compute().double()
        assert torch.allclose(got[name], want, atol=1e-6), (name, got[name], want)
        assert torch.allclose(rows[name], want, atol=1e-6), (name, rows[name], want)


def test_multiclass_scores_by_hand():
    m = MulticlassScores(4)
    m.update(torch.tensor([0, 1, 1, 1, 3]), torch.tensor([0, 0, 1, 2, 3]), torch.tensor([True, True, True, True, False]))
    out = m.compute()
    assert out["acc"].item() == pytest.approx(2 / 4)
    # F1 per class: 0 -> 2/3, 1 -> 2/4, 2 -> 0; class 3 occurs in no labelled row and is left out
    assert out["f1"].item() == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_weighted_mean_keeps_nan_and_ignores_zero_weights():
    m = WeightedMean()
    m.update(torch.tensor(2.0), torch.tensor(3))
    m.update(torch.tensor(float("nan")), torch.tensor(0))  # an unlabelled batch adds nothing
    m.update(torch.tensor(4.0), 1)
    assert m.compute().item() == pytest.approx((2 * 3 + 4) / 4)
    ref = torchmetrics.MeanMetric()
    ref.update(torch.tensor(2.0), 3)
    ref.update(torch.tensor(4.0), 1)
    assert m.compute().item() == pytest.approx(ref.compute().item())
    m.update(torch.tensor(float("nan")), 1)  # a diverged labelled batch is not dropped
    assert torch.isnan(m.compute())
    assert torch.isnan(WeightedMean().compute())


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_empty_metrics_are_nan_and_masks_are_checked():
    for metric in (MulticlassScores(3), BinaryScores(), MultilabelScores(2), RegressionErrors()):
        assert all(torch.isnan(v) for v in metric.compute().values())
    with pytest.raises(ValueError, match="one flag per row"):
        RegressionErrors().update(torch.zeros(4), torch.zeros(4), torch.ones(3, dtype=torch.bool))


def test_the_counter_sees_syncs():
    x = torch.tensor([1.0, -1.0, 2.0])
    with HostSyncCounter() as syncs:
        bool((x > 0).any())
        x[x > 0]
        torch.bincount(torch.tensor([0, 1]))
        x.sum()  # stays on the device
    assert syncs.counts == {"_local_scalar_dense": 1, "index (boolean mask)": 1, "bincount": 1}
    assert any("test_row_metrics.py" in where for where in syncs.where)


@pytest.mark.parametrize("kind", ["multiclass", "binary", "multilabel", "regression"])
def test_updates_make_no_host_sync(kind):
    metric, mean = OURS[kind](), WeightedMean()
    with HostSyncCounter() as syncs:
        for preds, target, mask in _batches(kind):
            metric.update(preds, target, mask)
            mean.update(preds.mean(), mask.sum())
    assert syncs.total == 0, dict(syncs.where)
    with HostSyncCounter() as at_end:
        metric.compute()
    assert at_end.total > 0  # the data-dependent work waits for the epoch's end
