"""Embedded image data built from scikit-learn's 8x8 digits (shipped with scikit-learn, no download)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from sklearn.datasets import load_digits

from mtl.data.base import MultiTaskDataModule, stratified_split
from mtl.tasks import Task

_MISSING = -100


def _digit_splits(
    seed: int, fractions: Sequence[float]
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Stratified split of the 1,797 digits: ``{split: (images [N,8,8] in [0,1], digit, index)}``
    where ``index`` locates each image in scikit-learn's array."""
    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)
    parts = stratified_split(d.target, fractions, seed)
    return {
        s: (images[i], d.target[i].astype(np.int64), i) for s, i in zip(("train", "val", "test"), parts)
    }


class DigitsDataModule(MultiTaskDataModule):
    """The 8x8 digits, with several label columns derived from the digit.

    Tasks: ``digit`` (10 classes), ``parity`` (2 classes: even/odd), ``large`` (binary: digit >= 5),
    ``low`` (digits 0-4 as 5 classes; missing for 5-9) and ``high`` (digits 5-9 as 5 classes;
    missing for 0-4). ``low``/``high`` give a source/target transfer pair on disjoint classes.
    Inputs are ``[N, 1, 8, 8]`` in [0, 1].

    Args:
        split: train/val/test fractions of the 1,797 images (stratified by digit, by ``seed``).
    """

    def __init__(self, split: Sequence[float] = (0.6, 0.2, 0.2), **kwargs) -> None:
        self.split_fractions = tuple(split)
        self.source_index: dict[str, np.ndarray] = {}
        super().__init__(**kwargs)

    def available_tasks(self) -> Sequence[str]:
        return ("digit", "parity", "large", "low", "high")

    def default_tasks(self) -> dict[str, Task]:
        return {"digit": Task("digit", num_classes=10), "parity": Task("parity", num_classes=2)}

    @staticmethod
    def labels_of(digit: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "digit": digit,
            "parity": digit % 2,
            "large": (digit >= 5).astype(np.float32),
            "low": np.where(digit < 5, digit, _MISSING),
            "high": np.where(digit >= 5, digit - 5, _MISSING),
        }

    def build(self):
        out = {}
        for split, (images, digit, index) in _digit_splits(self.seed, self.split_fractions).items():
            self.source_index[split] = index
            labels = self.labels_of(digit)
            out[split] = (
                torch.from_numpy(images).unsqueeze(1),
                {t: _label_tensor(labels[t], self.tasks[t]) for t in self.tasks},
            )
        return out


class MultiDigitsDataModule(MultiTaskDataModule):
    """MultiMNIST-style pairs of 8x8 digits side by side on a wider canvas.

    Each image puts a left and a right digit on a ``(8 + max_shift) x (16 - overlap + max_shift)``
    canvas (pixel-wise max where they overlap), each shifted at random by up to ``max_shift`` pixels
    in both directions. Tasks: ``left`` and ``right`` (10 classes each) and ``sum`` (19 classes).
    The pairs of a split are drawn only from that split's digits, so no test digit is seen in
    training (``source_index[split]`` gives the scikit-learn indices of each image's two digits). Generation is deterministic given ``seed``. Inputs are ``[N, 1, H, W]`` in [0, 1].

    Args:
        n_train, n_val, n_test: number of generated images per split.
        overlap: columns by which the two digit boxes overlap before shifting.
        max_shift: largest random shift in pixels.
    """

    def __init__(
        self,
        n_train: int = 6000,
        n_val: int = 1000,
        n_test: int = 1000,
        overlap: int = 4,
        max_shift: int = 2,
        split: Sequence[float] = (0.6, 0.2, 0.2),
        **kwargs,
    ) -> None:
        self.sizes = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
        self.overlap = int(overlap)
        self.max_shift = int(max_shift)
        self.split_fractions = tuple(split)
        self.source_index: dict[str, np.ndarray] = {}
        if not 0 <= self.overlap <= 8:
            raise ValueError(f"data.overlap must be in [0, 8], got {overlap}.")
        super().__init__(**kwargs)

    def available_tasks(self) -> Sequence[str]:
        return ("left", "right", "sum")

    def default_tasks(self) -> dict[str, Task]:
        return {
            "left": Task("left", num_classes=10),
            "right": Task("right", num_classes=10),
            "sum": Task("sum", num_classes=19),
        }

    @property
    def image_shape(self) -> tuple[int, int]:
        return 8 + self.max_shift, 16 - self.overlap + self.max_shift

    def _compose(self, images: np.ndarray, digits: np.ndarray, n: int, rng: np.random.Generator):
        h, w = self.image_shape
        canvas = np.zeros((n, h, w), dtype=np.float32)
        pick = rng.integers(0, len(images), size=(n, 2))  # [n, (left, right)] into this split's digits
        shifts = rng.integers(0, self.max_shift + 1, size=(n, 2, 2))
        right_x = 8 - self.overlap
        for i in range(n):
            for side, x0 in ((0, 0), (1, right_x)):
                dy, dx = shifts[i, side]
                patch = canvas[i, dy : dy + 8, x0 + dx : x0 + dx + 8]
                np.maximum(patch, images[pick[i, side]], out=patch)
        left, right = digits[pick[:, 0]], digits[pick[:, 1]]
        return canvas, pick, {"left": left, "right": right, "sum": left + right}

    def build(self):
        out = {}
        splits = _digit_splits(self.seed, self.split_fractions)
        for k, (split, (images, digit, index)) in enumerate(splits.items()):
            rng = np.random.default_rng([self.seed, k])
            canvas, pick, labels = self._compose(images, digit, self.sizes[split], rng)
            self.source_index[split] = index[pick]  # [n, 2] indices into scikit-learn's digits
            out[split] = (
                torch.from_numpy(canvas).unsqueeze(1),
                {t: _label_tensor(labels[t], self.tasks[t]) for t in self.tasks},
            )
        return out


def _label_tensor(values: np.ndarray, task: Task) -> torch.Tensor:
    if task.kind == "multiclass":
        return torch.as_tensor(values, dtype=torch.long)
    return torch.as_tensor(values, dtype=torch.float32)
