"""The interface of structure-sharing modules.

A sharing module wraps a backbone and maps an input batch to one feature vector per task. It also
names its *shared representation*: the tensor that every task's features depend on and that is
computed by shared parameters only. Objective-sharing methods can take per-task gradients with
respect to it instead of the shared parameters (``balancer.space=representation``), which is far
cheaper. A module without such a tensor returns ``None`` and the engine says so.
"""

from __future__ import annotations

import abc
from typing import NamedTuple, Sequence

from torch import Tensor, nn

from mtl.backbones.base import Backbone


class SharedFeatures(NamedTuple):
    """Output of a sharing module.

    Attributes:
        features: ``{task: Tensor[B, out_features]}`` for the requested tasks.
        representation: the shared representation (any shape ``[B, ...]``), or None.
    """

    features: dict[str, Tensor]
    representation: Tensor | None


class Sharing(nn.Module, abc.ABC):
    """Base class for structure sharing.

    Args:
        backbone: any :class:`~mtl.backbones.base.Backbone`.
        tasks: names of the tasks the module serves.

    Subclasses set ``out_features`` (width of each task's features) and implement ``forward``.
    """

    backbone: Backbone
    out_features: int

    def __init__(self, backbone: Backbone, tasks: Sequence[str]) -> None:
        super().__init__()
        self.backbone = backbone
        self.task_names = list(tasks)

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters used by every task (the ones objective sharing balances)."""
        return [p for p in self.parameters() if p.requires_grad]

    def regularization(self) -> Tensor | None:
        """The structure's own loss term from the last training-mode forward pass (DSelect-k's
        gate regularizer), added to the task-specific parameters' objective; None by default."""
        return None

    @abc.abstractmethod
    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> SharedFeatures:
        """Features of ``tasks`` (default: all served tasks) and the shared representation."""
