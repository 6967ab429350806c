r"""Combining several trained models: prediction ensembles and weight averaging ("soups").

* :func:`average_predictions` averages what several models predict (costs one forward per model).
* :func:`uniform_soup` averages their weights into one model (one forward), which only makes sense
  for models fine-tuned from the same pretrained weights (Wortsman et al., ICML 2022).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = ("multiclass", "binary", "multilabel", "regression")


def average_predictions(outputs: Sequence[Mapping[str, Tensor]], kinds: Mapping[str, str]) -> dict[str, Tensor]:
    r"""Ensemble the outputs of :math:`M` models by averaging their predicted probabilities.

    For each task, with :math:`z^{(m)}` the head output of model :math:`m`:

    * ``multiclass`` (``[B, C]`` logits): :math:`\bar p = \frac1M \sum_m \mathrm{softmax}(z^{(m)})`;
      returns :math:`\log \bar p` (log-probabilities, ``[B, C]``).
    * ``binary`` / ``multilabel`` (``[B, 1]`` / ``[B, C]`` logits):
      :math:`\bar p = \frac1M \sum_m \sigma(z^{(m)})`; returns
      :math:`\mathrm{logit}(\bar p) = \log \bar p - \log(1 - \bar p)`.
    * ``regression``: the mean output :math:`\frac1M \sum_m z^{(m)}`.

    The result is in the same space as one model's output (logits whose softmax / sigmoid is the
    averaged probability), so it goes unchanged through :meth:`mtl.tasks.Task.loss` (cross-entropy
    of the ensemble's probabilities), :meth:`~mtl.tasks.Task.metric_inputs` and the task metrics.
    Everything is computed in log space (log-sum-exp), so saturated models give finite values.

    Args:
        outputs: ``M >= 1`` dicts ``{task: [B, ...]}``, one per model, with the same tasks and
            shapes.
        kinds: ``{task: kind}`` for every task in ``outputs`` (extra entries are ignored).

    Returns:
        ``{task: [B, ...]}``, in the order of the first model's tasks.
    """
    outputs = list(outputs)
    if not outputs:
        raise ValueError("average_predictions needs the outputs of at least one model.")
    tasks = list(outputs[0])
    for m, out in enumerate(outputs[1:], start=1):
        if set(out) != set(tasks):
            raise ValueError(
                f"average_predictions: model {m} predicts tasks {sorted(out)} but model 0 predicts "
                f"{sorted(tasks)}; ensemble models with the same heads."
            )
    missing = [t for t in tasks if t not in kinds]
    if missing:
        raise ValueError(f"average_predictions: no kind given for task(s) {missing}.")
    log_m = math.log(len(outputs))
    fused: dict[str, Tensor] = {}
    for task in tasks:
        kind = kinds[task]
        if kind not in KINDS:
            raise ValueError(f"average_predictions: task '{task}' has kind '{kind}'; expected one of {KINDS}.")
        shapes = {tuple(out[task].shape) for out in outputs}
        if len(shapes) != 1:
            raise ValueError(
                f"average_predictions: task '{task}' outputs differ in shape across models: {sorted(shapes)}."
            )
        z = torch.stack([out[task] for out in outputs])  # [M, B, ...]
        if kind == "regression":
            fused[task] = z.mean(dim=0)
        elif kind == "multiclass":
            fused[task] = torch.logsumexp(F.log_softmax(z, dim=-1), dim=0) - log_m
        else:
            # log p̄ - log(1 - p̄); the 1/M of both means cancels
            fused[task] = torch.logsumexp(F.logsigmoid(z), dim=0) - torch.logsumexp(F.logsigmoid(-z), dim=0)
    return fused


def uniform_soup(state_dicts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    r"""Uniform model soup, Wortsman et al., "Model soups: averaging weights of multiple fine-tuned
    models improves accuracy without increasing inference time", ICML 2022.

    .. math::

        \theta_\text{soup} = \frac1M \sum_{m=1}^{M} \theta_m

    for every floating-point (or complex) tensor. Integer and boolean tensors (BatchNorm's
    ``num_batches_tracked``, index buffers) and non-tensor entries are copied from the first state
    dict. The sum is accumulated in float64, one tensor at a time, and cast back to each tensor's
    dtype (so a soup of identical state dicts is exactly the identity); the result lives on the
    first state dict's devices. Averaging weights only helps for models
    fine-tuned from the same starting point (same pretrained backbone). BatchNorm running
    statistics are averaged like the weights (the average of the statistics is not the statistics
    of the averaged network: re-estimate them on training batches if the soup underperforms).

    Args:
        state_dicts: ``M >= 1`` state dicts with the same keys and shapes.

    Returns:
        the averaged state dict (an ``OrderedDict`` in the first one's key order, keeping its
        ``_metadata`` so ``load_state_dict`` sees the same module versions).
    """
    dicts = list(state_dicts)
    if not dicts:
        raise ValueError("uniform_soup needs at least one state dict.")
    first = dicts[0]
    problems = []
    for m, sd in enumerate(dicts[1:], start=1):
        missing = [k for k in first if k not in sd]
        extra = [k for k in sd if k not in first]
        if missing:
            problems.append(f"  state dict {m} lacks {len(missing)} key(s): {missing[:10]}")
        if extra:
            problems.append(f"  state dict {m} has {len(extra)} extra key(s): {extra[:10]}")
        shapes = [
            f"{k}: {tuple(first[k].shape)} vs {tuple(sd[k].shape)}"
            for k in first
            if k in sd and isinstance(first[k], Tensor) and isinstance(sd[k], Tensor) and first[k].shape != sd[k].shape
        ]
        if shapes:
            problems.append(f"  state dict {m} differs in shape for {len(shapes)} key(s): {shapes[:10]}")
    if problems:
        raise ValueError(
            "uniform_soup: the state dicts do not describe the same architecture (compared with state dict 0):\n"
            + "\n".join(problems)
            + "\n  Soup only models with the same backbone, sharing and heads."
        )
    soup: OrderedDict[str, Any] = OrderedDict()
    n = len(dicts)
    for key, value in first.items():
        if isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex()):
            # float64 (complex128) accumulation, one tensor at a time: exact for identical inputs
            acc_dtype = torch.complex128 if value.is_complex() else torch.float64
            if value.device.type == "mps":  # no float64 there
                acc_dtype = torch.promote_types(value.dtype, torch.float32)
            acc = torch.zeros_like(value, dtype=acc_dtype)
            for sd in dicts:
                acc += sd[key].detach().to(device=value.device, dtype=acc_dtype)
            soup[key] = (acc / n).to(value.dtype)
        elif isinstance(value, Tensor):
            soup[key] = value.detach().clone()
        else:
            soup[key] = value
    metadata = getattr(first, "_metadata", None)
    if metadata is not None:
        soup._metadata = metadata  # type: ignore[attr-defined]
    return soup
