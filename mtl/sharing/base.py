"""The interface of structure-sharing modules.

A sharing module wraps a backbone and maps an input batch to one feature vector per task. It also
names its *shared representation*: the tensor that every task's features depend on and that is
computed by shared parameters only. Objective-sharing methods can take per-task gradients with
respect to it instead of the shared parameters (``balancer.engine.space=representation``), which is far
cheaper. A module without such a tensor returns ``None`` and the engine says so.

**Tasks whose head reads a feature map** (the dense kinds: segmentation, depth, normal) are named
in ``map_tasks`` when the module is built. For them ``features[task]`` is a feature map
``[B, feature_channels, h, w]`` (the last stage's, as the architecture transforms it) instead of
a pooled vector; every other task keeps its vector ``[B, out_features]``, computed exactly as
without map tasks. Where a module's representation is the backbone's pooled output, it becomes
the last stage's feature map whenever a map task is among the requested ones (the pooled vector
is a parameter-free function of it, so it stays exact). Architectures that mix pooled vectors
(the mixtures of experts) refuse map tasks with an error naming those that serve them.
"""

from __future__ import annotations

import abc
from typing import NamedTuple, Sequence

from torch import Tensor, nn

from mtl.backbones.base import Backbone


class SharedFeatures(NamedTuple):
    """Output of a sharing module.

    Attributes:
        features: ``{task: Tensor[B, out_features]}`` for the requested tasks (``[B, C, h, w]``
            feature maps for the module's ``map_tasks``).
        representation: the shared representation (any shape ``[B, ...]``), or None.
    """

    features: dict[str, Tensor]
    representation: Tensor | None


class Sharing(nn.Module, abc.ABC):
    """Base class for structure sharing.

    Args:
        backbone: any :class:`~mtl.backbones.base.Backbone`.
        tasks: names of the tasks the module serves.
        map_tasks: the tasks among them whose head reads a feature map (see the module doc).

    Subclasses set ``out_features`` (width of each vector task's features) and implement
    ``forward``; ``feature_channels`` is the channel count of the map tasks' feature maps.
    """

    backbone: Backbone
    out_features: int

    def __init__(self, backbone: Backbone, tasks: Sequence[str], map_tasks: Sequence[str] = ()) -> None:
        super().__init__()
        self.backbone = backbone
        self.task_names = list(tasks)
        self.map_tasks = list(map_tasks)
        unknown = [t for t in self.map_tasks if t not in self.task_names]
        if unknown:
            raise ValueError(f"{type(self).__name__}: map_tasks {unknown} are not among its tasks {self.task_names}.")

    @property
    def feature_channels(self) -> int:
        """Channels of the feature maps that map tasks read: the backbone's last stage's."""
        return int(self.backbone.stage_channels[-1])

    def refuse_map_tasks(self, why: str) -> None:
        """Raise the error of an architecture that cannot serve map tasks (if it has any)."""
        if self.map_tasks:
            raise ValueError(
                f"{type(self).__name__} cannot serve tasks whose head reads a feature map "
                f"({self.map_tasks}): {why} Use sharing=hard, sharing=mtan or sharing=cross_stitch "
                f"for dense tasks."
            )

    def check_feature_map(self, h: Tensor) -> Tensor:
        """``h`` if it is a feature map ``[B, C, h, w]``; otherwise a clear error."""
        if h.dim() != 4:
            raise ValueError(
                f"Tasks {self.map_tasks} read a feature map [B, C, h, w], but the backbone "
                f"{type(self.backbone).__name__}'s last stage outputs shape {tuple(h.shape)}. Use a "
                f"convolutional backbone (backbone=cnn or backbone=resnet) for dense tasks."
            )
        return h

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
