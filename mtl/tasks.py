"""Tasks: what a head predicts, how it is scored, and how missing labels are marked.

A :class:`Task` is plain data plus, optionally, the user's own parts. Everything task-specific
elsewhere in the package (the head, its loss, its metrics, which way is better) is derived from it,
so a data config that declares its tasks is the single source of truth.

**Kinds.** Per example (vector heads): ``multiclass``, ``binary``, ``multilabel``, ``regression``.
Per pixel (heads that read a feature map): ``segmentation``, ``depth``, ``normal``. And ``custom``:
a head, a loss and metrics of your own, with no label convention of the package.

**Missing labels** are first class for every kind and skipped by every loss and metric:

========================  ==================================================================
kind                      an unlabelled element
========================  ==================================================================
multiclass                label ``ignore_index`` (default -100)
binary, multilabel,       NaN (any NaN in an example's row)
regression
segmentation              pixel label ``ignore_index`` (default -1, as in NYUv2/Cityscapes)
depth                     pixel depth 0 or NaN
normal                    pixel normal the zero vector (or any NaN component)
custom                    none: your loss and metrics see everything
========================  ==================================================================

**Your own parts.** ``Task(name, kind, head=..., loss=..., metrics=...)``:

- ``head``: an ``nn.Module``, or a factory ``in_size -> nn.Module`` called with the width of what
  the head reads (``in_features`` of the pooled vector, or ``in_channels`` of the feature map).
  A head that reads a feature map (dense kinds, or ``feature_map=True``) is called as
  ``head(features [B, C, h, w], size=(H, W))`` and returns a prediction at the input's size
  ``(H, W)``; a vector head as ``head(features [B, F])``. A module instance is used as it is by
  every model built from the task; a factory builds a fresh head per model.
- ``loss``: a callable ``(output, target) -> scalar tensor`` that gets **only the labelled
  elements**: for per-example kinds the labelled examples, ``(output[m], target[m])``; for
  per-pixel kinds the labelled pixels, flattened: ``output [N, C]`` and ``target [N]``
  (segmentation classes, depth values) or ``[N, 3]`` (normals). It is never called on an empty
  batch (the loss is then 0, with a graph). For ``kind="custom"`` it gets the whole batch.
- ``metrics``: a mapping ``{name: torchmetrics.Metric}`` or a ``MetricCollection``; each is
  updated with the labelled elements, as the loss (outputs as the head returns them, e.g.
  logits). Each metric's direction comes from ``directions={name: higher_is_better}`` or else
  from the metric's own ``higher_is_better``; one of them must say it (the report's Δm needs
  every direction). ``metric`` names the primary one (default: the first).

Each part may also be a config, ``{"_target_": "pkg.Class", ...}`` (a mapping of them for
``metrics``), as in ``data.tasks.<name>.head`` of a data config; the task instantiates it with
``hydra.utils.instantiate`` when it builds the part.

**Saved form.** ``dataclasses.asdict(task)`` is plain data (checkpoints hold it, ``Task(**spec)``
rebuilds the task). A part given as a config is saved as that config. A part given as a Python
object is saved as a config when it is an importable class or function (or a
``functools.partial`` of one with plain arguments), and otherwise as ``{"_object_": "<its type>"}``,
which ``Task(**spec)`` refuses with an error that says to declare the part as config: a custom
task needs its config to be rebuilt from a checkpoint.
"""

from __future__ import annotations

import copy
import functools
import importlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

from mtl.dense_losses import depth_loss, normal_loss, segmentation_loss
from mtl.metrics.rows import BinaryScores, MulticlassScores, MultilabelScores, RegressionErrors
from mtl.metrics.dense import (
    DENSE_METRIC_DIRECTIONS,
    DepthErrors,
    NormalErrors,
    SegmentationMetrics,
    depth_label_mask,
    normal_label_mask,
)

VECTOR_KINDS = ("multiclass", "binary", "multilabel", "regression")
DENSE_KINDS = ("segmentation", "depth", "normal")
KINDS = (*VECTOR_KINDS, *DENSE_KINDS, "custom")

#: Primary metric of each built-in kind (directions: :attr:`Task.metric_directions`).
PRIMARY_METRIC = {
    "multiclass": "acc",
    "binary": "auroc",
    "multilabel": "auroc",
    "regression": "mae",
    "segmentation": "miou",
    "depth": "abs_err",
    "normal": "mean_angle",
}

#: Metric names of each built-in kind.
KIND_METRICS: dict[str, tuple[str, ...]] = {
    "multiclass": ("acc", "f1"),
    "binary": ("acc", "auroc"),
    "multilabel": ("acc", "auroc"),
    "regression": ("mae", "rmse"),
    "segmentation": ("miou", "pix_acc"),
    "depth": ("abs_err", "rel_err"),
    "normal": ("mean_angle", "median_angle", "within_11_25", "within_22_5", "within_30"),
}

