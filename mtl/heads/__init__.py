"""Task heads that read a feature map (dense, per-pixel tasks).

Every head here is called as ``head(features, size=(H, W))``: see :mod:`mtl.heads.dense`.
"""

from mtl.heads.dense import ASPPHead, ConvHead

__all__ = ["ASPPHead", "ConvHead"]
