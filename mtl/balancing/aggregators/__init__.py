"""Gradient aggregators: one module per method, each a
:class:`~mtl.balancing.aggregators.base.GradientAggregator`.
"""

from mtl.balancing.aggregators.alignedmtl import AlignedMTL
from mtl.balancing.aggregators.cagrad import CAGrad
from mtl.balancing.aggregators.conflict_free import ConFIG
from mtl.balancing.aggregators.dbmtl import DBMTL
from mtl.balancing.aggregators.dualproj import DualProj
from mtl.balancing.aggregators.excessmtl import ExcessMTL
from mtl.balancing.aggregators.fairgrad import FairGrad
from mtl.balancing.aggregators.graddrop import GradDrop
from mtl.balancing.aggregators.gradvac import GradVac
from mtl.balancing.aggregators.imtlg import IMTLG
from mtl.balancing.aggregators.mgda import MGDA
from mtl.balancing.aggregators.moco import MoCo
from mtl.balancing.aggregators.modo import MoDo
from mtl.balancing.aggregators.nashmtl import NashMTL
from mtl.balancing.aggregators.pcgrad import PCGrad
from mtl.balancing.aggregators.sdmgrad import SDMGrad
from mtl.balancing.aggregators.upgrad import UPGrad

__all__ = [
    "AlignedMTL",
    "CAGrad",
    "ConFIG",
    "DBMTL",
    "DualProj",
    "ExcessMTL",
    "FairGrad",
    "GradDrop",
    "GradVac",
    "IMTLG",
    "MGDA",
    "MoCo",
    "MoDo",
    "NashMTL",
    "PCGrad",
    "SDMGrad",
    "UPGrad",
]
