"""Static weighting: fixed, hand-chosen task weights."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from mtl.balancing.weightings.base import LossWeighting, per_task_list


class Static(LossWeighting):
    r"""Fixed weights :math:`w_t = c_t` given in the config; objective :math:`\sum_t c_t L_t`.

    Args:
        num_tasks: number of tasks ``T``.
        weights: one weight per task, in task order (``balancer.method.weights``); ``None`` means
            all ones (same as :class:`EW`).

    Raises:
        ValueError: if ``weights`` does not have ``T`` entries.
    """

    def __init__(self, num_tasks: int, weights: Sequence[float] | None = None) -> None:
        super().__init__(num_tasks)
        # Not persistent: the weights come from the config, which wins on resume.
        self.register_buffer(
            "weights",
            per_task_list(weights, num_tasks, "balancer.method.weights", 1.0),
            persistent=False,
        )

    def forward(self, losses: Tensor) -> Tensor:
        """``[T]`` losses -> the ``[T]`` configured weights (detached)."""
        self._check_losses(losses)
        return self.weights.to(device=losses.device, dtype=losses.dtype)

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, weights={self.weights.tolist()}"
