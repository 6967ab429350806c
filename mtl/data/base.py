"""The base DataModule: in-memory arrays, one label column per task, missing labels allowed.

Every DataModule here yields batches ``(x, {task: y})``. A data config declares the tasks its labels
support; a stage then selects the tasks it trains on with :meth:`MultiTaskDataModule.select_tasks`,
and the training split keeps only the examples labelled for at least one selected task.

When a stage also names source (auxiliary) tasks, a training batch is
``{"target": (x, {target: y}), "source": (x, {source: y})}``: an epoch is one pass over the
examples labelled for the targets (often few), and each step also draws a batch labelled for the
sources, so scarce target labels are not diluted in a large source set. ``min_steps_per_epoch``
makes an epoch over few labels longer (several passes), so that a stage's epochs, its fine-tuning
policy and its validations count in steps worth counting.
"""

from __future__ import annotations

import abc
from typing import Mapping, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from pytorch_lightning.utilities.combined_loader import CombinedLoader
from torch.utils.data import DataLoader, Dataset, Sampler

from mtl.tasks import Task, tasks_from_config

SPLITS = ("train", "val", "test")


def missing_value(task: Task) -> float:
    """The value that marks a missing label for ``task`` (see :attr:`Task.missing_value`)."""
    return float(task.missing_value)


class ArrayDataset(Dataset):
    """``x[i], {task: labels[task][i]}`` from tensors held in memory.

    Implements ``__getitems__`` so a DataLoader fetches a whole batch with one indexing operation
    (use :func:`collate_batch` as its ``collate_fn``).
    """

    def __init__(self, x: Tensor, labels: Mapping[str, Tensor]) -> None:
        n = x.shape[0]
        for name, y in labels.items():
            if y.shape[0] != n:
                raise ValueError(f"Task '{name}' has {y.shape[0]} labels for {n} examples.")
        self.x = x
        self.labels = dict(labels)

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int):
        return self.x[i], {t: y[i] for t, y in self.labels.items()}

    def __getitems__(self, indices: Sequence[int]):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.x[idx], {t: y[idx] for t, y in self.labels.items()}

    def subset(self, index: Tensor, tasks: Sequence[str] | None = None) -> "ArrayDataset":
        names = list(self.labels) if tasks is None else list(tasks)
        return ArrayDataset(self.x[index], {t: self.labels[t][index] for t in names})


