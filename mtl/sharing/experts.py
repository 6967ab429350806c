"""What the mixture-of-experts architectures share: experts on top of the backbone, and mixing.

Used by :mod:`mtl.sharing.mmoe` (MMoE, one-gate MoE), :mod:`mtl.sharing.ple` (CGC, PLE) and
:mod:`mtl.sharing.dselect_k`.

All of them put the experts *on top of* the backbone: the backbone is the shared bottom, its pooled
output ``rep = backbone(x)`` (``[B, backbone.out_features]``) is the input of every expert and every
gate, and each task's features are a gated mixture of expert outputs (``[B, expert_out]``). So
``rep`` is an exact shared representation: it is computed by shared parameters only and everything
task-specific lies downstream of it; it is returned as ``SharedFeatures.representation``. Gradients
with respect to ``rep`` cover the backbone; the experts above it are shared too and are then
updated with the plain sum of the task gradients.

An expert is an MLP: ``Linear -> ReLU`` for each width in ``expert_hidden`` and then for
``expert_out`` (the paper's experts are ReLU layers), so expert outputs are non-negative.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from mtl.sharing.base import Sharing

__all__ = ["check_tasks", "make_expert", "mix"]


def make_expert(in_features: int, hidden: Sequence[int], out_features: int) -> nn.Sequential:
    """An expert MLP ``[B, in_features] -> [B, out_features]``: ``Linear -> ReLU`` per layer."""
    layers: list[nn.Module] = []
    width = int(in_features)
    for h in [*hidden, out_features]:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        width = int(h)
    return nn.Sequential(*layers)


def mix(weights: Tensor, expert_outputs: Tensor) -> Tensor:
    """``weights [B, E]``, ``expert_outputs [B, E, D]`` -> ``[B, D]``."""
    return torch.einsum("be,bed->bd", weights, expert_outputs)


def check_tasks(module: Sharing, names: Sequence[str]) -> None:
    missing = [t for t in names if t not in module.task_names]
    if missing:
        raise KeyError(f"{type(module).__name__} does not serve task(s) {missing}; it has {module.task_names}.")
