"""Metrics the built-in task kinds use beyond torchmetrics' own: the dense (per-pixel) ones.

See :mod:`mtl.metrics.dense` for the protocol and for how each metric relates to MTAN's and
LibMTL's reference code.
"""

from mtl.metrics.dense import (
    ANGLE_THRESHOLDS,
    DENSE_METRIC_DIRECTIONS,
    DepthErrors,
    NormalErrors,
    SegmentationMetrics,
    angular_error,
    dense_metric_direction,
)

__all__ = [
    "ANGLE_THRESHOLDS",
    "DENSE_METRIC_DIRECTIONS",
    "DepthErrors",
    "NormalErrors",
    "SegmentationMetrics",
    "angular_error",
    "dense_metric_direction",
]
