"""A user's tabular multi-task data from one CSV file, no code needed."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from mtl.data.base import MultiTaskDataModule
from mtl.data.digits import _label_tensor


class CSVDataModule(MultiTaskDataModule):
    """Features and targets from the columns of a CSV file.

    Every declared task reads the column of the same name (or ``columns[task]``). Empty cells or
    ``nan`` in a target column are missing labels. Multiclass targets are integers in
    ``[0, num_classes)`` or strings (then coded by sorted order). Features are standardised with the
    training split's mean and standard deviation. Rows are split train/val/test at random by seed.

    Args:
        path: the CSV file (with a header row).
        features: feature columns; default: every column that is not a target.
        columns: ``{task: column}`` when a task's column has another name.
        split: train/val/test fractions.
    """

    def __init__(
        self,
        path: str,
        features: Sequence[str] | None = None,
        columns: Mapping[str, str] | None = None,
        split: Sequence[float] = (0.7, 0.15, 0.15),
        **kwargs,
    ) -> None:
        self.path = Path(path)
        self.feature_columns = list(features) if features else None
        self.columns = dict(columns or {})
        self.split_fractions = tuple(split)
        if not self.path.is_file():
            raise FileNotFoundError(f"data.path: CSV file '{self.path}' does not exist.")
        with self.path.open(newline="") as f:
            self.header = next(csv.reader(f), None) or []
        if not self.header:
            raise ValueError(f"data.path: '{self.path}' has no header row.")
        seen: set[str] = set()
        duplicates = sorted({c for c in self.header if c in seen or seen.add(c)})
        if duplicates:
            raise ValueError(
                f"data.path: '{self.path}' has duplicate column name(s) {duplicates}; a CSV reader keeps only "
                f"one of each, silently dropping the others. Rename them in the header row."
            )
        super().__init__(**kwargs)
        self._check_columns()

    def available_tasks(self) -> Sequence[str]:
        # any column can be a target: by its own name, or under another name via data.columns
        return list(self.header) + [t for t, c in self.columns.items() if c in self.header]

    def _check_columns(self) -> None:
        for t in self.tasks:
            col = self.columns.get(t, t)
            if col not in self.header:
                raise ValueError(
                    f"data.tasks.{t}: column '{col}' is not in {self.path}; columns are {self.header}."
                )
        targets = {self.columns.get(t, t) for t in self.tasks}
        if self.feature_columns is None:
            self.feature_columns = [c for c in self.header if c not in targets]
        for c in self.feature_columns:
            if c not in self.header:
                raise ValueError(
                    f"data.features: column '{c}' is not in {self.path}; columns are {self.header}."
                )
        if not self.feature_columns:
            raise ValueError(f"data.features: no feature columns left in {self.path}.")

    def build(self):
        with self.path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            raise ValueError(f"data.path: '{self.path}' has no data rows.")
        x = np.empty((len(rows), len(self.feature_columns)), dtype=np.float32)
        for j, c in enumerate(self.feature_columns):
            for i, r in enumerate(rows):
                try:
                    x[i, j] = float(r[c])
                except (TypeError, ValueError):
                    raise ValueError(
                        f"data.features: column '{c}' of {self.path} is not numeric "
                        f"(row {i + 2}: {r[c]!r}). Remove it from data.features or encode it."
                    ) from None
        if not np.isfinite(x).all():
            bad = self.feature_columns[int(np.argwhere(~np.isfinite(x))[0, 1])]
            raise ValueError(f"data.features: column '{bad}' of {self.path} has missing values.")
        labels = {t: self._target(rows, t) for t in self.tasks}
        frac = np.asarray(self.split_fractions, dtype=float) / sum(self.split_fractions)

        def sizes(n: int) -> np.ndarray:
            return np.diff(np.concatenate([[0], np.round(np.cumsum(frac) * n).astype(int)]))

        if (sizes(len(rows)) == 0).any():
            empty = [s for s, n in zip(("train", "val", "test"), sizes(len(rows))) if n == 0]
            need = next(n for n in range(len(rows) + 1, 100_000) if (sizes(n) > 0).all())
            raise ValueError(
                f"data.path: '{self.path}' has {len(rows)} data row(s); data.split={list(self.split_fractions)} "
                f"leaves the {empty} split(s) empty. It needs at least {need} rows for this split."
            )
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(rows))
        bounds = np.round(np.cumsum(frac) * len(rows)).astype(int)
        parts = np.split(order, bounds[:-1])
        train = parts[0]
        mean, std = x[train].mean(0), x[train].std(0)
        std[std == 0] = 1.0
        x = (x - mean) / std
        return {
            split: (torch.from_numpy(x[idx]), {t: y[idx] for t, y in labels.items()})
            for split, idx in zip(("train", "val", "test"), parts)
        }

    def _target(self, rows, name: str) -> torch.Tensor:
        task, col = self.tasks[name], self.columns.get(name, name)
        raw = [r[col].strip() if r[col] is not None else "" for r in rows]
        present = [v for v in raw if v != "" and v.lower() != "nan"]
        if task.kind == "multiclass":
            try:
                values = [math.nan if (v == "" or v.lower() == "nan") else float(v) for v in raw]
                codes = None
                if any(not math.isnan(v) and v != int(v) for v in values):
                    raise ValueError
            except ValueError:
                codes = {c: i for i, c in enumerate(sorted(set(present)))}
                values = [codes[v] if v in codes else math.nan for v in raw]
            arr = np.array([task.ignore_index if math.isnan(v) else int(v) for v in values])
            return _label_tensor(arr, task)
        try:
            arr = np.array([math.nan if (v == "" or v.lower() == "nan") else float(v) for v in raw])
        except ValueError:
            raise ValueError(
                f"data.tasks.{name}: column '{col}' of {self.path} has non-numeric values; a "
                f"{task.kind} target must be numeric."
            ) from None
        return _label_tensor(arr, task)
