"""MultiTaskModel: backbone + structure sharing + one head per task."""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

from torch import Tensor, nn

from mtl.backbones.base import Backbone
from mtl.sharing.base import Sharing
from mtl.sharing.hard import HardSharing
from mtl.tasks import Task, as_task_dict


def make_head(in_features: int, task: Task, hidden: Sequence[int] = ()) -> nn.Module:
    """A task head: optional hidden ``Linear -> ReLU`` layers, then ``Linear`` to the task's size."""
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
            :class:`~mtl.sharing.hard.HardSharing`. Hydra configs pass a ``_partial_`` class.
        head_hidden: widths of hidden layers in each head (default: a single linear layer).

    ``forward(x)`` returns ``{task: output [B, task.output_size]}``.
    """

    def __init__(
        self,
        backbone: Backbone,
        tasks: Iterable[Task] | dict[str, Task],
        sharing: Callable[..., Sharing] | None = None,
        head_hidden: Sequence[int] = (),
    ) -> None:
        super().__init__()
        task_dict = as_task_dict(tasks)
        if not task_dict:
            raise ValueError("MultiTaskModel needs at least one task.")
        self.tasks = task_dict
        self.head_hidden = [int(h) for h in head_hidden]
        factory = sharing if sharing is not None else HardSharing
        self.sharing = factory(backbone=backbone, tasks=list(task_dict))
        self.heads = nn.ModuleDict(
            {name: make_head(self.sharing.out_features, t, self.head_hidden) for name, t in task_dict.items()}
        )

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
        """Outputs ``{task: [B, size]}`` and the shared representation (see ``mtl.sharing``)."""
        names = self.task_names if tasks is None else list(tasks)
        unknown = [t for t in names if t not in self.heads]
        if unknown:
            raise KeyError(f"Model has no head for task(s) {unknown}; it has {self.task_names}.")
        shared = self.sharing(x, names)
        return {t: self.heads[t](shared.features[t]) for t in names}, shared.representation

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        return self.forward_with_representation(x, tasks)[0]
