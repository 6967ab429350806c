"""Labels are checked once, when a DataModule is set up, not in every training step."""

import pytorch_lightning as pl

from mtl import MultiTaskModel, MultiTaskModule, Task
from mtl.backbones import MLP
from mtl.data import SyntheticDataModule
from mtl.data.combined import CombinedDataModule


def _fit(datamodule, tasks):
    model = MultiTaskModel(MLP(input_shape=datamodule.input_shape, hidden=[8]), list(tasks.values()))
    pl.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2, accelerator="cpu", logger=False,
               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False).fit(
        MultiTaskModule(model), datamodule=datamodule)


def test_a_set_up_datamodule_is_not_checked_again_per_batch(monkeypatch):
    calls = []
    original = Task.check_targets
    monkeypatch.setattr(Task, "check_targets", lambda self, y: calls.append(self.name) or original(self, y))
    dm = SyntheticDataModule(n_train=64, n_val=32, n_test=32, dim=4, batch_size=16)
    dm.setup()
    assert dm.targets_checked and sorted(calls) == sorted(list(dm.tasks) * 3)  # every task, every split
    calls.clear()
    _fit(dm, dm.tasks)
    assert calls == []  # no per-batch check (and no host sync for it) in training or validation


def test_combined_datamodules_report_their_parts():
    a = SyntheticDataModule(n_train=64, n_val=32, n_test=32, dim=4)
    combined = CombinedDataModule({"a": a})
    assert not combined.targets_checked
    combined.setup()
    assert combined.targets_checked


import pytest
import torch
import torch.nn.functional as F


def _reference_loss(task, out, y):
    """The loss as the mean over the labelled rows, by indexing (the definition)."""
    mask = task.label_mask(y)
    if not mask.any():
        return out.sum() * 0.0
    o, t = out[mask], y[mask]
    if task.kind == "multiclass":
        return F.cross_entropy(o, t.long())
    t = t.reshape(o.shape).to(o.dtype)
    if task.kind in ("binary", "multilabel"):
        return F.binary_cross_entropy_with_logits(o, t)
    return F.mse_loss(o, task.standardise(t))


@pytest.mark.parametrize("kind", ["multiclass", "binary", "multilabel", "regression"])
def test_one_mask_loss_and_metric_inputs_equal_the_definitions(kind):
    g = torch.Generator().manual_seed(0)
    spec = {"multiclass": dict(num_classes=4), "binary": {}, "multilabel": dict(num_classes=3),
            "regression": dict(target_mean=10.0, target_std=2.0)}[kind]
    task = Task("t", kind=kind, **spec)
    out = torch.randn(8, task.output_size, generator=g, requires_grad=True)
    if kind == "multiclass":
        y = torch.randint(0, 4, (8,), generator=g)
        y[[1, 5]] = task.ignore_index
    elif kind == "regression":
        y = 10 + 2 * torch.randn(8, generator=g)
        y[[1, 5]] = float("nan")
    else:
        y = (torch.rand(8, task.output_size, generator=g) > 0.5).float().squeeze(-1)
        y[[1, 5]] = float("nan")
    loss, pair = task.loss_and_metric_inputs(out, y)
    expected = _reference_loss(task, out, y)
    assert torch.allclose(loss, expected, rtol=1e-6, atol=1e-7)
    grad, = torch.autograd.grad(loss, out)
    grad_expected, = torch.autograd.grad(expected, out)
    assert torch.allclose(grad, grad_expected, atol=1e-7) and (grad[[1, 5]] == 0).all()
    ref_pair = task.metric_inputs(out, y)
    assert all(torch.equal(a, b) for a, b in zip(pair, ref_pair)) and pair[0].shape[0] == 6
    # nothing labelled: 0 with a graph, no metric update
    none = torch.full_like(y, task.ignore_index if kind == "multiclass" else float("nan"))
    loss, pair = task.loss_and_metric_inputs(out, none)
    assert loss.item() == 0.0 and loss.requires_grad and pair is None
