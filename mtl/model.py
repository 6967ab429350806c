"""MultiTaskModel: backbone + structure sharing + one head per task.

Two kinds of heads, one model: a task whose head reads a vector (``task.feature_map`` false: the
classification and regression kinds) gets the sharing module's pooled features ``[B, F]``; a task
whose head reads a feature map (the dense kinds, or a custom head with ``feature_map=True``) gets
the last stage's feature map ``[B, C, h, w]`` and is called as ``head(features, size=(H, W))``, the
input's spatial size, to which it upsamples its prediction.
"""

from __future__ import annotations

import inspect
from typing import Callable, Iterable, Sequence

from torch import Tensor, nn

from mtl.backbones.base import Backbone
from mtl.heads.dense import ConvHead
from mtl.sharing.base import Sharing
from mtl.sharing.hard import HardSharing
from mtl.tasks import Task, as_task_dict


def make_head(in_features: int, task: Task, hidden: Sequence[int] = ()) -> nn.Module:
    """A vector task head: optional hidden ``Linear -> ReLU`` layers, then ``Linear`` to the task's size."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        width = int(h)
    layers.append(nn.Linear(width, task.output_size))
    return nn.Sequential(*layers) if len(layers) > 1 else layers[0]


class MultiTaskModel(nn.Module):
    """One shared backbone, a sharing structure, and a head per task.

    Args:
        backbone: a :class:`~mtl.backbones.base.Backbone`.
        tasks: the tasks (a list of :class:`~mtl.tasks.Task` or ``{name: Task}``).
        sharing: a callable ``(backbone=..., tasks=[names]) -> Sharing``; defaults to
            :class:`~mtl.sharing.hard.HardSharing`. Hydra configs pass a ``_partial_`` class. When
            some task's head reads a feature map, it is also given ``map_tasks=[those names]``.
        head_hidden: widths of hidden layers in each default vector head (default: one linear layer).
        dense_head: ``(in_channels, out_channels) -> nn.Module``, the default head of the dense
            tasks (called as ``head(features, size=(H, W))``); default
            :class:`~mtl.heads.ConvHead`. ``functools.partial(ASPPHead, rates=(12, 24, 36))`` gives
            DeepLabV3 heads. A task's own ``head`` wins over both defaults.

    ``forward(x)`` returns ``{task: output}``: ``[B, output_size]`` for vector tasks and
    ``[B, C, H, W]`` (the input's ``H, W``) for dense tasks.
    """

    def __init__(
        self,
        backbone: Backbone,
        tasks: Iterable[Task] | dict[str, Task],
        sharing: Callable[..., Sharing] | None = None,
        head_hidden: Sequence[int] = (),
        dense_head: Callable[[int, int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        task_dict = as_task_dict(tasks)
        if not task_dict:
            raise ValueError("MultiTaskModel needs at least one task.")
        self.tasks = task_dict
        self.head_hidden = [int(h) for h in head_hidden]
        self.map_tasks = [name for name, t in task_dict.items() if t.feature_map]
        factory = sharing if sharing is not None else HardSharing
        self.sharing = self._build_sharing(factory, backbone, list(task_dict))
        dense_head = dense_head or ConvHead
        heads = {}
        for name, task in task_dict.items():
            in_size = self.sharing.feature_channels if task.feature_map else self.sharing.out_features
            head = task.build_head(in_size)
            if head is None:
                head = dense_head(in_size, task.output_size) if task.feature_map else make_head(in_size, task, self.head_hidden)
            heads[name] = head
        self.heads = nn.ModuleDict(heads)

    def _build_sharing(self, factory: Callable[..., Sharing], backbone: Backbone, names: list[str]) -> Sharing:
        if not self.map_tasks:
            return factory(backbone=backbone, tasks=names)
        target = getattr(factory, "func", factory)
        try:
            params = inspect.signature(target).parameters
            accepts = "map_tasks" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
        except (TypeError, ValueError):
            accepts = True
        if not accepts:
            raise ValueError(
                f"The sharing structure {getattr(target, '__name__', target)} does not serve tasks whose "
                f"head reads a feature map ({self.map_tasks}): it takes no map_tasks argument. Use "
                f"sharing=hard, mtan or cross_stitch."
            )
        return factory(backbone=backbone, tasks=names, map_tasks=list(self.map_tasks))

    @property
    def backbone(self) -> Backbone:
        return self.sharing.backbone

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters of the backbone and sharing structure (everything but the heads)."""
        return self.sharing.shared_parameters()

    def forward_with_representation(
        self, x: Tensor, tasks: Sequence[str] | None = None
    ) -> tuple[dict[str, Tensor], Tensor | None]:
        """Outputs ``{task: output}`` and the shared representation (see ``mtl.sharing``)."""
        names = self.task_names if tasks is None else list(tasks)
        unknown = [t for t in names if t not in self.heads]
        if unknown:
            raise KeyError(f"Model has no head for task(s) {unknown}; it has {self.task_names}.")
        shared = self.sharing(x, names)
        outputs = {}
        for t in names:
            if self.tasks[t].feature_map:
                outputs[t] = self.heads[t](shared.features[t], size=tuple(x.shape[-2:]))
            else:
                outputs[t] = self.heads[t](shared.features[t])
        return outputs, shared.representation

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        return self.forward_with_representation(x, tasks)[0]
