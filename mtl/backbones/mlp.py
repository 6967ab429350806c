"""Multi-layer perceptron backbone."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from mtl.backbones.base import Backbone, flat_features


class MLP(Backbone):
    """Flattens its input, then ``Linear -> activation (-> dropout)`` per hidden layer.

    Each hidden layer is one stage.

    Args:
        input_shape: shape of one example; it is flattened (``(64,)``, or ``(8, 8)`` for 8x8 images).
        hidden: widths of the hidden layers; ``out_features`` is the last one.
        activation: ``relu``, ``gelu`` or ``tanh``.
        dropout: dropout after each activation.
        norm: add ``LayerNorm`` before each activation.
    """

    def __init__(
        self,
        input_shape: Sequence[int] | None = None,
        hidden: Sequence[int] = (128, 64),
        activation: str = "relu",
        dropout: float = 0.0,
        norm: bool = False,
    ) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("backbone.hidden must list at least one layer width.")
        acts = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}
        if activation not in acts:
            raise ValueError(f"backbone.activation must be one of {sorted(acts)}, got '{activation}'.")
        self.in_features = flat_features(input_shape, "mlp")
        stages = []
        width = self.in_features
        for i, h in enumerate(hidden):
            layers: list[nn.Module] = [nn.Flatten(1)] if i == 0 else []
            layers.append(nn.Linear(width, int(h)))
            if norm:
                layers.append(nn.LayerNorm(int(h)))
            layers.append(acts[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            stages.append(nn.Sequential(*layers))
            width = int(h)
        self.stages = nn.ModuleList(stages)
        self.stage_channels = [int(h) for h in hidden]
        self.out_features = width
