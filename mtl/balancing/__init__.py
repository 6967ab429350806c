"""Objective sharing: loss weightings (losses in, weights out) and gradient aggregators (Jacobian in,
one update out)."""

from mtl.balancing.aggregator import GradientAggregator
from mtl.balancing.aggregators import (
    DBMTL,
    IMTLG,
    MGDA,
    AlignedMTL,
    CAGrad,
    ConFIG,
    DualProj,
    FairGrad,
    GradDrop,
    GradVac,
    NashMTL,
    PCGrad,
    UPGrad,
)
from mtl.balancing.weighting import LossWeighting
from mtl.balancing.weightings import DWA, EW, FAMO, GLS, IMTLL, RLW, STCH, UW, GradNorm, Static

__all__ = [
    "DBMTL", "DWA", "EW", "FAMO", "GLS", "IMTLG", "IMTLL", "MGDA", "RLW", "STCH", "UW",
    "AlignedMTL", "CAGrad", "ConFIG", "DualProj", "FairGrad", "GradDrop", "GradNorm",
    "GradVac", "GradientAggregator", "LossWeighting", "NashMTL", "PCGrad", "Static", "UPGrad",
]
