"""Losses of the dense (per-pixel) tasks: segmentation, depth and surface normals.

Plain functions of tensors. Each averages over the labelled pixels of the batch (every labelled
pixel weighs the same, whichever image it is in), and returns ``0`` with a graph when the batch has
no labelled pixel, so a balancer still sees a differentiable loss for every task. Each is a masked
sum over a count, so none makes the host wait for the device.

Unlabelled pixels follow the conventions of the NYUv2 / Cityscapes data used by MTAN and LibMTL:
segmentation label ``ignore_index`` (-1), depth 0 (NaN is accepted too), normal the zero vector.
The metrics in :mod:`mtl.metrics.dense` use the same masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mtl.metrics.dense import as_depth_map, check_normal_shapes, depth_label_mask, normal_label_mask


def segmentation_loss(logits: Tensor, target: Tensor, ignore_index: int = -1) -> Tensor:
    """Cross-entropy averaged over the labelled pixels.

    Args:
        logits: ``[B, C, H, W]``.
        target: ``[B, H, W]`` integer classes in ``[0, C)``, ``ignore_index`` where unlabelled.
        ignore_index: target value of unlabelled pixels.
    Returns:
        scalar tensor (0 with a graph when no pixel is labelled).
    """
    if logits.dim() != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            "segmentation_loss: logits must be [B, C, H, W] and target [B, H, W], got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}."
        )
    target = target.long()
    count = (target != ignore_index).sum()
    # a sum over the labelled pixels over their count: no host sync, and 0 with a graph when none is
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum") / count.clamp_min(1)


def depth_loss(pred: Tensor, target: Tensor) -> Tensor:
    """L1 error averaged over the labelled pixels (target finite and non-zero).

    Args:
        pred: ``[B, 1, H, W]`` or ``[B, H, W]``.
        target: ``[B, 1, H, W]`` or ``[B, H, W]``; 0 or NaN where unlabelled.
    Returns:
        scalar tensor (0 with a graph when no pixel is labelled).
    """
    p, t = as_depth_map(pred, "depth_loss pred"), as_depth_map(target, "depth_loss target")
    if p.shape != t.shape:
        raise ValueError(
            f"depth_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} cover "
            "different pixels."
        )
    mask = depth_label_mask(t)
    # unlabelled targets replaced before subtracting: a NaN would otherwise reach the gradient
    clean = torch.where(mask, t, 0.0).to(p.dtype)
    return torch.where(mask, (p - clean).abs(), 0.0).sum() / mask.sum().clamp_min(1)


def normal_loss(pred: Tensor, target: Tensor) -> Tensor:
    """``1 - cos(angle)`` between predicted and target normals, averaged over labelled pixels.

    Both vectors are normalised, so the loss is in ``[0, 2]`` and depends only on directions.
    (MTAN and LibMTL normalise the prediction only and take the target as unit length, which the
    preprocessed NYUv2 normals are; the two agree there, and this one stays exact after a bilinear
    resize of the targets.)

    Args:
        pred: ``[B, 3, H, W]`` of any length.
        target: ``[B, 3, H, W]``; the zero vector where unlabelled.
    Returns:
        scalar tensor (0 with a graph when no pixel is labelled).
    """
    check_normal_shapes(pred, target)
    mask = normal_label_mask(target)
    clean = torch.where(mask[:, None], target, 0.0).to(pred.dtype)
    cos = (F.normalize(pred, dim=1) * F.normalize(clean, dim=1)).sum(dim=1)  # [B, H, W]
    return torch.where(mask, 1.0 - cos, 0.0).sum() / mask.sum().clamp_min(1)


__all__ = ["depth_loss", "normal_loss", "segmentation_loss"]
