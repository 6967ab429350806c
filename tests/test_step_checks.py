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
    loss, update, count = task.loss_and_metric_inputs(out, y)
    expected = _reference_loss(task, out, y)
    assert torch.allclose(loss, expected, rtol=1e-6, atol=1e-7)
    grad, = torch.autograd.grad(loss, out)
    grad_expected, = torch.autograd.grad(expected, out)
    assert torch.allclose(grad, grad_expected, atol=1e-7) and (grad[[1, 5]] == 0).all()
    # the whole batch with its mask gives the metrics of the labelled rows alone
    masked, labelled = task.make_metrics(), task.make_metrics()
    masked.update(*update)
    labelled.update(*task.metric_inputs(out, y))
    assert int(count) == 6 and update[0].shape[0] == 8
    a, b = masked.compute(), labelled.compute()
    assert a.keys() == b.keys() and all(torch.allclose(a[k].double(), b[k].double()) for k in a)
    # nothing labelled: 0 with a graph, a count of 0, and the update adds nothing
    none = torch.full_like(y, task.ignore_index if kind == "multiclass" else float("nan"))
    loss, update, count = task.loss_and_metric_inputs(out, none)
    assert loss.item() == 0.0 and loss.requires_grad and int(count) == 0
    masked.update(*update)
    assert all(torch.equal(masked.compute()[k], a[k]) for k in a)


# ------------------------------------------------------------------------------ host syncs
class _CountSyncs(pl.Callback):
    """Counts syncing operations inside every training and validation batch (step, backward,
    optimizer step, metric updates), not in the epoch-end logging, where one read is expected."""

    def __init__(self):
        from mtl.syncs import HostSyncCounter

        self.counter = HostSyncCounter()
        self.batches = 0

    def _start(self, *args):
        self.counter.__enter__()
        self.batches += 1

    def _end(self, *args):
        self.counter.__exit__(None, None, None)

    on_train_batch_start = on_validation_batch_start = _start
    on_train_batch_end = on_validation_batch_end = _end


def _csv_with_every_vector_kind(tmp_path):
    g = torch.Generator().manual_seed(0)
    lines = ["f1,f2,colour,churn,price,tags_a"]
    for i in range(96):
        f1, f2 = torch.randn(2, generator=g).tolist()
        colour = "" if i % 7 == 0 else ["red", "green", "blue"][i % 3]  # some rows unlabelled
        churn = "" if i % 5 == 0 else ("yes" if f1 > 0 else "no")
        price = "" if i % 4 == 0 else f"{100 + 10 * f2:.3f}"
        lines.append(f"{f1:.4f},{f2:.4f},{colour},{churn},{price},{i % 2}")
    path = tmp_path / "kinds.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("balancer", [None, "UW"])
def test_training_and_validation_steps_make_no_host_sync(tmp_path, balancer):
    from mtl.balancing import weightings
    from mtl.data.csv import CSVDataModule

    dm = CSVDataModule(path=str(_csv_with_every_vector_kind(tmp_path)), batch_size=16, tasks={
        "colour": {"kind": "multiclass"}, "churn": {"kind": "binary"}, "price": {"kind": "regression"},
        "tags_a": {"kind": "binary"}})
    dm.setup()
    model = MultiTaskModel(MLP(input_shape=dm.input_shape, hidden=[8]), list(dm.tasks.values()))
    module = MultiTaskModule(model, balancer=getattr(weightings, balancer)(num_tasks=4) if balancer else None)
    counter = _CountSyncs()
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=2, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[counter])
    trainer.fit(module, datamodule=dm)
    assert counter.batches == 8  # 3 training and 1 validation batch per epoch
    assert counter.counter.total == 0, dict(counter.counter.where)
    # the epoch-end values are still those of the labelled rows
    assert 0.0 <= float(trainer.callback_metrics["val/churn/acc"]) <= 1.0
    assert float(trainer.callback_metrics["train/price/mae"]) > 0


