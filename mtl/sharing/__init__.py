"""Structure sharing: how the backbone's computation is shared among tasks."""

from mtl.sharing.base import SharedFeatures, Sharing
from mtl.sharing.cross_stitch import CrossStitch
from mtl.sharing.hard import HardSharing
from mtl.sharing.dselect_k import DSelectK
from mtl.sharing.mmoe import MMoE, OMoE
from mtl.sharing.ple import CGC, PLE
from mtl.sharing.mtan import MTAN

__all__ = [
    "CGC",
    "CrossStitch",
    "DSelectK",
    "HardSharing",
    "MMoE",
    "MTAN",
    "OMoE",
    "PLE",
    "SharedFeatures",
    "Sharing",
]
