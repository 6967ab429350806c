r"""Transfer terms: fine-tuning regularizers and distillation as objects added to a stage's loss.

Each term is an ``nn.Module`` built from config by ``_target_`` (``mtl.transfer.L2SP``, ``BSS``,
``DELTA``) or by the runner (``Distillation``, whose teacher it resolves). A term is *bound* once to
the stage's starting model (L2-SP snapshots the starting weights into buffers, DELTA copies the
source model and records the backbone's stage outputs), then called every training step on the
step's :class:`ForwardRecord` s. Its buffers, source model and teacher are part of the module's
``state_dict``, so a resumed stage pulls towards the same weights. :class:`TransferTerms` holds a
stage's terms and returns their sum, the one term the training step adds outside the balancing.

The math is in :mod:`mtl.transfer.regularizers` (pure functions of tensors).
"""

from __future__ import annotations

import abc
import copy
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from mtl.transfer.regularizers import bss, delta, l2sp, lwf_distillation

__all__ = ["BSS", "DELTA", "Distillation", "ForwardRecord", "L2SP", "TransferTerm", "TransferTerms"]


@dataclass
class ForwardRecord:
    """One forward pass of a training step.

    Attributes:
        x: the input batch ``[B, ...]``.
        outputs: ``{task: output}`` of the heads that ran (distillation tasks included).
        representation: the shared representation ``[B, ...]``, or None.
    """

    x: Tensor
    outputs: dict[str, Tensor]
    representation: Tensor | None


class TransferTerm(nn.Module, abc.ABC):
    """Base class: a scalar added to the training loss of a stage."""

    #: Whether this term replaces weight decay on the model's weights (L2-SP does).
    replaces_weight_decay: bool = False

    def bind(self, model: nn.Module, target_tasks: Sequence[str]) -> None:
        """Attach to the stage's starting model (called once, before training). No-op by default."""

    @abc.abstractmethod
    def forward(self, records: Sequence[ForwardRecord]) -> Tensor | None:
        """The term for this step's forward passes (None: nothing to add)."""


def _frozen(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


class L2SP(TransferTerm):
    r"""L2-SP (Li, Grandvalet & Davoine, ICML 2018): :math:`\frac\alpha2\|w_s - w_s^0\|^2 +
    \frac\beta2\|w_{new}\|^2` over the shared weights and the target heads (see
    :func:`~mtl.transfer.regularizers.l2sp`). Replaces weight decay.

    Args:
        alpha: weight of the distance to the starting shared weights.
        beta: weight of the target heads' L2.
    """

    replaces_weight_decay = True

    def __init__(self, alpha: float = 0.01, beta: float = 0.01) -> None:
        super().__init__()
        self.alpha, self.beta = float(alpha), float(beta)
        self._params: list[nn.Parameter] = []
        self._new: list[nn.Parameter] = []

    def bind(self, model: nn.Module, target_tasks: Sequence[str]) -> None:
        self._params = [p for p in model.shared_parameters() if p.requires_grad]
        self._new = [p for t in target_tasks for p in model.heads[t].parameters()]
        # the starting weights, as buffers so that a resumed stage keeps pulling towards them
        for i, p in enumerate(self._params):
            self.register_buffer(f"start_{i}", p.detach().clone())

    def forward(self, records: Sequence[ForwardRecord]) -> Tensor:
        start = [getattr(self, f"start_{i}") for i in range(len(self._params))]
        return l2sp(self._params, start, alpha=self.alpha, new_params=self._new, beta=self.beta)


class BSS(TransferTerm):
    """Batch spectral shrinkage (Chen et al., NeurIPS 2019) of the shared representation: the
    ``k`` smallest squared singular values, times ``weight`` (see
    :func:`~mtl.transfer.regularizers.bss`)."""

    def __init__(self, weight: float = 0.001, k: int = 1) -> None:
        super().__init__()
        self.weight, self.k = float(weight), int(k)

    def forward(self, records: Sequence[ForwardRecord]) -> Tensor | None:
        terms = [
            bss(r.representation.flatten(1).float(), k=self.k, weight=self.weight)
            for r in records
            if r.representation is not None
        ]
        return torch.stack(terms).sum() if terms else None


class DELTA(TransferTerm):
    """DELTA (Li et al., ICLR 2019): distance of the backbone's stage outputs to those of the
    source (starting) model on the same inputs (see :func:`~mtl.transfer.regularizers.delta`).

    Binding copies the starting model (frozen, in eval mode) and records the stage outputs of the
    model being trained during its forward passes with gradients enabled (the training step's:
    evaluation and FAMO's recomputation run without gradients). A frozen block runs in eval mode
    and is recorded too.
    """

    def __init__(self, weight: float = 0.01) -> None:
        super().__init__()
        self.weight = float(weight)
        self.source: nn.Module | None = None
        self._captured: list[Tensor] = []
        self._num_stages = 0

    def bind(self, model: nn.Module, target_tasks: Sequence[str]) -> None:
        self.source = _frozen(copy.deepcopy(model))
        self._num_stages = len(model.backbone.stages)
        for stage in model.backbone.stages:
            stage.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs, output: Tensor) -> None:
        if torch.is_grad_enabled():
            self._captured.append(output)

    def train(self, mode: bool = True) -> "DELTA":
        super().train(mode)
        if self.source is not None:
            self.source.eval()  # the source model's normalisation statistics never move
        return self

    def forward(self, records: Sequence[ForwardRecord]) -> Tensor:
        captured, self._captured = self._captured, []
        n = self._num_stages
        terms = []
        for g, record in enumerate(records):
            with torch.no_grad():
                source = self.source.backbone.forward_stages(record.x)
            terms.append(delta(captured[g * n : (g + 1) * n], source, weight=self.weight))
        return torch.stack(terms).sum()