@pytest.mark.parametrize("kind", ["multiclass", "binary", "multilabel", "regression", "segmentation", "depth", "normal"])
def test_the_sync_free_flag_agrees_with_check_targets(kind):
    task = Task("t", kind=kind, num_classes=3 if kind in ("multiclass", "multilabel", "segmentation") else None)
    good = {
        "multiclass": torch.tensor([0, 2, -100]), "binary": torch.tensor([0.0, 1.0, float("nan")]),
        "multilabel": torch.tensor([[0.0, 1.0, 1.0], [float("nan"), 5.0, 0.0]]),  # a row with NaN is unlabelled
        "regression": torch.tensor([1.0, float("nan")]), "segmentation": torch.tensor([[[0, 2], [-1, 1]]]),
        "depth": torch.tensor([[[0.0, 2.0]]]), "normal": torch.zeros(1, 3, 1, 2),
    }[kind]
    bad = {
        "multiclass": torch.tensor([0, 3]), "binary": torch.tensor([0.0, 2.0]),
        "multilabel": torch.tensor([[0.0, 1.0, 2.0]]), "regression": torch.tensor([1.0, float("inf")]),
        "segmentation": torch.tensor([[[0, 3]]]), "depth": torch.tensor([[[float("inf"), 1.0]]]),
        "normal": torch.full((1, 3, 1, 1), float("inf")),
    }[kind]
    assert not bool(task.invalid_targets(good))
    task.check_targets(good)
    assert bool(task.invalid_targets(bad))
    with pytest.raises(ValueError, match="Task 't'"):
        task.check_targets(bad)


def test_a_plain_dataloader_step_checks_every_label_with_one_host_read():
    from mtl.data import SyntheticDataModule
    from mtl.syncs import HostSyncCounter

    dm = SyntheticDataModule(n_train=64, n_val=32, n_test=32, dim=4, batch_size=16, num_tasks=3)
    dm.setup()
    model = MultiTaskModel(MLP(input_shape=dm.input_shape, hidden=[8]), list(dm.tasks.values()))
    module = MultiTaskModule(model)
    batch = next(iter(dm.train_dataloader()))
    with HostSyncCounter() as syncs:
        module.task_losses(batch, "train")  # no trainer, no DataModule: the labels are checked here
    assert syncs.total == 1, dict(syncs.where)
    x, ys = batch
    ys = dict(ys, t1=ys["t1"].clone())
    ys["t1"][0] = float("inf")
    with pytest.raises(ValueError, match="Task 't1'"):
        module.task_losses((x, ys), "train")


def test_dense_training_and_validation_steps_make_no_host_sync():
    from mtl.backbones import CNN
    from mtl.data import ScenesDataModule

    dm = ScenesDataModule(n_train=16, n_val=8, n_test=8, size=16, batch_size=8, seed=0)
    dm.setup()
    model = MultiTaskModel(CNN(input_shape=dm.input_shape, channels=[8], max_pools=1), list(dm.tasks.values()))
    counter = _CountSyncs()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[counter])
    trainer.fit(MultiTaskModule(model), datamodule=dm)
    assert counter.batches == 3 and len(dm.tasks) == 3
    assert counter.counter.total == 0, dict(counter.counter.where)
    assert 0.0 <= float(trainer.callback_metrics["val/segmentation/miou"]) <= 1.0


@pytest.mark.parametrize("kind", ["segmentation", "depth", "normal"])
def test_masked_dense_losses_equal_the_indexed_definition(kind):
    from mtl.dense_losses import depth_loss, normal_loss, segmentation_loss

    g = torch.Generator().manual_seed(0)
    if kind == "segmentation":
        out = torch.randn(2, 4, 5, 5, generator=g, requires_grad=True)
        y = torch.randint(-1, 4, (2, 5, 5), generator=g)
        loss, m = segmentation_loss(out, y), y != -1
        ref = F.cross_entropy(out.movedim(1, -1)[m], y[m])
    elif kind == "depth":
        out = torch.rand(2, 1, 5, 5, generator=g, requires_grad=True)
        y = torch.rand(2, 1, 5, 5, generator=g)
        y[0, 0, :2] = 0.0
        y[1, 0, 1] = float("nan")
        loss, m = depth_loss(out, y), torch.isfinite(y) & (y != 0)
        ref = (out[m] - y[m]).abs().mean()
    else:
        out = torch.randn(2, 3, 5, 5, generator=g, requires_grad=True)
        y = torch.randn(2, 3, 5, 5, generator=g)
        y[:, :, :2] = 0.0
        loss, m = normal_loss(out, y), (y != 0).any(dim=1)
        p, t = F.normalize(out, dim=1).movedim(1, -1)[m], F.normalize(y, dim=1).movedim(1, -1)[m]
        ref = 1.0 - (p * t).sum(-1).mean()
    assert torch.allclose(loss, ref, atol=1e-6)
    grad, = torch.autograd.grad(loss, out)
    grad_ref, = torch.autograd.grad(ref, out)
    assert torch.allclose(grad, grad_ref, atol=1e-7) and torch.isfinite(grad).all()
    empty = torch.full_like(y, -1) if kind == "segmentation" else torch.zeros_like(y)
    none = {"segmentation": segmentation_loss, "depth": depth_loss, "normal": normal_loss}[kind](out, empty)
    assert none.item() == 0.0 and none.requires_grad