class EpochShuffleSampler(Sampler[int]):
    """A random order per epoch that depends only on ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` before every epoch, so a stage resumed from a checkpoint
    sees the same batches as an uninterrupted one (a plain shuffling DataLoader would restart its
    random stream).

    Args:
        length: number of examples.
        seed: seed of the orders.
        num_samples: indices per epoch (default ``length``: one pass). More than ``length`` chains
            fresh random passes (every example once per pass) and cuts the last one, so an epoch
            over a few labelled examples can be long enough to be worth a validation.
    """

    def __init__(self, length: int, seed: int = 0, num_samples: int | None = None) -> None:
        self.length = int(length)
        self.seed = int(seed)
        self.num_samples = self.length if num_samples is None else max(int(num_samples), self.length)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        passes = -(-self.num_samples // max(self.length, 1))
        order = torch.cat([torch.randperm(self.length, generator=g) for _ in range(passes)])
        return iter(order[: self.num_samples].tolist())

    def __len__(self) -> int:
        return self.num_samples


def collate_batch(batch):
    """Batches come ready from ``ArrayDataset.__getitems__``."""
    return batch


class MultiTaskDataModule(pl.LightningDataModule, abc.ABC):
    """Base class for the package's DataModules.

    Subclasses implement :meth:`available_tasks` (the label columns they can produce) and
    :meth:`build` (returns ``{split: (x, {task: labels})}`` for the declared tasks).

    Args:
        tasks: ``{name: {kind: ..., num_classes: ...}}``: the tasks of this data (names must be
            among the dataset's available tasks).
        batch_size: training batch size (evaluation uses ``eval_batch_size`` or the same).
        seed: seed of the split and of any generation.
        label_budget: ``{task: n}``: keep only ``n`` labelled training examples for that task
            (chosen by seed), the rest become missing labels. Simulates scarce target labels.
        num_workers: DataLoader workers.
        name: name of the dataset (used when several datasets are combined).
        source_tasks, target_tasks: the tasks' natural roles for transfer, read by the schedule
            presets (``${data.source_tasks}``); default: none are sources, all are targets.
        min_steps_per_epoch: a training epoch draws at least this many batches, cycling through the
            labelled examples in fresh random orders (default: one pass). With scarce target labels
            (300 labels are 5 batches) an epoch of one pass makes every stage's length, its
            fine-tuning policy and its per-epoch validation count in units of 5 steps.
    """

    def __init__(
        self,
        tasks: Mapping[str, Mapping] | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        seed: int = 0,
        label_budget: Mapping[str, int] | None = None,
        num_workers: int = 0,
        name: str | None = None,
        source_tasks: Sequence[str] | None = None,
        target_tasks: Sequence[str] | None = None,
        min_steps_per_epoch: int | None = None,
    ) -> None:
        super().__init__()
        self.tasks: dict[str, Task] = tasks_from_config(tasks) if tasks else self.default_tasks()
        self.name = name or type(self).__name__.replace("DataModule", "").lower()
        available = self.available_tasks()
        unknown = [t for t in self.tasks if t not in available]
        if unknown:
            raise ValueError(
                f"data.tasks: {self.name} has no task(s) {unknown}; available: {sorted(available)}."
            )
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.seed = int(seed)
        self.label_budget = dict(label_budget or {})
        for t, n in list(self.label_budget.items()):
            if t not in self.tasks:
                raise ValueError(
                    f"data.label_budget names task '{t}', which is not among data.tasks "
                    f"{list(self.tasks)}."
                )
            if n is None:  # data.label_budget.<t>=null keeps every label
                del self.label_budget[t]
            elif isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(
                    f"data.label_budget.{t}={n!r}: a label budget is the number of labelled training "
                    f"examples to keep, an integer >= 0 (null keeps them all)."
                )
        self.num_workers = int(num_workers)
        if min_steps_per_epoch is not None and (
            isinstance(min_steps_per_epoch, bool) or not isinstance(min_steps_per_epoch, int) or min_steps_per_epoch < 1
        ):
            raise ValueError(
                f"data.min_steps_per_epoch={min_steps_per_epoch!r} must be a positive integer (or null for one "
                f"pass over the training examples per epoch)."
            )
        self.min_steps_per_epoch = min_steps_per_epoch
        self.source_tasks, self.target_tasks = check_roles(self.tasks, source_tasks, target_tasks)
        self.active_tasks: list[str] = list(self.tasks)
        self.active_sources: list[str] = []
        self.splits: dict[str, ArrayDataset] = {}

    # ------------------------------------------------------------------ to implement
    @abc.abstractmethod
    def available_tasks(self) -> Sequence[str]:
        """Names of the label columns this dataset can produce."""

    def default_tasks(self) -> dict[str, Task]:
        """Tasks used when the config declares none."""
        raise ValueError(f"{type(self).__name__} needs data.tasks to be set.")

    def build(self) -> dict[str, tuple[Tensor, dict[str, Tensor]]]:
        """``{split: (x, {task: labels})}`` for every split and every declared task.

        The in-memory DataModules implement it and :meth:`setup` turns its arrays into datasets; a
        DataModule that reads its examples from disk overrides :meth:`setup` and :meth:`dataset`
        instead and never calls it.
        """
        raise TypeError(
            f"{type(self).__name__} defines neither build() (arrays in memory) nor its own setup(); "
            f"implement one of them."
        )

    # ------------------------------------------------------------------ machinery
    def select_tasks(self, names: Sequence[str], sources: Sequence[str] = ()) -> None:
        """Restrict batches to the target tasks ``names`` and the source tasks ``sources``."""
        unknown = [t for t in list(names) + list(sources) if t not in self.tasks]
        if unknown:
            raise ValueError(f"Unknown task(s) {unknown}; the data declares {list(self.tasks)}.")
        self.active_sources = [s for s in sources if s not in names]
        self.active_tasks = list(names) + self.active_sources

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        built = self.build()
        for split in SPLITS:
            x, labels = built[split]
            if x.shape[0] == 0:
                sizes = {s: int(built[s][0].shape[0]) for s in SPLITS}
                raise ValueError(
                    f"data: the {split} split of '{self.name}' is empty (split sizes {sizes}); every split "
                    f"needs examples. Provide more data or change the split sizes of the data config."
                )
            labels = {t: labels[t] for t in self.tasks}
            if split == "train":
                labels = self._apply_budget(labels)
            for t, y in labels.items():
                self.tasks[t].check_targets(y)
            self.splits[split] = ArrayDataset(x, labels)
        self._targets_checked = True

    @property
    def targets_checked(self) -> bool:
        """Whether every label of every split was checked (:meth:`Task.check_targets`) at setup,
        so the module need not check each batch (a DataModule that reads from disk and overrides
        :meth:`setup` has not, and says False)."""
        return getattr(self, "_targets_checked", False)

    def _apply_budget(self, labels: dict[str, Tensor]) -> dict[str, Tensor]:
        out = dict(labels)
        for t, n in self.label_budget.items():
            y = labels[t].clone()
            task = self.tasks[t]
            labelled = torch.nonzero(task.label_mask(y)).flatten()
            if int(n) > len(labelled):
                raise ValueError(
                    f"data.label_budget.{t}={n} is more than the {len(labelled)} training examples labelled "
                    f"for '{t}' in '{self.name}'; lower it, or set data.label_budget.{t}=null to keep them all."
                )
            g = torch.Generator().manual_seed(self.seed + 7919)
            keep = labelled[torch.randperm(len(labelled), generator=g)[: int(n)]]
            drop = torch.ones(len(y), dtype=torch.bool)
            drop[keep] = False
            y[drop] = missing_value(task)
            out[t] = y
        return out

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input example (without the batch dimension)."""
        self.setup()
        return tuple(self.splits["train"].x.shape[1:])

    def dataset(self, split: str, tasks: Sequence[str] | None = None) -> ArrayDataset:
        """The split restricted to ``tasks`` (default: the active tasks). The training split keeps
        only examples labelled for at least one of them."""
        self.setup()
        names = self.active_tasks if tasks is None else list(tasks)
        full = self.splits[split]
        if split == "train":
            mask = torch.zeros(len(full), dtype=torch.bool)
            for t in names:
                mask |= self.tasks[t].label_mask(full.labels[t])
            index = torch.nonzero(mask).flatten()
        else:
            index = torch.arange(len(full))
        return full.subset(index, names)

    def _loader(self, split: str, shuffle: bool, tasks: Sequence[str] | None = None) -> DataLoader:
        ds = self.dataset(split, tasks)
        if len(ds) == 0:
            raise ValueError(
                f"The {split} split of '{self.name}' has no examples labelled for tasks "
                f"{list(tasks or self.active_tasks)}."
            )
        return DataLoader(
            ds,
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            sampler=EpochShuffleSampler(len(ds), self.seed, self._samples_per_epoch(len(ds))) if shuffle else None,
            num_workers=self.num_workers,
            collate_fn=collate_batch,
            drop_last=False,
        )

    def _samples_per_epoch(self, length: int) -> int:
        """Training examples drawn per epoch: one pass, or ``min_steps_per_epoch`` full batches."""
        return max(length, (self.min_steps_per_epoch or 0) * self.batch_size)

    def train_loaders(self) -> dict[str, DataLoader]:
        """``{"target": loader}``, plus ``"source"`` when the stage has source tasks."""
        if not self.active_sources:
            return {"target": self._loader("train", shuffle=True)}
        targets = [t for t in self.active_tasks if t not in self.active_sources]
        loaders = {"source": self._loader("train", shuffle=True, tasks=self.active_sources)}
        if targets:  # a dataset of a combined run may hold only sources
            loaders["target"] = self._loader("train", shuffle=True, tasks=targets)
        return loaders

    def train_dataloader(self):
        loaders = self.train_loaders()
        if len(loaders) == 1:
            return next(iter(loaders.values()))
        # an epoch is one pass over the target-labelled examples (usually the fewer), or
        # min_steps_per_epoch batches of them
        return CombinedLoader(loaders, "min_size")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def check_roles(
    tasks: Mapping[str, Task], sources: Sequence[str] | None, targets: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """Validate ``data.source_tasks`` / ``data.target_tasks`` against the declared tasks."""
    sources = list(sources or [])
    targets = list(targets) if targets else [t for t in tasks if t not in sources]
    for key, names in (("source_tasks", sources), ("target_tasks", targets)):
        unknown = [t for t in names if t not in tasks]
        if unknown:
            raise ValueError(f"data.{key}: unknown task(s) {unknown}; data.tasks declares {list(tasks)}.")
    return sources, targets


def stratified_split(
    y: np.ndarray, fractions: Sequence[float], seed: int
) -> list[np.ndarray]:
    """Indices of a deterministic stratified split of ``y`` into ``len(fractions)`` parts."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    frac = np.asarray(fractions, dtype=float) / float(sum(fractions))
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        bounds = np.round(np.cumsum(frac) * len(idx)).astype(int)
        start = 0
        for k, end in enumerate(bounds):
            parts[k].extend(idx[start:end].tolist())
            start = end
    return [np.sort(np.asarray(p, dtype=int)) for p in parts]
