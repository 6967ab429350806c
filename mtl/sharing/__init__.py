"""Structure sharing: how the backbone's computation is shared among tasks."""

from mtl.sharing.base import SharedFeatures, Sharing
from mtl.sharing.cross_stitch import CrossStitch
from mtl.sharing.hard import HardSharing
from mtl.sharing.moe import CGC, MMoE, OMoE, PLE, DSelectK
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
