"""DataModules yielding ``(x, {task: y})`` batches; no downloads.

``base.py`` holds :class:`MultiTaskDataModule` (tasks, roles, label budgets, the epoch-seeded
sampler); ``digits.py`` (8x8 digits and multidigits pairs), ``synthetic.py`` (the MMoE protocol),
``csv.py`` and ``combined.py`` (several datasets in one step) are DataModules; ``scenes.py``
renders the embedded dense benchmark (:class:`ScenesDataModule`, ``data=scenes``) and
``dense_npy.py`` reads the NYUv2/Cityscapes ``.npy`` layout (:class:`DenseNpyDataModule`,
``data=nyuv2`` and ``data=cityscapes``).
"""

from mtl.data.base import ArrayDataset, MultiTaskDataModule
from mtl.data.combined import CombinedDataModule
from mtl.data.csv import CSVDataModule
from mtl.data.dense_npy import DenseNpyDataModule, DenseNpyDataset
from mtl.data.digits import DigitsDataModule, MultiDigitsDataModule
from mtl.data.scenes import ScenesDataModule, render_scenes
from mtl.data.synthetic import SyntheticDataModule, make_synthetic

__all__ = [
    "ArrayDataset",
    "CSVDataModule",
    "CombinedDataModule",
    "DenseNpyDataModule",
    "DenseNpyDataset",
    "DigitsDataModule",
    "MultiDigitsDataModule",
    "MultiTaskDataModule",
    "ScenesDataModule",
    "SyntheticDataModule",
    "make_synthetic",
    "render_scenes",
]
