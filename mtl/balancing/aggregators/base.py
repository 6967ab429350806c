"""The interface of gradient aggregators: a task Jacobian in, one update direction out.

A :class:`GradientAggregator` maps ``J`` (``[T, P]``, row ``t`` = gradient of task ``t`` over the
shared parameters or the flattened shared representation; the aggregator does not care which) to
one direction ``g`` (``[P]``) with the sign convention of a gradient: the training code writes ``g``
into ``.grad`` and the optimizer steps along ``-g``. Equal weighting would return ``J.sum(0)``.

Conventions shared by every aggregator:

* Numerics: ``J`` is cast to float32 for the ``P``-sized work (the Gramian ``G = J J^T`` and the final
  ``w @ J``) and the result is cast back to ``J``'s dtype, so float64 and bfloat16 inputs both work.
* Task-space work: problems on the ``T x T`` Gramian (quadratic programs, eigendecompositions,
  the sequential loops of PCGrad and GradVac) run on a float64 host copy of ``G``. That is one
  device-to-host copy of ``T^2`` numbers per step, where solving on the accelerator would need a
  synchronisation per solver iteration (or ``O(T^2)`` tiny kernel launches) anyway. Methods that only
  do elementwise work on ``J`` (GradDrop, DB-MTL) never leave ``J``'s device.
* State that persists across steps (EMA targets, previous solutions, step counters) lives in
  registered buffers, so ``state_dict()`` round-trips and checkpoints resume exactly. Randomised
  methods draw from a generator seeded by ``(seed, step)``, so a seeded run is reproducible from a
  checkpoint too.
* ``last_weights`` holds the effective task weights ``w`` with ``g = w @ J`` after each call, for
  logging, or ``None`` where the method does not produce ``g`` as a combination of the rows of ``J``.
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor, nn

__all__ = ["GradientAggregator", "gramian", "host", "seeded_generator"]


def gramian(J: Tensor) -> Tensor:
    """``J J^T`` (``[T, T]``) of ``J`` (``[T, P]``), symmetrised."""
    G = J @ J.T
    return 0.5 * (G + G.T)


def host(x: Tensor) -> Tensor:
    """A float64 CPU copy of a small task-space tensor (a Gramian, a weight vector)."""
    return x.detach().to(device="cpu", dtype=torch.float64)


class GradientAggregator(nn.Module, abc.ABC):
    """Base class: map a task Jacobian ``J [T, P]`` to one update direction ``g [P]``.

    Subclasses implement :meth:`aggregate` (float32 in, ``(g, weights or None)`` out); the base
    class checks shapes, handles dtypes, disables autograd and records ``last_weights``.

    Args:
        num_tasks: ``T``, the number of rows every ``J`` will have. Every aggregator takes it first
            (even the stateless ones) so that they are all built the same way.
    """

    #: Whether :meth:`forward` needs the task losses (DB-MTL; MGDA with loss normalisation).
    needs_losses: bool = False
    #: Whether the update is ``w^T J`` with weights ``w`` that depend on ``J`` only through its
    #: Gramian ``J J^T`` (and the losses): such a method runs under the Gramian engine
    #: (:mod:`mtl.balancing.gramian`), which never holds ``J``.
    gramian_based: bool = False

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        if int(num_tasks) < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}.")
        self.num_tasks = int(num_tasks)
        self.last_weights: Tensor | None = None
        #: Number of completed calls; kept as a Python int (no device sync) and saved in the
        #: ``state_dict`` through ``get_extra_state``.
        self.step = 0

    def forward(self, J: Tensor, losses: Tensor | None = None) -> Tensor:
        """Aggregate the task Jacobian.

        Args:
            J: ``[T, P]`` per-task gradients, any floating dtype, any device.
            losses: ``[T]`` task losses (only some methods use them).

        Returns:
            ``[P]`` update direction, in ``J``'s dtype and on ``J``'s device.
        """
        if J.dim() != 2 or J.shape[0] != self.num_tasks:
            raise ValueError(
                f"{type(self).__name__} expects a Jacobian of shape [num_tasks={self.num_tasks}, P], "
                f"got {tuple(J.shape)}. Flatten per-task gradients into rows before aggregating."
            )
        if losses is not None:
            losses = losses.detach().reshape(-1).to(device=J.device, dtype=torch.float32)
            if losses.numel() != self.num_tasks:
                raise ValueError(f"losses must have {self.num_tasks} entries, got {losses.numel()}.")
        elif self.needs_losses:
            raise ValueError(
                f"{type(self).__name__} needs the task losses: call it as aggregator(J, losses)."
            )
        with torch.no_grad():
            g, weights = self.aggregate(J.detach().to(torch.float32), losses)
        self.last_weights = None if weights is None else weights.detach().to(torch.float32)
        self.step += 1
        return g.to(J.dtype)

    def get_extra_state(self) -> dict:
        return {"step": self.step}

    def set_extra_state(self, state: dict) -> None:
        self.step = int(state["step"])

    @abc.abstractmethod
    def aggregate(self, J: Tensor, losses: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Float32 ``J [T, P]`` (and ``losses [T]`` or None) -> ``(g [P], weights [T] or None)``."""

    def combine(self, weights: Tensor, J: Tensor) -> tuple[Tensor, Tensor]:
        """``(weights @ J, weights)`` with host-side ``weights`` moved back to ``J``'s device."""
        w = weights.to(device=J.device, dtype=J.dtype)
        return w @ J, w

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}"


def seeded_generator(
    seed: int | None, step: int, device: torch.device | str
) -> torch.Generator | None:
    """A generator on ``device`` seeded by ``(seed, step)``; None (the global RNG) if no seed."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed) * 1_000_003 + int(step))
    return gen
