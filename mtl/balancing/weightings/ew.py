"""Equal weighting (EW): the plain sum of task losses, the baseline every method is compared to."""

from __future__ import annotations

from torch import Tensor

from mtl.balancing.weightings.base import LossWeighting


class EW(LossWeighting):
    r"""Equal weighting: :math:`w_t = 1`, so the objective is :math:`\sum_t L_t`.

    Also called unitary scalarization (Kurin et al., NeurIPS 2022, "In Defense of the Unitary
    Scalarization for Deep Multi-Task Learning").

    Args:
        num_tasks: number of tasks ``T``.
    """

    def forward(self, losses: Tensor) -> Tensor:
        """``[T]`` losses -> ``[T]`` ones (detached)."""
        self._check_losses(losses)
        return losses.new_ones(self.num_tasks)
