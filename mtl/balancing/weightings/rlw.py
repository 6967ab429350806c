"""Random loss weighting (RLW): fresh random weights at every step."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtl.balancing.weightings.base import LossWeighting


class RLW(LossWeighting):
    r"""Random loss weighting, Lin et al., "Reasonable Effectiveness of Random Weighting: A Litmus
    Test for Multi-Task Learning", TMLR 2022.

    At every step

    .. math:: z \sim \mathcal N(0, I_T), \qquad w = \operatorname{softmax}(z),

    (the paper's normal-distribution variant; weights sum to 1). The weights are detached.

    Args:
        num_tasks: number of tasks ``T``.
        seed: if given, the draws come from a private ``torch.Generator`` seeded with it, whose
            state is saved in ``state_dict()`` (so a resumed run draws the same sequence);
            ``None`` draws from the global RNG on the losses' device (reproducible under
            ``seed_everything``).
    """

    def __init__(self, num_tasks: int, seed: int | None = None) -> None:
        super().__init__(num_tasks)
        self.seed = seed
        self._generator: torch.Generator | None = None
        if seed is not None:
            self._generator = torch.Generator(device="cpu")
            self._generator.manual_seed(int(seed))

    def forward(self, losses: Tensor) -> Tensor:
        """``[T]`` losses -> ``[T]`` random weights on the simplex (detached)."""
        self._check_losses(losses)
        if self._generator is None:
            z = torch.randn(self.num_tasks, device=losses.device, dtype=losses.dtype)
        else:
            # Drawn on CPU from the private generator (tiny host-to-device copy, no sync).
            z = torch.randn(self.num_tasks, generator=self._generator, dtype=losses.dtype)
            z = z.to(losses.device, non_blocking=True)
        return torch.softmax(z, dim=0)

    def get_extra_state(self) -> Any:
        """Generator state, so ``state_dict()`` round-trips the random sequence."""
        return None if self._generator is None else self._generator.get_state()

    def set_extra_state(self, state: Any) -> None:
        if state is not None and self._generator is not None:
            self._generator.set_state(state)

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, seed={self.seed}"
