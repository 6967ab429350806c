"""DataModules yielding ``(x, {task: y})`` batches; no downloads.

``base.py`` holds :class:`MultiTaskDataModule` (tasks, roles, label budgets, the epoch-seeded
sampler); ``digits.py`` (8x8 digits and multidigits pairs), ``synthetic.py`` (the MMoE protocol),
``csv.py`` and ``combined.py`` (several datasets in one step) are DataModules; ``scenes.py``
renders the embedded dense benchmark and ``dense_npy.py`` reads the NYUv2/Cityscapes ``.npy``
layout.
"""

from mtl.data.base import ArrayDataset, MultiTaskDataModule
from mtl.data.combined import CombinedDataModule
from mtl.data.csv import CSVDataModule
from mtl.data.digits import DigitsDataModule, MultiDigitsDataModule
from mtl.data.synthetic import SyntheticDataModule, make_synthetic

__all__ = [
    "ArrayDataset",
    "CSVDataModule",
    "CombinedDataModule",
    "DigitsDataModule",
    "MultiDigitsDataModule",
    "MultiTaskDataModule",
    "SyntheticDataModule",
    "make_synthetic",
]
