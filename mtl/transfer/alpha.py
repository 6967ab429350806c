r"""Schedules of the mixing weight :math:`\alpha` of a combined transfer stage.

A stage that fine-tunes on target tasks while keeping source tasks as auxiliaries minimises

.. math::

    \mathcal L = \alpha(p)\, \mathcal L_\text{source} + \bigl(1 - \alpha(p)\bigr)\, \mathcal L_\text{target},

where :math:`p \in [0, 1]` is the training progress, ``(epoch or step) / total``. Typically
:math:`\alpha` starts high (learn from the source) and ends low (specialise on the target).
Schedules are pure functions of :math:`p`, so resuming or running on several ranks needs no state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

CONFIG_KEY = "schedule.stages.<stage>.alpha"

#: Known schedule names.
SCHEDULES = ("constant", "linear", "cosine", "step")


def alpha_at(
    schedule: str,
    progress: float,
    start: float,
    end: float,
    milestones: Sequence[float] | None = None,
) -> float:
    r"""The weight :math:`\alpha` at training progress :math:`p`.

    With :math:`a_0` = ``start`` and :math:`a_1` = ``end``:

    * ``constant``: :math:`\alpha = a_0` (``end`` is ignored);
    * ``linear``: :math:`\alpha = a_0 + (a_1 - a_0)\, p`;
    * ``cosine``: half a cosine, :math:`\alpha = a_1 + \tfrac12 (a_0 - a_1)(1 + \cos \pi p)`:
      flat at both ends, :math:`(a_0 + a_1)/2` at :math:`p = 1/2` (the shape of SGDR's annealing,
      Loshchilov & Hutter 2017);
    * ``step``: with sorted milestones :math:`m_1 < \dots < m_K` (fractions in :math:`(0, 1]`,
      default ``[0.5]``) and :math:`i(p) = |\{k : p \ge m_k\}|`,
      :math:`\alpha = a_0 + (a_1 - a_0)\, i(p) / K`: ``start`` until the first milestone, ``end``
      from the last one on, equal steps in between.

    Args:
        schedule: ``constant``, ``linear``, ``cosine`` or ``step``.
        progress: :math:`p`, e.g. ``epoch / max_epochs`` or ``global_step / total_steps``; clamped
            to ``[0, 1]``.
        start: :math:`a_0 \in [0, 1]`.
        end: :math:`a_1 \in [0, 1]`.
        milestones: for ``step`` only.

    Returns:
        :math:`\alpha \in [0, 1]`.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"{CONFIG_KEY}.schedule must be one of {SCHEDULES}, got '{schedule}'.")
    for name, value in (("start", start), ("end", end)):
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{CONFIG_KEY}.{name} must be in [0, 1] (a mixing weight), got {value}.")
    if math.isnan(float(progress)):
        raise ValueError("alpha_at: progress is NaN; compute it as (epoch or step) / total with total > 0.")
    if milestones is not None and schedule != "step":
        raise ValueError(f"{CONFIG_KEY}.milestones only applies to schedule 'step', not '{schedule}'.")
    p = min(max(float(progress), 0.0), 1.0)
    a0, a1 = float(start), float(end)
    if schedule == "constant":
        return a0
    if schedule == "linear":
        return a0 + (a1 - a0) * p
    if schedule == "cosine":
        return a1 + 0.5 * (a0 - a1) * (1.0 + math.cos(math.pi * p))
    marks = [0.5] if milestones is None else [float(m) for m in milestones]
    if not marks or any(not 0.0 < m <= 1.0 for m in marks) or marks != sorted(set(marks)):
        raise ValueError(
            f"{CONFIG_KEY}.milestones must be increasing fractions of training in (0, 1], got {list(milestones or [])}."
        )
    passed = sum(p >= m for m in marks)
    return a0 + (a1 - a0) * passed / len(marks)


@dataclass(frozen=True)
class AlphaSchedule:
    """The source weight of a combined stage across its epochs.

    Args:
        start: :math:`\\alpha` at the first epoch.
        end: :math:`\\alpha` at the last epoch (None: ``start``).
        schedule: ``constant``, ``linear``, ``cosine`` or ``step`` (see :func:`alpha_at`).
    """

    start: float = 0.5
    end: float | None = None
    schedule: str = "constant"

    def __post_init__(self) -> None:
        alpha_at(self.schedule, 0.0, self.start, self.start if self.end is None else self.end)  # validates

    def at(self, epoch: int, max_epochs: int | None) -> float:
        """:math:`\\alpha` at ``epoch`` of ``max_epochs`` (progress ``epoch / (max_epochs - 1)``)."""
        if self.schedule == "constant":
            return float(self.start)
        total = max(1, (max_epochs or 1) - 1)
        end = self.start if self.end is None else self.end
        return alpha_at(self.schedule, min(1.0, epoch / total), self.start, end)


def mixing_weights(
    task_weights: Mapping[str, float], targets: Sequence[str], sources: Sequence[str] = (), alpha: float = 0.5
) -> dict[str, float]:
    """Static loss weights of a stage.

    Without source tasks every target's weight is its own (``Task.weight``; the loss is
    ``sum_t w_t L_t``). With source tasks (a combined stage) the loss is
    ``alpha * mean_s(w_s L_s) + (1 - alpha) * mean_t(w_t L_t)``.

    Args:
        task_weights: ``{task: w_t}`` for every target and source.
        targets, sources: task names.
        alpha: the source weight, in ``[0, 1]``.
    """
    if not sources:
        return {t: float(task_weights[t]) for t in targets}
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    w = {t: (1.0 - alpha) * task_weights[t] / len(targets) for t in targets}
    w.update({s: alpha * task_weights[s] / len(sources) for s in sources})
    return w