class Distillation(TransferTerm):
    """Distillation of a frozen teacher's outputs on ``tasks`` (LwF with the stage's starting model
    as the teacher, Born-Again networks with the previous generation), see
    :func:`~mtl.transfer.regularizers.lwf_distillation`; averaged over the tasks, times ``weight``.

    Args:
        teacher: the teacher model (``teacher(x, tasks) -> {task: output}``); frozen here.
        tasks: the distilled tasks; the model being trained must have their heads.
        task_kinds: ``{task: kind}`` (multiclass, binary, multilabel, regression).
        weight: multiplies the term.
        temperature: softmax temperature of the multiclass distillation.
    """

    def __init__(
        self,
        teacher: nn.Module,
        tasks: Sequence[str],
        task_kinds: Mapping[str, str],
        weight: float = 1.0,
        temperature: float = 2.0,
    ) -> None:
        super().__init__()
        self.teacher = _frozen(teacher)
        self.tasks = [str(t) for t in tasks]
        self.kinds = {t: str(task_kinds[t]) for t in self.tasks}
        self.weight, self.temperature = float(weight), float(temperature)

    def train(self, mode: bool = True) -> "Distillation":
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, records: Sequence[ForwardRecord]) -> Tensor:
        terms = []
        for record in records:
            with torch.no_grad():
                target = self.teacher(record.x, self.tasks)
            kd = [
                lwf_distillation(record.outputs[t], target[t], self.kinds[t], temperature=self.temperature)
                for t in self.tasks
            ]
            terms.append(self.weight * torch.stack(kd).mean())
        return torch.stack(terms).sum()


class TransferTerms(nn.Module):
    """A stage's transfer terms, summed.

    Args:
        terms: ``{name: TransferTerm}`` (e.g. ``{"l2sp": L2SP(0.01), "distill": Distillation(...)}``).
    """

    def __init__(self, terms: Mapping[str, TransferTerm]) -> None:
        super().__init__()
        for name, term in terms.items():
            if not isinstance(term, TransferTerm):
                raise TypeError(
                    f"regularizers.{name} must build a mtl.transfer.TransferTerm (L2SP, BSS, DELTA), got "
                    f"{type(term).__name__}."
                )
        self.terms = nn.ModuleDict(dict(terms))

    @property
    def replaces_weight_decay(self) -> bool:
        return any(t.replaces_weight_decay for t in self.terms.values())

    @property
    def distill_tasks(self) -> list[str]:
        """Tasks whose heads must run for distillation (they may be outside the stage's losses)."""
        return [t for term in self.terms.values() if isinstance(term, Distillation) for t in term.tasks]

    def bind(self, model: nn.Module, target_tasks: Sequence[str]) -> None:
        for term in self.terms.values():
            term.bind(model, target_tasks)

    def forward(self, records: Sequence[ForwardRecord]) -> Tensor | None:
        values = [v for v in (term(records) for term in self.terms.values()) if v is not None]
        return torch.stack(values).sum() if values else None
