"""Objective sharing.

``weightings/`` holds the loss weightings (task losses in, task weights out; base class in
``weightings/base.py``), ``aggregators/`` the gradient aggregators (task Jacobian in, one update
out; base class in ``aggregators/base.py``), ``jacobian.py`` the Jacobian engine, ``gramian.py`` the Gramian engine (weights from ``J J^T``
without holding ``J``),
``backward.py`` the balanced backward that training and the benchmarks both call, and
``solvers.py`` the small task-space solvers the aggregators share.
"""

from mtl.balancing.aggregators.base import GradientAggregator
from mtl.balancing.backward import BackwardStats, balanced_backward
from mtl.balancing.gramian import GramianEngine
from mtl.balancing.jacobian import JacobianEngine
from mtl.balancing.aggregators import (
    DBMTL,
    IMTLG,
    MGDA,
    AlignedMTL,
    CAGrad,
    ConFIG,
    DualProj,
    ExcessMTL,
    FairGrad,
    GradDrop,
    GradVac,
    MoCo,
    MoDo,
    NashMTL,
    PCGrad,
    SDMGrad,
    UPGrad,
)
from mtl.balancing.weightings.base import LossWeighting
from mtl.balancing.weightings import DWA, EW, FAMO, GLS, IMTLL, RLW, STCH, UW, GradNorm, Static

__all__ = [
    "DBMTL", "DWA", "EW", "FAMO", "GLS", "IMTLG", "IMTLL", "MGDA", "RLW", "STCH", "UW",
    "AlignedMTL", "CAGrad", "ConFIG", "DualProj", "FairGrad", "GradDrop", "GradNorm",
    "GradVac", "GradientAggregator", "LossWeighting", "NashMTL", "PCGrad", "Static", "UPGrad",
    "BackwardStats", "GramianEngine", "JacobianEngine", "balanced_backward",
    "ExcessMTL", "MoCo", "MoDo", "SDMGrad",
]
