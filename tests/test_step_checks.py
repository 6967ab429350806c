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
