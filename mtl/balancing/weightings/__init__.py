"""Loss weightings: task losses ``[T]`` in, task weights ``[T]`` out (one module per method)."""

from mtl.balancing.weightings.dwa import DWA
from mtl.balancing.weightings.ew import EW
from mtl.balancing.weightings.famo import FAMO
from mtl.balancing.weightings.gls import GLS
from mtl.balancing.weightings.gradnorm import GradNorm
from mtl.balancing.weightings.imtll import IMTLL
from mtl.balancing.weightings.rlw import RLW
from mtl.balancing.weightings.static import Static
from mtl.balancing.weightings.stch import STCH
from mtl.balancing.weightings.uw import UW

__all__ = ["DWA", "EW", "FAMO", "GLS", "GradNorm", "IMTLL", "RLW", "STCH", "Static", "UW"]
