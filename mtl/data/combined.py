"""Several datasets in one stage: one batch per dataset per step."""

from __future__ import annotations

from typing import Mapping, Sequence

import pytorch_lightning as pl
from pytorch_lightning.utilities.combined_loader import CombinedLoader

from mtl.data.base import MultiTaskDataModule, check_roles


class CombinedDataModule(pl.LightningDataModule):
    """Combines DataModules whose tasks have distinct names.

    Batches are ``{dataset: (x, {task: y})}`` holding one batch of every dataset that has a task
    in the current stage; each task's loss uses its own dataset's batch. Training cycles the smaller
    datasets until the largest is exhausted (``max_size_cycle``); evaluation reads every dataset
    once (``max_size``; exhausted ones give ``None``).

    Args:
        datasets: ``{name: MultiTaskDataModule}``.
    """

    def __init__(
        self,
        datasets: Mapping[str, MultiTaskDataModule],
        source_tasks: Sequence[str] | None = None,
        target_tasks: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if not datasets:
            raise ValueError("data.datasets must name at least one dataset.")
        self.datasets = dict(datasets)
        self.tasks = {}
        self.owner: dict[str, str] = {}
        for name, dm in self.datasets.items():
            dm.name = name
            for t, task in dm.tasks.items():
                if t in self.tasks:
                    raise ValueError(
                        f"Task '{t}' is declared by datasets '{self.owner[t]}' and '{name}'; "
                        f"task names must be unique across data.datasets."
                    )
                self.tasks[t] = task
                self.owner[t] = name
        self.active_tasks = list(self.tasks)
        self.active_sources: list[str] = []
        self.source_tasks, self.target_tasks = check_roles(self.tasks, source_tasks, target_tasks)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The common input shape of the datasets; sizes that differ between them are -1.

        A backbone that pools (``cnn``, ``resnet``) reads images of different sizes; one that needs a
        fixed number of input features (``mlp``) does not.
        """
        shapes = {n: dm.input_shape for n, dm in self.datasets.items()}
        if len({len(s) for s in shapes.values()}) > 1:
            raise ValueError(f"data.datasets have inputs of different ranks: {shapes}.")
        return tuple(
            dims[0] if len(set(dims)) == 1 else -1 for dims in zip(*shapes.values())
        )

    @property
    def targets_checked(self) -> bool:
        """Whether every dataset checked its labels at setup (see MultiTaskDataModule)."""
        return all(getattr(dm, "targets_checked", False) for dm in self.datasets.values())

    def select_tasks(self, names: Sequence[str], sources: Sequence[str] = ()) -> None:
        unknown = [t for t in list(names) + list(sources) if t not in self.tasks]
        if unknown:
            raise ValueError(f"Unknown task(s) {unknown}; the data declares {list(self.tasks)}.")
        self.active_sources = [s for s in sources if s not in names]
        self.active_tasks = list(names) + self.active_sources
        for name, dm in self.datasets.items():
            mine = [t for t in names if self.owner[t] == name]
            theirs = [s for s in self.active_sources if self.owner[s] == name]
            if mine or theirs:
                dm.select_tasks(mine, theirs)

    def _active(self) -> dict[str, MultiTaskDataModule]:
        used = {self.owner[t] for t in self.active_tasks}
        return {n: dm for n, dm in self.datasets.items() if n in used}

    def setup(self, stage: str | None = None) -> None:
        for dm in self.datasets.values():
            dm.setup(stage)

    def train_dataloader(self):
        loaders = {
            f"{n}/{role}": loader
            for n, dm in self._active().items()
            for role, loader in dm.train_loaders().items()
        }
        # without sources: cycle the smaller datasets until the largest is done; with sources: one
        # pass over the smallest (the scarce target labels), see MultiTaskDataModule
        mode = "min_size" if self.active_sources else "max_size_cycle"
        return CombinedLoader(loaders, mode)

    def val_dataloader(self):
        return CombinedLoader({n: dm.val_dataloader() for n, dm in self._active().items()}, "max_size")

    def test_dataloader(self):
        return CombinedLoader({n: dm.test_dataloader() for n, dm in self._active().items()}, "max_size")
