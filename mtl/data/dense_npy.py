"""Dense multi-task data stored as one ``.npy`` file per example and label: the layout of the
preprocessed NYUv2 and Cityscapes used by MTAN and LibMTL.

::

    <root>/<split>/image/<i>.npy    [H, W, 3]  float, channels last
    <root>/<split>/label/<i>.npy    [H, W]     class index, -1 where unlabelled   (segmentation)
    <root>/<split>/depth/<i>.npy    [H, W, 1]  depth, 0 where unlabelled          (depth)
    <root>/<split>/normal/<i>.npy   [H, W, 3]  unit normal, 0 where unlabelled    (normal)

with ``<split>`` ``train`` or ``val`` (these sets have no separate test split: LibMTL evaluates on
``val``) and ``<i>`` running over ``0 .. N-1``. NYUv2 (795 train / 654 val) is 288x384 with 13
classes and all three tasks; Cityscapes (2975 / 500) is 128x256 with 7 classes, ``image``, ``label``
and ``depth`` only. :data:`KNOWN_LAYOUTS` records both.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mtl.data.base import EpochShuffleSampler, MultiTaskDataModule
from mtl.tasks import Task

#: Folder holding each task's labels.
TASK_FOLDERS: dict[str, str] = {"segmentation": "label", "depth": "depth", "normal": "normal"}

#: The two public preprocessed sets in this layout.
KNOWN_LAYOUTS: dict[str, dict] = {
    "nyuv2": {
        "image_size": (288, 384),
        "num_classes": 13,
        "tasks": ("segmentation", "depth", "normal"),
        "sizes": {"train": 795, "val": 654},
    },
    "cityscapes": {
        "image_size": (128, 256),
        "num_classes": 7,
        "tasks": ("segmentation", "depth"),
        "sizes": {"train": 2975, "val": 500},
    },
}

_INDEX_NAME = re.compile(r"^(\d+)\.npy$")


def _indices(folder: Path) -> list[int]:
    """Sorted example indices of ``folder``'s ``<i>.npy`` files."""
    names = [n for n in os.listdir(folder) if n.endswith(".npy")]
    bad = [n for n in names if not _INDEX_NAME.match(n)]
    if bad:
        raise ValueError(
            f"{folder} holds {bad[0]!r}: files must be named <index>.npy (0.npy, 1.npy, ...)."
        )
    return sorted(int(n[:-4]) for n in names)