#: Default ``ignore_index`` of the kinds that have one.
DEFAULT_IGNORE_INDEX = {"multiclass": -100, "segmentation": -1}

_PLAIN = (str, int, float, bool, type(None))

#: Keys that the dense metrics' ``compute()`` returns.
_DENSE_METRIC_KEYS: dict[type, tuple[str, ...]] = {
    SegmentationMetrics: KIND_METRICS["segmentation"],
    DepthErrors: KIND_METRICS["depth"],
    NormalErrors: KIND_METRICS["normal"],
}


# --------------------------------------------------------------------------------------- parts
def _instantiate(config: Mapping) -> Any:
    # Hydra is imported only for parts declared as config (data.tasks.<name>.head: {_target_: ...})
    from hydra.utils import instantiate

    return instantiate(dict(config), _convert_="all")


def _is_config(value: Any) -> bool:
    return isinstance(value, Mapping) and "_target_" in value


def _plain(value: Any) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _importable(obj: Any) -> str | None:
    """``module.qualname`` of a class or function that importing it by that path gives back."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname or module == "__main__":
        return None
    try:
        found: Any = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError):
        return None
    return f"{module}.{qualname}" if found is obj else None


def describe(obj: Any) -> Any:
    """Plain data that names ``obj`` (a part of a task): a config when it can be rebuilt from one.

    ``None`` and configs stay as they are; an importable class or function becomes
    ``{"_target_": path, "_partial_": True}``; a ``functools.partial`` of one with plain
    arguments the same with its arguments; anything else ``{"_object_": "<module.Type>"}``.
    """
    if obj is None or _plain(obj):
        return copy.deepcopy(obj)
    if isinstance(obj, Mapping):
        if _is_config(obj) and _plain(obj):
            return copy.deepcopy(dict(obj))
        return {str(k): describe(v) for k, v in obj.items()}
    if isinstance(obj, functools.partial):
        target = _importable(obj.func)
        if target and _plain(list(obj.args)) and _plain(dict(obj.keywords)):
            spec: dict[str, Any] = {"_target_": target, "_partial_": True, **obj.keywords}
            if obj.args:
                spec["_args_"] = list(obj.args)
            return spec
    elif not isinstance(obj, (nn.Module, torchmetrics.Metric)):
        target = _importable(obj)
        if target:
            return {"_target_": target, "_partial_": True}
    kind = type(obj)
    return {"_object_": f"{kind.__module__}.{kind.__qualname__}"}


def _markers(spec: Any) -> list[str]:
    """The ``_object_`` markers inside a saved part."""
    if isinstance(spec, Mapping):
        if "_object_" in spec:
            return [str(spec["_object_"])]
        return [m for v in spec.values() for m in _markers(v)]
    return []


class TaskPart:
    """A user part of a :class:`Task` (its head, loss or metrics), as the user gave it.

    ``value`` is what was given: None (the kind's default), a config ``{"_target_": ...}`` or a
    Python object. Deep-copying a part gives its plain description (:func:`describe`), which is
    what makes ``dataclasses.asdict(task)`` plain data.
    """

    def __init__(self, task: "Task", role: str, value: Any) -> None:
        self.task, self.role, self.value = task, role, value

    @property
    def is_default(self) -> bool:
        return self.value is None

    def spec(self) -> Any:
        """Plain data describing the part (None for the kind's default)."""
        return describe(self.value)

    def build(self) -> Any:
        """The part as an object: a config is instantiated afresh on every call."""
        value = self.value
        if _is_config(value):
            return _instantiate(value)
        if isinstance(value, Mapping):  # metrics as {name: Metric or config}
            return {k: _instantiate(v) if _is_config(v) else v for k, v in value.items()}
        return value

    def __deepcopy__(self, memo: dict) -> Any:
        return copy.deepcopy(self.spec(), memo)

    def __eq__(self, other: object) -> bool:
        """The same object, or the same plain description that names no Python object."""
        if not isinstance(other, TaskPart):
            return NotImplemented
        if self.role != other.role:
            return False
        if self.value is other.value:
            return True
        spec = self.spec()
        return spec == other.spec() and not _markers(spec)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self.spec())


class TaskLoss(TaskPart):
    """``task.loss``: the task's loss as training applies it.

    ``task.loss(output, target)`` keeps the labelled elements (see :class:`Task`) and calls the
    user's loss (``task.loss.value``) or the kind's default on them; it returns 0 with a graph when
    nothing in the batch is labelled.
    """

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        return self.task._loss(output, target)


class _PartField:
    """Descriptor of the ``head``, ``loss`` and ``metrics`` fields of :class:`Task`.

    Setting stores the given value; reading gives a :class:`TaskPart` (a :class:`TaskLoss` for
    ``loss``) around it.
    """

    def __init__(self, part: type[TaskPart] = TaskPart) -> None:
        self.part = part

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.key = name, f"_{name}_value"

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return None  # the dataclass default
        return self.part(obj, self.name, obj.__dict__.get(self.key))

    def __set__(self, obj: Any, value: Any) -> None:
        if isinstance(value, TaskPart):  # dataclasses.replace passes the current part back
            value = value.value
        markers = _markers(value)
        if markers:
            raise ValueError(
                f"Task '{getattr(obj, 'name', '?')}': its {self.name} was a Python object "
                f"({', '.join(markers)}) when this spec was saved, and a saved spec holds only plain "
                f"data. Declare the {self.name} as config (data.tasks.<name>.{self.name}: "
                f"{{_target_: ...}}) to rebuild it from a checkpoint, or build the Task in Python again."
            )
        if value is not None and not isinstance(value, Mapping) and self.name != "metrics":
            if not callable(value):
                raise TypeError(
                    f"Task '{getattr(obj, 'name', '?')}': {self.name} must be a callable "
                    f"(an nn.Module or a factory for a head), a config {{_target_: ...}} or None, "
                    f"got {type(value).__name__}."
                )
        obj.__dict__[self.key] = value
        obj.__dict__.pop("_built_loss", None)  # the loss is instantiated once per value


# --------------------------------------------------------------------------------------- task
@dataclass
class Task:
    """One prediction target (see the module docstring for kinds, missing labels and parts).

    Args:
        name: unique name; used in logs (``val/<name>/acc``), configs and ``{name: y}`` label dicts.
        kind: ``multiclass`` (integer labels in ``[0, num_classes)``), ``binary`` (0/1 labels, one
            logit), ``multilabel`` (``num_classes`` 0/1 columns), ``regression`` (``out_features``
            real columns), ``segmentation`` (``[B, H, W]`` class maps, logits ``[B, num_classes, H,
            W]``), ``depth`` (``[B, 1, H, W]`` or ``[B, H, W]``, prediction ``[B, 1, H, W]``),
            ``normal`` (``[B, 3, H, W]``) or ``custom``.
        num_classes: number of classes (multiclass, multilabel, segmentation).
        out_features: number of regression outputs (default 1).
        weight: static weight of this task's loss.
        ignore_index: label value that marks a missing class label (multiclass: default -100;
            segmentation: default -1).
        metric: name of the primary metric (default: the kind's, acc, auroc, mae, miou, abs_err,
            mean_angle; or the first of ``metrics``).
        head: your head (module or factory), or None for the model's default head.
        loss: your loss ``(output, target) -> scalar`` on labelled elements, or None for the kind's.
        metrics: your metrics ``{name: Metric}`` or a ``MetricCollection``, or None for the kind's.
        directions: ``{metric: higher_is_better}`` for your metrics (default: each metric's own
            ``higher_is_better``).
        feature_map: whether the head reads the backbone's last feature map (called with
            ``size=(H, W)``) rather than the pooled vector. Default: true for the dense kinds,
            false otherwise; a custom head of a vector kind may set it.
        class_names: the original label of each class code (multiclass, multilabel: one per
            class, and ``num_classes`` defaults to their number; binary: two, for codes 0 and 1),
            e.g. ``["no", "yes"]`` when the data's labels were strings. Predictions are reported
            with them; the model itself only sees the codes.
        target_mean, target_std: regression only: the training targets' mean and standard
            deviation (a float, or one per output). The head then predicts standardised targets
            ``(y - mean) / std``: the built-in loss (and your loss) compares the output with them,
            while metrics and :meth:`predict` see ``output * std + mean``, in the targets' units.
            None: no standardisation.
    """

    name: str
    kind: str = "multiclass"
    num_classes: int | None = None
    out_features: int | None = None
    weight: float = 1.0
    ignore_index: int | None = None
    metric: str | None = None
    head: Any = _PartField()
    loss: Any = _PartField(TaskLoss)
    metrics: Any = _PartField()
    directions: dict[str, bool] | None = None
    feature_map: bool | None = None
    class_names: list[str] | None = None
    # a float or one per output; Any because OmegaConf (Task as a structured config) has no unions
    target_mean: Any = None
    target_std: Any = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Task '{self.name}': kind must be one of {KINDS}, got '{self.kind}'.")
        self._check_class_names()
        if self.kind in ("multiclass", "multilabel", "segmentation"):
            if self.num_classes is None or int(self.num_classes) < 2:
                raise ValueError(
                    f"Task '{self.name}' of kind '{self.kind}' needs num_classes >= 2, "
                    f"got {self.num_classes}."
                )
            self.num_classes = int(self.num_classes)
        if self.kind == "regression":
            self.out_features = int(self.out_features or 1)
        self._check_standardisation()
        if self.ignore_index is None:
            self.ignore_index = DEFAULT_IGNORE_INDEX.get(self.kind, -100)
        self.ignore_index = int(self.ignore_index)
        self._check_feature_map()
        if self.kind == "custom":
            missing = [p for p in ("head", "loss", "metrics") if getattr(self, p).is_default]
            if missing:
                raise ValueError(
                    f"Task '{self.name}' of kind 'custom' needs its own {', '.join(missing)} "
                    f"(a custom kind has no defaults)."
                )
        if self.directions is not None:
            self.directions = {str(k): bool(v) for k, v in dict(self.directions).items()}
        self._metric_directions = self._resolve_directions()
        names = [m for m in self._metric_directions if m != "loss"]
        if self.metric is None:
            self.metric = PRIMARY_METRIC[self.kind] if self.metrics.is_default else names[0]
        if self.metric not in names:
            raise ValueError(f"Task '{self.name}': metric '{self.metric}' is not one of {tuple(names)}.")

    def _check_class_names(self) -> None:
        if self.class_names is None:
            return
        if self.kind not in ("multiclass", "binary", "multilabel"):
            raise ValueError(f"Task '{self.name}': class_names are for multiclass, binary and multilabel tasks, not '{self.kind}'.")
        names = [str(c) for c in self.class_names]
        if len(set(names)) != len(names):
            raise ValueError(f"Task '{self.name}': class_names {names} repeat a name; each class needs its own.")
        need = 2 if self.kind == "binary" else (self.num_classes if self.num_classes is not None else len(names))
        if len(names) != int(need):
            raise ValueError(
                f"Task '{self.name}': {len(names)} class_names {names} for {need} classes "
                f"(data.tasks.{self.name}.num_classes); give one name per class."
            )
        if self.kind != "binary":
            self.num_classes = len(names)
        self.class_names = names

    def _check_standardisation(self) -> None:
        given = {k: getattr(self, k) for k in ("target_mean", "target_std") if getattr(self, k) is not None}
        if not given:
            return
        if self.kind != "regression":
            raise ValueError(f"Task '{self.name}': {sorted(given)} are for regression tasks, not '{self.kind}'.")
        if len(given) == 1:
            raise ValueError(f"Task '{self.name}': set both target_mean and target_std, or neither.")
        for key, value in given.items():
            values = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]
            if len(values) not in (1, self.out_features):
                raise ValueError(
                    f"Task '{self.name}': {key} has {len(values)} values for {self.out_features} outputs; "
                    f"give one value, or one per output."
                )
            if not all(math.isfinite(v) for v in values) or (key == "target_std" and min(values) <= 0):
                raise ValueError(f"Task '{self.name}': {key}={values} must be finite{' and > 0' if key == 'target_std' else ''}.")
            setattr(self, key, values[0] if not isinstance(value, (list, tuple)) else values)

    def _check_feature_map(self) -> None:
        dense = self.kind in DENSE_KINDS
        if self.feature_map is None:
            self.feature_map = dense
        self.feature_map = bool(self.feature_map)
        if dense and not self.feature_map:
            raise ValueError(f"Task '{self.name}' of kind '{self.kind}' predicts per pixel: its head reads a feature map.")
        if self.feature_map and not dense and self.head.is_default:
            raise ValueError(
                f"Task '{self.name}': feature_map=true needs a head of your own for kind '{self.kind}' "
                f"(the default {self.kind} head reads the pooled vector)."
            )

    def _resolve_directions(self) -> dict[str, bool]:
        if self.metrics.is_default:
            if self.directions:
                raise ValueError(f"Task '{self.name}': directions are for your own metrics (metrics=...).")
            names = KIND_METRICS[self.kind]
            if self.kind in DENSE_KINDS:
                return {**{n: DENSE_METRIC_DIRECTIONS[n] for n in names}, "loss": False}
            up = self.kind != "regression"
            return {**{n: up for n in names}, "loss": False}
        metrics = self._user_metrics()
        given = dict(self.directions or {})
        out: dict[str, bool] = {}
        for name, metric in metrics.items():
            if name in given:
                out[name] = given[name]
                continue
            up = getattr(metric, "higher_is_better", None)
            if up is None and type(metric) in _DENSE_METRIC_KEYS:  # a dict of known metrics
                for key in _DENSE_METRIC_KEYS[type(metric)]:
                    out[key] = given.get(key, DENSE_METRIC_DIRECTIONS[key])
                continue
            if up is None and any(k not in metrics for k in given):
                continue  # a metric returning a dict whose keys ``directions`` names
            if up is None:
                raise ValueError(
                    f"Task '{self.name}': say whether a higher '{name}' is better: "
                    f"directions={{'{name}': true | false}} ({type(metric).__name__} does not say; a "
                    f"metric returning a dict needs one entry per key it returns)."
                )
            out[name] = bool(up)
        # ``directions`` may also name the keys of a metric whose compute() returns a dict
        out.update({k: v for k, v in given.items() if k not in out})
        if "loss" in out:
            raise ValueError(f"Task '{self.name}': 'loss' is logged by the module; name your metric otherwise.")
        return {**out, "loss": False}

    def _user_metrics(self) -> dict[str, torchmetrics.Metric]:
        built = self.metrics.build()
        if isinstance(built, torchmetrics.MetricCollection):
            items = dict(built.items(keep_base=True))
        elif isinstance(built, torchmetrics.Metric):
            items = {type(built).__name__.lower(): built}
        elif isinstance(built, Mapping):
            items = dict(built)
        else:
            raise TypeError(
                f"Task '{self.name}': metrics must be a mapping {{name: torchmetrics.Metric}} or a "
                f"MetricCollection, got {type(built).__name__}."
            )
        bad = [k for k, m in items.items() if not isinstance(m, torchmetrics.Metric)]
        if bad:
            raise TypeError(f"Task '{self.name}': metrics {bad} are not torchmetrics Metrics.")
        return {str(k): m for k, m in items.items()}

    # ----------------------------------------------------------------------------------- shape
    @property
    def dense(self) -> bool:
        """Whether the task predicts per pixel (a built-in dense kind)."""
        return self.kind in DENSE_KINDS

    @property
    def output_size(self) -> int:
        """Width (channels, for dense kinds) of this task's default head output."""
        if self.kind in ("multiclass", "multilabel", "segmentation"):
            return int(self.num_classes)
        if self.kind in ("binary", "depth"):
            return 1
        if self.kind == "normal":
            return 3
        if self.kind == "regression":
            return int(self.out_features)
        raise ValueError(f"Task '{self.name}' of kind 'custom' has no default output size; its head decides.")

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(m for m in self._metric_directions if m != "loss")

    @property
    def metric_directions(self) -> dict[str, bool]:
        """``{metric: higher_is_better}`` for every metric of this task and its ``loss``."""
        return dict(self._metric_directions)

    @property
    def missing_value(self) -> float:
        """The value that marks a missing label (a whole example's labels, for dense kinds)."""
        if self.kind in ("multiclass", "segmentation"):
            return float(self.ignore_index)
        if self.kind in ("depth", "normal"):
            return 0.0
        if self.kind == "custom":
            raise ValueError(f"Task '{self.name}' of kind 'custom' has no missing-label value.")
        return float("nan")

    # ----------------------------------------------------------------------------------- labels
    def pixel_mask(self, target: Tensor) -> Tensor:
        """Boolean mask ``[B, H, W]`` of the labelled pixels of a dense task's target."""
        if self.kind == "segmentation":
            return target != self.ignore_index
        if self.kind == "depth":
            t = target[:, 0] if target.dim() == 4 else target
            return depth_label_mask(t)
        if self.kind == "normal":
            return normal_label_mask(target)
        raise ValueError(f"Task '{self.name}' of kind '{self.kind}' has no pixels.")

    def label_mask(self, target: Tensor) -> Tensor:
        """Boolean mask ``[B]`` of the examples that carry a label for this task (for dense kinds:
        at least one labelled pixel)."""
        if self.kind == "multiclass":
            return target != self.ignore_index
        if self.kind in DENSE_KINDS:
            return self.pixel_mask(target).reshape(target.shape[0], -1).any(dim=1)
        if self.kind == "custom":
            return torch.ones(target.shape[0], dtype=torch.bool, device=target.device)
        target = target.reshape(target.shape[0], -1)
        return ~torch.isnan(target).any(dim=1)

    def invalid_targets(self, target: Tensor) -> Tensor:
        """A 0-dim bool tensor, True when some label is out of range for this task: what
        :meth:`check_targets` raises for, computed without a host sync (a step checking several
        tasks reads all their flags at once). A target of the wrong shape raises at once."""
        if self.kind == "custom":
            return torch.zeros((), dtype=torch.bool, device=target.device)
        if self.kind in DENSE_KINDS:
            self._check_dense_shape(target)
        if self.kind in ("multiclass", "segmentation"):
            return ((target != self.ignore_index) & ((target < 0) | (target >= self.num_classes))).any()
        if self.kind in DENSE_KINDS:
            return torch.isinf(target).any()
        rows = self.label_mask(target).reshape(-1, *([1] * (target.dim() - 1)))
        if self.kind in ("binary", "multilabel"):
            return (rows & (target != 0) & (target != 1)).any()
        return (rows & ~torch.isfinite(target)).any()

    def check_targets(self, target: Tensor) -> None:
        """Raise a clear error if labels are out of range for this task (missing labels allowed)."""
        if self.kind == "custom":
            return
        if self.kind in DENSE_KINDS:
            self._check_dense_targets(target)
            return
        mask = self.label_mask(target)
        y = target[mask]
        if y.numel() == 0:
            return
        if self.kind == "multiclass":
            bad = (y < 0) | (y >= self.num_classes)
            if bad.any():
                value = y[bad][0].item()
                raise ValueError(
                    f"Task '{self.name}': label {value} is out of range [0, {self.num_classes}) "
                    f"(missing labels must be {self.ignore_index}). Check num_classes in the data "
                    f"config (data.tasks.{self.name}.num_classes)."
                )
        elif self.kind in ("binary", "multilabel"):
            bad = (y != 0) & (y != 1)
            if bad.any():
                value = y[bad][0].item()
                raise ValueError(
                    f"Task '{self.name}' ({self.kind}): label {value} is not 0 or 1 "
                    f"(mark missing labels with NaN)."
                )
        elif not torch.isfinite(y).all():
            raise ValueError(f"Task '{self.name}': regression labels must be finite or NaN.")

    def _check_dense_targets(self, target: Tensor) -> None:
        self._check_dense_shape(target)
        self._check_dense_values(target)

    def _check_dense_shape(self, target: Tensor) -> None:
        shapes = {"segmentation": "[B, H, W]", "depth": "[B, 1, H, W] or [B, H, W]", "normal": "[B, 3, H, W]"}
        ok = {
            "segmentation": target.dim() == 3,
            "depth": target.dim() == 3 or (target.dim() == 4 and target.shape[1] == 1),
            "normal": target.dim() == 4 and target.shape[1] == 3,
        }[self.kind]
        if not ok:
            raise ValueError(
                f"Task '{self.name}' ({self.kind}): targets must be {shapes[self.kind]}, got shape "
                f"{tuple(target.shape)}."
            )

    def _check_dense_values(self, target: Tensor) -> None:
        if self.kind == "segmentation":
            y = target[target != self.ignore_index]
            bad = (y < 0) | (y >= self.num_classes)
            if bool(bad.any()):
                raise ValueError(
                    f"Task '{self.name}': pixel label {y[bad][0].item()} is out of range "
                    f"[0, {self.num_classes}) (unlabelled pixels must be {self.ignore_index}). Check "
                    f"data.tasks.{self.name}.num_classes and ignore_index."
                )
        elif bool(torch.isinf(target).any()):
            raise ValueError(f"Task '{self.name}' ({self.kind}): targets must be finite (NaN or 0 marks unlabelled).")

    def labelled(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """The labelled elements ``(output, target)`` that your loss and metrics get.

        Per-example kinds: the labelled rows. Dense kinds: the labelled pixels, flattened to
        ``output [N, C]`` and ``target [N]`` (segmentation, depth) or ``[N, 3]`` (normal).
        ``custom``: everything.
        """
        if self.kind == "custom":
            return output, target
        if self.kind not in DENSE_KINDS:
            mask = self.label_mask(target)
            return output[mask], target[mask]
        mask = self.pixel_mask(target)
        out = output.movedim(1, -1)[mask]  # [N, C]
        if self.kind == "normal":
            return out, target.movedim(1, -1)[mask]
        t = target[:, 0] if target.dim() == 4 else target
        y = t[mask]
        return (out[:, 0] if self.kind == "depth" and out.shape[-1] == 1 else out), y

    # ----------------------------------------------------------------------------------- loss
    def _loss(self, output: Tensor, target: Tensor) -> Tensor:
        """See :class:`TaskLoss`: ``task.loss(output, target)``.

        Args:
            output: head output ``[B, output_size]`` (vector kinds) or ``[B, C, H, W]`` (dense).
            target: ``[B]`` integer classes (multiclass), ``[B]`` or ``[B, 1]`` 0/1 (binary),
                ``[B, C]`` 0/1 (multilabel), ``[B]`` or ``[B, D]`` reals (regression), ``[B, H, W]``
                classes (segmentation), ``[B, (1,) H, W]`` depth, ``[B, 3, H, W]`` normals.
        Returns:
            scalar tensor: the mean over labelled elements (0 with a graph when none is labelled).
        """
        if "_built_loss" not in self.__dict__:
            self.__dict__["_built_loss"] = self.loss.build()
        fn = self.__dict__["_built_loss"]
        if fn is not None:
            return self._user_loss(fn, output, target)
        if self.kind in DENSE_KINDS:
            if self.kind == "segmentation":
                return segmentation_loss(output, target, self.ignore_index)
            if self.kind == "depth":
                return depth_loss(output, target)
            return normal_loss(output, target)
        return self._vector_loss(output, target, self.label_mask(target))

    def _vector_loss(self, output: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """The built-in loss of a per-example kind: the mean over the labelled rows (``mask``
        ``[B]``), as a masked sum so that it needs no host sync (and is 0, with a graph, when no
        row is labelled)."""
        count = mask.sum()
        if self.kind == "multiclass":
            # unlabelled rows hold ignore_index, which cross_entropy skips
            return F.cross_entropy(output, target.long(), ignore_index=self.ignore_index, reduction="sum") / count.clamp_min(1)
        rows = mask.reshape(-1, *([1] * (output.dim() - 1)))
        y = torch.where(rows, target.reshape(output.shape).to(output.dtype), 0.0)
        if self.kind in ("binary", "multilabel"):
            per_element = F.binary_cross_entropy_with_logits(output, y, reduction="none")
        else:
            per_element = F.mse_loss(output, self.standardise(y), reduction="none")
        width = output[0].numel() if output.shape[0] else 1
        return torch.where(rows, per_element, 0.0).sum() / (count * width).clamp_min(1)

    def loss_and_metric_inputs(
        self, output: Tensor, target: Tensor, metrics: bool = True
    ) -> tuple[Tensor, tuple | None, Tensor | int]:
        """What a training or evaluation step needs, from one label mask: ``(loss, update, count)``.

        ``loss`` is ``task.loss(output, target)``; ``metrics.update(*update)`` adds the batch to
        :meth:`make_metrics`' collection (``update`` is None with ``metrics=False``, or when your
        metrics see no labelled row); ``count`` is the number of labelled examples, the loss's
        weight in the epoch's mean. For the built-in vector kinds nothing here waits for the
        device: ``update`` is the whole batch with its label mask and ``count`` a tensor.
        """
        if self.kind in DENSE_KINDS and self.loss.is_default and self.metrics.is_default:
            # the built-in dense losses and metrics mask their unlabelled pixels themselves
            loss = self.loss(output, target)
            return loss, ((output.detach(), target) if metrics else None), self.label_mask(target).sum()
        if self.kind in DENSE_KINDS or self.kind == "custom" or not (self.loss.is_default and self.metrics.is_default):
            loss = self.loss(output, target)
            if not metrics:
                return loss, None, 0
            pair = self.metric_inputs(output, target)
            return loss, pair, (0 if pair is None else pair[0].shape[0])
        mask = self.label_mask(target)
        loss = self._vector_loss(output, target, mask)
        return loss, (self._masked_metric_inputs(output, target, mask) if metrics else None), mask.sum()

    def _masked_metric_inputs(self, output: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(preds, target, mask)`` of the whole batch for the built-in vector metrics."""
        out = output.detach()
        if self.kind == "multiclass":
            return out, target.long(), mask
        if self.kind == "binary":
            return out.reshape(-1).sigmoid(), target.reshape(-1), mask
        if self.kind == "multilabel":
            return out.sigmoid(), target.reshape(out.shape), mask
        out = self.original_units(out.reshape(out.shape[0], -1)).float()
        return out, target.reshape(out.shape).to(out.dtype), mask

    def _user_loss(self, fn: Callable, output: Tensor, target: Tensor) -> Tensor:
        out, y = self.labelled(output, target)
        if self.kind == "regression":
            y = self.standardise(y.to(out.dtype))
        if self.kind != "custom" and (out.numel() == 0 or y.shape[0] == 0):
            return output.sum() * 0.0
        value = fn(out, y)
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError(
                f"Task '{self.name}': the loss must return a scalar tensor, got "
                f"{type(value).__name__}{'' if not isinstance(value, Tensor) else f' of shape {tuple(value.shape)}'}."
            )
        return value.reshape(())

    # ----------------------------------------------------------------------------------- units
    def _scale(self, like: Tensor) -> tuple[Tensor, Tensor] | None:
        if self.target_mean is None:
            return None
        mean = torch.as_tensor(self.target_mean, dtype=like.dtype, device=like.device)
        std = torch.as_tensor(self.target_std, dtype=like.dtype, device=like.device)
        return mean, std

    def standardise(self, target: Tensor) -> Tensor:
        """Regression targets ``[B]`` or ``[B, D]`` in the head's units, ``(y - mean) / std``
        (unchanged without ``target_mean``)."""
        scale = self._scale(target)
        return target if scale is None else (target - scale[0]) / scale[1]

    def original_units(self, output: Tensor) -> Tensor:
        """A regression head's output ``[B, D]`` in the targets' units, ``output * std + mean``
        (unchanged without ``target_mean``)."""
        scale = self._scale(output)
        return output if scale is None else output * scale[1] + scale[0]

    def predict(self, output: Tensor) -> Tensor:
        """What the head's output ``[B, output_size]`` predicts, in the labels' coding.

        Returns:
            multiclass ``[B]`` class codes (``class_names[code]`` names them); binary ``[B]`` 0/1;
            multilabel ``[B, C]`` 0/1; regression ``[B, D]`` in the targets' units; segmentation
            ``[B, H, W]`` classes; other kinds the output as it is.
        """
        output = output.detach()
        if self.kind in ("multiclass", "segmentation"):
            return output.argmax(dim=1)
        if self.kind == "binary":
            return (output.reshape(-1) > 0).long()
        if self.kind == "multilabel":
            return (output > 0).long()
        if self.kind == "regression":
            return self.original_units(output.reshape(output.shape[0], -1))
        return output

    def probabilities(self, output: Tensor) -> Tensor:
        """Class probabilities: multiclass ``[B, C]`` (softmax), binary ``[B]`` (of class 1),
        multilabel ``[B, C]`` (sigmoid)."""
        if self.kind == "multiclass":
            return output.detach().softmax(dim=1)
        if self.kind == "binary":
            return output.detach().reshape(-1).sigmoid()
        if self.kind == "multilabel":
            return output.detach().sigmoid()
        raise ValueError(f"Task '{self.name}' of kind '{self.kind}' has no class probabilities.")

    # ----------------------------------------------------------------------------------- head
    def build_head(self, in_size: int) -> nn.Module | None:
        """Your head for an input of width ``in_size`` (features or channels), or None when the
        task uses the model's default head."""
        built = self.head.build()
        if built is None:
            return None
        head = built if isinstance(built, nn.Module) else built(int(in_size))
        if not isinstance(head, nn.Module):
            raise TypeError(
                f"Task '{self.name}': the head factory returned {type(head).__name__}, not an nn.Module."
            )
        return head

    # ----------------------------------------------------------------------------------- metrics
    def make_metrics(self) -> torchmetrics.MetricCollection:
        """A fresh :class:`torchmetrics.MetricCollection` of this task's metrics."""
        if not self.metrics.is_default:
            fresh = {}
            for name, metric in self._user_metrics().items():
                metric = copy.deepcopy(metric)
                metric.reset()
                fresh[name] = metric
            return torchmetrics.MetricCollection(fresh, compute_groups=False)
        # the vector kinds' metrics update without a host sync (mtl.metrics.rows)
        if self.kind == "multiclass":
            metrics = {"scores": MulticlassScores(self.num_classes, self.ignore_index)}
        elif self.kind == "binary":
            metrics = {"scores": BinaryScores()}
        elif self.kind == "multilabel":
            metrics = {"scores": MultilabelScores(self.num_classes)}
        elif self.kind == "regression":
            metrics = {"errors": RegressionErrors()}
        elif self.kind == "segmentation":
            metrics = {"segmentation": SegmentationMetrics(self.num_classes, self.ignore_index, validate=False)}
        elif self.kind == "depth":
            metrics = {"depth": DepthErrors()}
        else:
            metrics = {"normal": NormalErrors()}
        return torchmetrics.MetricCollection(metrics)

    def metric_inputs(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor] | None:
        """The (prediction, target) pair to feed this task's metrics, labelled elements only.

        Returns None when nothing in the batch is labelled. Your metrics get
        :meth:`labelled` (raw outputs); the built-in dense metrics get the whole maps (they skip
        unlabelled pixels themselves).
        """
        if not self.metrics.is_default:
            out, y = self.labelled(output.detach(), target)
            if self.kind == "regression":
                out = self.original_units(out)
            return None if out.shape[0] == 0 else (out, y)
        if self.kind in DENSE_KINDS:
            if not bool(self.pixel_mask(target).any()):
                return None
            return output.detach(), target
        return self._vector_metric_inputs(output, target, self.label_mask(target))

    def _vector_metric_inputs(self, output: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor] | None:
        if not bool(mask.any()):
            return None
        out, y = output[mask].detach(), target[mask]
        if self.kind == "multiclass":
            return out, y.long()
        if self.kind == "binary":
            return out.reshape(-1).sigmoid(), y.reshape(-1).long()
        if self.kind == "multilabel":
            return out.sigmoid(), y.reshape(out.shape).long()
        return self.original_units(out).reshape(-1).float(), y.reshape(-1).to(out.dtype).float()

    def to_dict(self) -> dict[str, Any]:
        """The plain-data form of the task (``dataclasses.asdict``); ``Task(**d)`` rebuilds it."""
        import dataclasses

        return dataclasses.asdict(self)


def tasks_from_config(spec: Mapping[str, Mapping] | None) -> dict[str, Task]:
    """Build ``{name: Task}`` from a mapping ``{name: {kind: ..., num_classes: ..., head: ...}}``.

    ``head``, ``loss`` and ``metrics`` may be configs (``{_target_: ...}``), instantiated by the
    task when it builds them, or objects Hydra already instantiated.
    """
    tasks: dict[str, Task] = {}
    for name, options in (spec or {}).items():
        if isinstance(options, Task):
            tasks[str(name)] = options
            continue
        options = dict(options or {})
        options.pop("name", None)
        try:
            tasks[str(name)] = Task(name=str(name), **options)
        except TypeError as err:
            raise ValueError(f"data.tasks.{name}: {err}") from None
    return tasks


def as_task_dict(tasks) -> dict[str, Task]:
    """Accept a list of Tasks, a ``{name: Task}`` dict, or a config mapping; return ``{name: Task}``."""
    if isinstance(tasks, Mapping):
        if all(isinstance(t, Task) for t in tasks.values()):
            return dict(tasks)
        return tasks_from_config(tasks)
    out: dict[str, Task] = {}
    for t in tasks:
        if isinstance(t, Mapping) and "name" in t:  # a Task that Hydra's _convert_ turned into a dict
            t = Task(**t)
        if not isinstance(t, Task):
            raise TypeError(f"Expected Task objects, got {type(t).__name__}.")
        if t.name in out:
            raise ValueError(f"Task name '{t.name}' appears twice.")
        out[t.name] = t
    return out
