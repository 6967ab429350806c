"""A user's tabular multi-task data from one CSV file, no code needed.

What the data teaches the model about its own columns is kept with the model, so that new rows are
read exactly as the training rows were (``mtl-predict``):

- **label coding**, in the task spec (``Task.class_names``, saved in every checkpoint): a
  classification column whose labels are not already codes (strings such as ``yes``/``no``, or
  numbers that are not ``0..K-1`` / ``0, 1``) is coded in sorted order, and ``num_classes`` of a
  multiclass task defaults to the number of classes found;
- **target scale**, in the task spec (``Task.target_mean`` / ``target_std``): each regression
  target's mean and standard deviation over the labelled training rows; the loss sees standardised
  targets, metrics and predictions are in the column's units;
- **feature scale**, in :meth:`CSVDataModule.state_dict` (Lightning saves it in every checkpoint
  under ``"CSVDataModule"``): the feature columns and the training split's means and standard
  deviations. New rows are standardised with these, never with their own statistics.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from mtl.data.base import MultiTaskDataModule
from mtl.data.digits import _label_tensor
from mtl.tasks import Task

#: cells that mark a missing value
MISSING = ("", "nan", "na", "n/a", "null")


def is_missing(value: str | None) -> bool:
    return value is None or value.strip().lower() in MISSING


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """``(header, rows)`` of a CSV file with a header row; errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"data.path: CSV file '{path}' does not exist.")
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None) or []
        if not header:
            raise ValueError(f"data.path: '{path}' has no header row.")
        seen: set[str] = set()
        duplicates = sorted({c for c in header if c in seen or seen.add(c)})
        if duplicates:
            raise ValueError(
                f"data.path: '{path}' has duplicate column name(s) {duplicates}; a CSV reader keeps only "
                f"one of each, silently dropping the others. Rename them in the header row."
            )
        rows = [dict(zip(header, r)) for r in reader if any(cell.strip() for cell in r)]
    return header, rows


def feature_matrix(
    rows: Sequence[Mapping[str, str]], columns: Sequence[str], path: Path, training: bool = True
) -> np.ndarray:
    """``[N, F]`` float32 features of ``rows``; a non-numeric or missing cell is an error that names
    the column, the row (as numbered in the file) and the file. ``training``: the data of a run
    (the errors then suggest data.features), else new rows for a trained model."""
    fix = "Remove the column from data.features or encode it." if training else "The model needs a number there."
    x = np.empty((len(rows), len(columns)), dtype=np.float32)
    for j, c in enumerate(columns):
        for i, r in enumerate(rows):
            cell = r.get(c)
            if is_missing(cell):
                raise ValueError(
                    f"data.features: column '{c}' of {path} has a missing value (row {i + 2}); features must all "
                    f"be present. Fill it{', or remove the column from data.features' if training else ''}."
                )
            try:
                x[i, j] = float(cell)
            except ValueError:
                raise ValueError(
                    f"data.features: column '{c}' of {path} is not numeric (row {i + 2}: {cell!r}). {fix}"
                ) from None
    if not np.isfinite(x).all():
        bad = columns[int(np.argwhere(~np.isfinite(x))[0, 1])]
        raise ValueError(f"data.features: column '{bad}' of {path} has infinite or out-of-range values.")
    return x