def random_scale_crop(
    image: Tensor,
    labels: dict[str, Tensor],
    scales: Sequence[float] = (1.0, 1.2, 1.5),
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Zoom in by a random factor from ``scales``: crop a random ``H/s x W/s`` window and resize it
    back to ``H x W`` (the augmentation of MTAN's and LibMTL's NYUv2 examples).

    The image and the normals are resized bilinearly (``align_corners=True``), the labels and depth
    with nearest neighbours; depth is divided by ``s`` (the zoomed view looks ``s`` times closer).
    Resized normals are renormalised (zero, unlabelled vectors stay zero).

    Args:
        image: ``[3, H, W]``.
        labels: any of ``segmentation [H, W]``, ``depth [1, H, W]``, ``normal [3, H, W]``.
    Returns:
        ``(image, labels)`` of the same shapes.
    """
    height, width = image.shape[-2:]
    s = float(scales[int(torch.randint(len(scales), (1,), generator=generator))])
    h, w = int(height / s), int(width / s)
    if (h, w) == (height, width):
        return image, dict(labels)
    i = int(torch.randint(height - h + 1, (1,), generator=generator))
    j = int(torch.randint(width - w + 1, (1,), generator=generator))
    size = (height, width)

    def resize(x: Tensor, mode: str) -> Tensor:
        window = x[None, :, i : i + h, j : j + w]
        if mode == "bilinear":
            return F.interpolate(window, size=size, mode=mode, align_corners=True)[0]
        return F.interpolate(window, size=size, mode=mode)[0]

    out = {}
    for task, y in labels.items():
        if task == "segmentation":
            out[task] = resize(y[None].float(), "nearest")[0].to(y.dtype)
        elif task == "depth":
            out[task] = resize(y, "nearest") / s
        else:
            normal = resize(y, "bilinear")
            norm = torch.linalg.vector_norm(normal, dim=0, keepdim=True)
            out[task] = torch.where(norm > 0, normal / norm.clamp_min(1e-12), normal)
    return resize(image, "bilinear"), out


def horizontal_flip(image: Tensor, labels: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Mirror an example left-right; the normals' ``x`` component changes sign.

    Args:
        image: ``[3, H, W]``; labels: as in :func:`random_scale_crop`.
    """
    out = {task: y.flip(-1) for task, y in labels.items()}
    if "normal" in out:
        out["normal"] = out["normal"].clone()
        out["normal"][0] = -out["normal"][0]
    return image.flip(-1), out


class DenseNpyDataset(Dataset):
    """One split of a dense multi-task set in the per-file ``.npy`` layout (module docstring).

    ``dataset[i]`` is ``(image [3, H, W] float32, {task: label})`` with, for the requested tasks,
    ``segmentation [H, W] int64`` (-1 unlabelled), ``depth [1, H, W] float32`` (0 unlabelled) and
    ``normal [3, H, W] float32`` (zero vector unlabelled).

    The folders and file names are checked when the dataset is built, and the shapes of the first
    example; every example's shapes are checked when it is loaded.

    Args:
        root: folder holding ``train/`` and ``val/``.
        split: sub-folder to read (``train`` or ``val``).
        tasks: any of ``segmentation``, ``depth``, ``normal``.
        augment: apply :func:`random_scale_crop` and, with probability 1/2, :func:`horizontal_flip`
            (as LibMTL's NYUv2 example with ``--aug``); use it for training only.
        scales: zoom factors of the random scale-crop.
        generator: random generator of the augmentation (default: torch's global one, which
            Lightning's ``seed_everything(workers=True)`` seeds per worker).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        tasks: Sequence[str] = ("segmentation", "depth", "normal"),
        augment: bool = False,
        scales: Sequence[float] = (1.0, 1.2, 1.5),
        generator: torch.Generator | None = None,
    ) -> None:
        self.root = Path(os.path.expanduser(str(root)))
        self.split = str(split)
        self.tasks = tuple(tasks)
        self.augment = bool(augment)
        self.scales = tuple(float(s) for s in scales)
        self.generator = generator
        unknown = [t for t in self.tasks if t not in TASK_FOLDERS]
        if unknown or not self.tasks:
            raise ValueError(
                f"DenseNpyDataset: unknown task(s) {unknown or '(none given)'}; choose among "
                f"{list(TASK_FOLDERS)}."
            )
        if not self.scales or min(self.scales) < 1.0:
            raise ValueError(f"DenseNpyDataset: scales must be >= 1 (zoom in), got {list(scales)}.")
        self.path = self.root / self.split
        if not self.path.is_dir():
            present = []
            if self.root.is_dir():
                present = sorted(p.name for p in self.root.iterdir() if p.is_dir())
            hint = ""
            if self.split == "test":
                hint = " (this layout has train/ and val/; evaluate on split='val')"
            raise FileNotFoundError(
                f"DenseNpyDataset: split folder {self.path} does not exist{hint}; "
                f"{self.root} holds {present or 'no folders'}."
            )
        self.folders = {"image": self.path / "image"}
        self.folders.update({t: self.path / TASK_FOLDERS[t] for t in self.tasks})
        for name, folder in self.folders.items():
            if not folder.is_dir():
                available = [t for t, f in TASK_FOLDERS.items() if (self.path / f).is_dir()]
                raise FileNotFoundError(
                    f"DenseNpyDataset: folder {folder} is missing (needed for "
                    f"{'the images' if name == 'image' else f'task {name!r}'}); the tasks "
                    f"{self.path} provides are {available}."
                )
        self.indices = _indices(self.folders["image"])
        if not self.indices:
            raise FileNotFoundError(f"DenseNpyDataset: {self.folders['image']} holds no .npy files.")
        for name, folder in self.folders.items():
            if name == "image":
                continue
            found = _indices(folder)
            if found != self.indices:
                missing = sorted(set(self.indices) - set(found))
                extra = sorted(set(found) - set(self.indices))
                raise ValueError(
                    f"DenseNpyDataset: {folder} has {len(found)} files but "
                    f"{self.folders['image']} has {len(self.indices)}"
                    + (f"; missing {missing[0]}.npy" if missing else "")
                    + (f"; unexpected {extra[0]}.npy" if extra else "")
                    + ". Every image needs one file per task, with the same name."
                )
        first = np.load(self.folders["image"] / f"{self.indices[0]}.npy", mmap_mode="r")
        if first.ndim != 3 or first.shape[-1] != 3:
            raise ValueError(self._shape_error("image", self.indices[0], first.shape, "[H, W, 3]"))
        self.image_size: tuple[int, int] = (int(first.shape[0]), int(first.shape[1]))
        self._load(0)  # fail now, not in a worker, if the first example is malformed

    def __len__(self) -> int:
        return len(self.indices)

    def _file(self, name: str, index: int) -> Path:
        return self.folders[name] / f"{index}.npy"

    def _shape_error(self, name: str, index: int, shape, expected: str) -> str:
        return (
            f"DenseNpyDataset: {self._file(name, index)} has shape {tuple(shape)}, expected "
            f"{expected} (channels last, the same height and width for every file of the split)."
        )

    def _read(self, name: str, index: int) -> np.ndarray:
        h, w = self.image_size
        array = np.load(self._file(name, index))
        if name == "image":
            ok, expected = array.shape == (h, w, 3), f"[{h}, {w}, 3]"
        elif name == "segmentation":
            ok, expected = array.shape == (h, w), f"[{h}, {w}]"
        elif name == "depth":
            ok, expected = array.shape in ((h, w, 1), (h, w)), f"[{h}, {w}, 1]"
        else:
            ok, expected = array.shape == (h, w, 3), f"[{h}, {w}, 3]"
        if not ok:
            raise ValueError(self._shape_error(name, index, array.shape, expected))
        return array

    def _load(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        index = self.indices[i]
        image = torch.from_numpy(np.ascontiguousarray(np.moveaxis(self._read("image", index), -1, 0)))
        labels: dict[str, Tensor] = {}
        for task in self.tasks:
            array = self._read(task, index)
            if task == "segmentation":
                labels[task] = torch.from_numpy(array.astype(np.int64))
            elif task == "depth":
                depth = array.reshape(self.image_size)[None]
                labels[task] = torch.from_numpy(depth.astype(np.float32))
            else:
                labels[task] = torch.from_numpy(np.moveaxis(array, -1, 0).astype(np.float32))
        return image.float(), labels

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        image, labels = self._load(i)
        if self.augment:
            image, labels = random_scale_crop(image, labels, self.scales, self.generator)
            if float(torch.rand((), generator=self.generator)) < 0.5:
                image, labels = horizontal_flip(image, labels)
        return image, labels


class _TaskView(Dataset):
    """A :class:`DenseNpyDataset` with only some of its tasks' labels in each example."""

    def __init__(self, dataset: DenseNpyDataset, tasks: Sequence[str]) -> None:
        self.dataset, self.tasks = dataset, list(tasks)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        image, labels = self.dataset[i]
        return image, {t: labels[t] for t in self.tasks}


class DenseNpyDataModule(MultiTaskDataModule):
    """NYUv2 or Cityscapes in the preprocessed per-file ``.npy`` layout (module docstring).

    ``data=nyuv2 data.root=<dir>`` and ``data=cityscapes data.root=<dir>``. Batches are
    ``(image [B, 3, H, W], {task: label})`` with the labels of :class:`DenseNpyDataset`. Examples
    are read from disk as they are needed (nothing is held in memory).

    Splits: ``train`` is ``<root>/train`` (augmented when ``augment``: random scale-crop and
    horizontal flip, as LibMTL's NYUv2 example with ``--aug``); ``val`` and ``test`` are both
    ``<root>/val``: these sets have no separate test split, and MTAN and LibMTL report on ``val``.

    Args:
        root: the folder holding ``train/`` and ``val/``.
        layout: ``nyuv2`` or ``cityscapes`` (:data:`KNOWN_LAYOUTS`): the default tasks and their
            number of classes, and a check that the images have the layout's size; None: no
            check, and ``tasks`` must be given.
        augment: augment the training split.
        scales: zoom factors of the random scale-crop.
        pin_memory, drop_last: passed to the training DataLoader (LibMTL drops the last
            incomplete batch).
        **kwargs: :class:`~mtl.data.base.MultiTaskDataModule`'s (``tasks``, ``batch_size``,
            ``eval_batch_size``, ``seed``, ``num_workers``...). ``label_budget`` is not supported.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        layout: str | None = None,
        augment: bool = False,
        scales: Sequence[float] = (1.0, 1.2, 1.5),
        pin_memory: bool = False,
        drop_last: bool = False,
        **kwargs,
    ) -> None:
        if layout is not None and layout not in KNOWN_LAYOUTS:
            raise ValueError(f"data.layout must be one of {sorted(KNOWN_LAYOUTS)} or null, got '{layout}'.")
        self.root = Path(os.path.expanduser(str(root)))
        self.layout = layout
        self.augment = bool(augment)
        self.scales = tuple(float(s) for s in scales)
        self.pin_memory = bool(pin_memory)
        self.drop_last = bool(drop_last)
        self.datasets: dict[str, DenseNpyDataset] = {}
        super().__init__(**kwargs)
        if self.label_budget:
            raise ValueError("data.label_budget is not supported by the .npy datasets (NYUv2, Cityscapes).")

    def available_tasks(self) -> Sequence[str]:
        return KNOWN_LAYOUTS[self.layout]["tasks"] if self.layout else tuple(TASK_FOLDERS)

    def default_tasks(self) -> dict[str, Task]:
        if self.layout is None:
            raise ValueError("data.tasks must be set when data.layout is null.")
        spec = KNOWN_LAYOUTS[self.layout]
        tasks = {"segmentation": Task("segmentation", kind="segmentation", num_classes=spec["num_classes"])}
        tasks["depth"] = Task("depth", kind="depth")
        if "normal" in spec["tasks"]:
            tasks["normal"] = Task("normal", kind="normal")
        return tasks

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        unknown = [t for t, task in self.tasks.items() if task.kind not in TASK_FOLDERS or t != task.kind]
        if unknown:
            raise ValueError(
                f"data.tasks: the .npy layout labels the tasks {list(TASK_FOLDERS)} (each named after its "
                f"kind); got {[(t, self.tasks[t].kind) for t in unknown]}."
            )
        names = list(self.tasks)
        train = DenseNpyDataset(self.root, "train", names, augment=self.augment, scales=self.scales)
        val = DenseNpyDataset(self.root, "val", names)
        if self.layout is not None:
            expected = tuple(KNOWN_LAYOUTS[self.layout]["image_size"])
            for ds in (train, val):
                if ds.image_size != expected:
                    raise ValueError(
                        f"data.layout={self.layout}: images in {ds.path} are {ds.image_size[0]}x"
                        f"{ds.image_size[1]}, expected {expected[0]}x{expected[1]}; set data.layout=null "
                        f"for another size."
                    )
        self.datasets = {"train": train, "val": val, "test": val}

    @property
    def input_shape(self) -> tuple[int, ...]:
        self.setup()
        return (3, *self.datasets["train"].image_size)

    def dataset(self, split: str, tasks: Sequence[str] | None = None) -> Dataset:
        """The split with the labels of ``tasks`` (default: the active tasks)."""
        self.setup()
        return _TaskView(self.datasets[split], self.active_tasks if tasks is None else list(tasks))

    def _loader(self, split: str, shuffle: bool, tasks: Sequence[str] | None = None) -> DataLoader:
        ds = self.dataset(split, tasks)
        train = split == "train"
        return DataLoader(
            ds,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=EpochShuffleSampler(len(ds), self.seed, self._samples_per_epoch(len(ds))) if shuffle else None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            drop_last=self.drop_last and train,
            persistent_workers=self.num_workers > 0,
        )


__all__ = [
    "DenseNpyDataModule",
    "DenseNpyDataset",
    "KNOWN_LAYOUTS",
    "TASK_FOLDERS",
    "horizontal_flip",
    "random_scale_crop",
]
