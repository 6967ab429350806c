"""The interface every loss weighting follows.

A loss weighting maps the vector of task losses ``L`` (shape ``[T]``) to task weights ``w``
(shape ``[T]``). The training objective is

    total = sum_t w_t * L_t + regularization(L)

and is minimised with one ordinary backward, so automatic optimization (AMP, gradient
accumulation, clipping) keeps working. Methods whose true objective is not a weighted sum (GLS,
STCH, FAMO) return *detached* weights chosen so that ``sum_t w_t L_t`` has exactly the gradient of
their objective; methods that learn their weights (UW, IMTL-L) return weights attached to their
own ``nn.Parameter`` s.

Contract with the training loop (all hooks are no-ops unless a method needs them):

1. Every training step: ``weights = weighting(losses)`` (or, when
   ``needs_shared_parameters``, ``weighting(losses, shared_parameters=[...])``), then
   ``total = (weights * losses).sum() + weighting.regularization(losses)``, then backward.
   :meth:`LossWeighting.weighted_loss` does exactly this. ``forward`` must come before
   ``regularization`` (GradNorm caches what its regularization needs in ``forward``).
2. The weighting's ``parameters()`` (learned weights: UW, IMTL-L, GradNorm) are optimised with the
   model, best as their own parameter group with ``weight_decay=0``.
3. If ``needs_losses_after_step``: after each optimizer step, recompute the task losses on the
   *same batch* with the updated model (under ``torch.no_grad()``) and call
   ``after_optimizer_step(new_losses)``.
4. At the end of every training epoch: ``on_train_epoch_end()`` (epoch-based methods: DWA, STCH).

State (learned parameters, histories, counters) lives in parameters and registered buffers, so
``state_dict()`` checkpoints it. Values that come from the config (static weights, temperatures)
are not persisted: they are re-read from the config on resume. Weightings only update their state
in training mode (``self.training``), so calling them during validation changes nothing.
"""

from __future__ import annotations

import abc
from typing import ClassVar, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn


class LossWeighting(nn.Module, abc.ABC):
    """Base class: maps task losses ``[T]`` to task weights ``[T]``.

    Args:
        num_tasks: number of tasks ``T``; sizes every per-task parameter and buffer. Passed by the
            training module, not set in the config.

    Class attributes (read by the training module):
        needs_shared_parameters: ``forward`` takes ``shared_parameters`` (GradNorm).
        needs_losses_after_step: ``after_optimizer_step`` must be called with recomputed losses.
    """

    needs_shared_parameters: ClassVar[bool] = False
    needs_losses_after_step: ClassVar[bool] = False

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}.")
        self.num_tasks = num_tasks

    @abc.abstractmethod
    def forward(self, losses: Tensor) -> Tensor:
        """Task weights.

        Args:
            losses: ``[T]`` task losses of the current batch (attached to the graph).

        Returns:
            ``[T]`` weights on ``losses.device`` with ``losses.dtype``; detached unless the
            weights are themselves learned by backpropagating the total loss.
        """

    def regularization(self, losses: Tensor) -> Tensor:
        """Scalar term added to ``(weights * losses).sum()``; zero by default.

        Args:
            losses: ``[T]`` the same losses that were passed to ``forward``.
        """
        return losses.new_zeros(())

    def on_train_epoch_end(self) -> None:
        """Called once at the end of each training epoch. No-op by default."""

    def after_optimizer_step(self, losses: Tensor) -> None:
        """Called after each optimizer step when ``needs_losses_after_step``. No-op by default.

        Args:
            losses: ``[T]`` task losses on the same batch, recomputed with the updated model.
        """

    def weighted_loss(
        self, losses: Tensor, shared_parameters: Sequence[Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Convenience: ``(total, weights)`` with ``total = (w * L).sum() + regularization(L)``.

        Args:
            losses: ``[T]`` task losses.
            shared_parameters: parameters of the last shared layer; required when
                ``needs_shared_parameters``, ignored otherwise.

        Returns:
            scalar total loss to backpropagate, and the ``[T]`` weights used.
        """
        if self.needs_shared_parameters:
            if shared_parameters is None:
                raise ValueError(
                    f"{type(self).__name__} needs the shared parameters: call "
                    "weighted_loss(losses, shared_parameters=[...last shared layer's params...])."
                )
            weights = self(losses, shared_parameters=list(shared_parameters))
        else:
            weights = self(losses)
        total = (weights * losses).sum() + self.regularization(losses)
        return total, weights

    def _check_losses(self, losses: Tensor) -> None:
        if losses.dim() != 1 or losses.shape[0] != self.num_tasks:
            raise ValueError(
                f"{type(self).__name__} expects a [num_tasks={self.num_tasks}] vector of task "
                f"losses, got shape {tuple(losses.shape)}."
            )

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}"


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` in place across DDP ranks (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean_(tensor: Tensor) -> Tensor:
    """Average ``tensor`` in place across DDP ranks (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def per_task_list(
    values: Sequence[float] | None, num_tasks: int, key: str, default: float
) -> Tensor:
    """A ``[num_tasks]`` float tensor from an optional config list, with a clear length check.

    Args:
        values: one number per task, or ``None`` for ``default`` everywhere.
        num_tasks: expected length ``T``.
        key: the config key, named in the error message (e.g. ``balancer.method.weights``).
        default: fill value when ``values`` is ``None``.
    """
    if values is None:
        return torch.full((num_tasks,), float(default))
    values = [float(v) for v in values]
    if len(values) != num_tasks:
        raise ValueError(
            f"`{key}` has {len(values)} entries but there are {num_tasks} tasks: give one value "
            f"per task, in task order (e.g. `{key}=[{', '.join(['1.0'] * num_tasks)}]`)."
        )
    return torch.tensor(values)
