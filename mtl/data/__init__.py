"""DataModules yielding ``(x, {task: y})`` batches; no downloads."""

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