def standardise(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``(x - mean) / std`` per column of ``x [N, F]``."""
    return ((x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)).astype(np.float32)


def _sorted_labels(values: set[str]) -> list[str]:
    """Labels in sorted order: numerically when they are all numbers, else as strings."""
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


def label_coding(values: Sequence[str], options: Mapping[str, Any], where: str) -> dict[str, Any]:
    """What a classification column's labels add to its task's options.

    Args:
        values: the column's cells (missing ones included).
        options: the task's declared options (``kind``, maybe ``num_classes``, ``class_names``).
        where: ``data.tasks.<name>: column '<c>' of <file>``, for errors.
    Returns:
        ``{}`` when the labels are already codes (multiclass integers ``>= 0``, binary 0/1), with
        ``num_classes`` (max + 1) for a multiclass task that declares none; else
        ``{"class_names": sorted labels}`` (and ``num_classes``).
    """
    kind = options.get("kind", "multiclass")
    present = {v.strip() for v in values if not is_missing(v)}
    names = options.get("class_names")
    if names is not None:
        unknown = sorted(present - {str(n) for n in names})
        if unknown:
            raise ValueError(f"{where} has label(s) {unknown[:5]} that are not in its class_names {list(names)}.")
        return {}
    try:
        numbers = {float(v) for v in present}
        codes = all(n == int(n) and n >= 0 for n in numbers)
    except ValueError:
        numbers, codes = set(), False
    if kind == "binary":
        if codes and numbers <= {0.0, 1.0}:
            return {}
        if len(present) != 2:
            shown = _sorted_labels(present)[:5]
            raise ValueError(
                f"{where} has {len(present)} distinct label(s) {shown}; a binary target needs two (0/1, or "
                f"two names such as no/yes). Declare it {{kind: multiclass}} if it has more classes."
            )
        return {"class_names": _sorted_labels(present)}
    declared = options.get("num_classes")
    if codes:
        if declared is not None:
            return {}
        return {"num_classes": max(2, int(max(numbers, default=1)) + 1)}
    found = _sorted_labels(present)
    if declared is not None and int(declared) != len(found):
        raise ValueError(
            f"{where} has {len(found)} distinct labels {found[:10]}, but num_classes is {declared}. Drop "
            f"num_classes (it is inferred), or name every class, in order: data.tasks.<name>.class_names=[...]."
        )
    return {"class_names": found, "num_classes": len(found)}


class CSVDataModule(MultiTaskDataModule):
    """Features and targets from the columns of a CSV file.

    Every declared task reads the column of the same name (or ``columns[task]``). Empty cells (or
    ``nan``, ``NA``, ``null``) in a target column are missing labels. Classification labels may be
    strings (coded in sorted order and named by ``Task.class_names``); a multiclass task's
    ``num_classes`` is inferred from its column when not declared. Features are standardised with
    the training split's mean and standard deviation, and regression targets likewise for the loss
    (see the module docstring). Rows are split train/val/test at random by seed.

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
        self.header, self.rows = read_csv(self.path)
        #: the feature scaling: from a checkpoint (:meth:`load_state_dict`) or the training split
        self.feature_mean: list[float] | None = None
        self.feature_std: list[float] | None = None
        if kwargs.get("tasks"):
            kwargs["tasks"] = {name: self._with_coding(str(name), spec) for name, spec in dict(kwargs["tasks"]).items()}
        super().__init__(**kwargs)
        self._check_columns()

    def _with_coding(self, name: str, spec: Any) -> Any:
        """A task's options completed by its column's label coding (see :func:`label_coding`)."""
        if isinstance(spec, Task):
            return spec
        options = dict(spec or {})
        col = self.columns.get(name, name)
        if options.get("kind", "multiclass") not in ("multiclass", "binary") or col not in self.header:
            return options  # other kinds, and unknown columns (refused by _check_columns)
        where = f"data.tasks.{name}: column '{col}' of {self.path}"
        return {**options, **label_coding([r.get(col) or "" for r in self.rows], options, where)}

    def available_tasks(self) -> Sequence[str]:
        # any column can be a target: by its own name, or under another name via data.columns
        return list(self.header) + [t for t, c in self.columns.items() if c in self.header]

    def _check_columns(self) -> None:
        for t, task in self.tasks.items():
            col = self.columns.get(t, t)
            if col not in self.header:
                raise ValueError(
                    f"data.tasks.{t}: column '{col}' is not in {self.path}; columns are {self.header}."
                )
            if task.kind not in ("multiclass", "binary", "regression", "custom"):
                raise ValueError(
                    f"data.tasks.{t}: a CSV column holds one label per row, so its kind is multiclass, binary "
                    f"or regression, not '{task.kind}'. For several 0/1 labels, declare one binary task per column."
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

    # ------------------------------------------------------------------ preprocessing state
    def state_dict(self) -> dict[str, Any]:
        """The feature preprocessing, as plain data: Lightning saves it in every checkpoint (under
        ``"CSVDataModule"``) and ``mtl-predict`` applies it to new rows. Empty before setup."""
        if self.feature_mean is None:
            return {}
        return {
            "features": list(self.feature_columns),
            "feature_mean": list(self.feature_mean),
            "feature_std": list(self.feature_std),
            "columns": {t: self.columns.get(t, t) for t in self.tasks},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Use a checkpoint's feature preprocessing (Lightning calls this when it restores one).

        Before setup, it pins the scaling that setup applies. After setup (a resumed stage, or a
        stage's best checkpoint restored for testing), the data must match it: a data file changed
        since the checkpoint was written is refused rather than read with other statistics.
        """
        if not state:
            return
        saved = (list(state["features"]), [float(v) for v in state["feature_mean"]], [float(v) for v in state["feature_std"]])
        if self.feature_mean is None:
            self.feature_columns, self.feature_mean, self.feature_std = saved
            return
        mine = (list(self.feature_columns), self.feature_mean, self.feature_std)
        if mine[0] != saved[0] or not (np.allclose(mine[1], saved[1], rtol=1e-6) and np.allclose(mine[2], saved[2], rtol=1e-6)):
            raise ValueError(
                f"data.path: the features of '{self.path}' (columns {mine[0]}) do not match the checkpoint being "
                f"restored (columns {saved[0]}, with other training statistics): the file changed since it was "
                f"trained. Restore the file, or train in a new run directory."
            )

    # ------------------------------------------------------------------ building
    def build(self):
        rows = self.rows
        if not rows:
            raise ValueError(f"data.path: '{self.path}' has no data rows.")
        x = feature_matrix(rows, self.feature_columns, self.path)
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
        if self.feature_mean is None:
            train = x[parts[0]].astype(np.float64)
            mean, std = train.mean(0), train.std(0)
            std[~(std > 0)] = 1.0
            self.feature_mean, self.feature_std = mean.tolist(), std.tolist()
        x = standardise(x, self.feature_mean, self.feature_std)
        return {
            split: (torch.from_numpy(x[idx]), {t: y[idx] for t, y in labels.items()})
            for split, idx in zip(("train", "val", "test"), parts)
        }

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        super().setup(stage)
        for name, task in self.tasks.items():
            if task.kind == "regression" and task.target_mean is None:
                self._standardise_target(task, self.splits["train"].labels[name])

    @staticmethod
    def _standardise_target(task: Task, y: Tensor) -> None:
        """Set a regression task's ``target_mean`` / ``target_std`` from its labelled training
        targets ``[N]`` (kept unset when none is labelled)."""
        y = y[task.label_mask(y)].double()
        if y.numel() == 0:
            return
        std = float(y.std(unbiased=False)) if y.numel() > 1 else 0.0
        task.target_mean = float(y.mean())
        task.target_std = std if std > 0 and math.isfinite(std) else 1.0

    def _target(self, rows, name: str) -> Tensor:
        task, col = self.tasks[name], self.columns.get(name, name)
        raw = [(r.get(col) or "").strip() for r in rows]
        if task.kind in ("multiclass", "binary") and task.class_names is not None:
            codes = {c: i for i, c in enumerate(task.class_names)}
            unknown = sorted({v for v in raw if not is_missing(v) and v not in codes})
            if unknown:
                raise ValueError(
                    f"data.tasks.{name}: column '{col}' of {self.path} has label(s) {unknown[:5]} that are not "
                    f"in its class_names {task.class_names}."
                )
            missing = task.missing_value
            arr = np.array([missing if is_missing(v) else codes[v] for v in raw], dtype=np.float64)
            if task.kind == "multiclass":
                arr = arr.astype(np.int64)
            return _label_tensor(arr, task)
        try:
            values = np.array([math.nan if is_missing(v) else float(v) for v in raw])
        except ValueError:
            raise ValueError(
                f"data.tasks.{name}: column '{col}' of {self.path} has non-numeric values; a "
                f"{task.kind} target must be numeric."
            ) from None
        if task.kind == "multiclass":
            bad = [v for v in values if not math.isnan(v) and v != int(v)]
            if bad:
                raise ValueError(
                    f"data.tasks.{name}: column '{col}' of {self.path} has the non-integer class label {bad[0]}; "
                    f"declare class_names, or use kind regression."
                )
            arr = np.array([task.ignore_index if math.isnan(v) else int(v) for v in values])
            return _label_tensor(arr, task)
        return _label_tensor(values, task)
