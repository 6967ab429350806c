"""IMTL-L: the loss-balancing half of Impartial Multi-Task Learning."""

from __future__ import annotations


import torch
from torch import Tensor, nn

from mtl.balancing.weightings.base import LossWeighting


class IMTLL(LossWeighting):
    r"""IMTL-L, Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021.

    Each task has a learned log-scale :math:`s_t` (initialised to 0) and the objective is

    .. math:: \sum_t e^{s_t} L_t - s_t ,

    i.e. weights :math:`w_t = e^{s_t}` (attached, so :math:`s_t` is trained by the total loss) and
    ``regularization = -sum_t s_t``. Minimising over :math:`s_t` gives :math:`e^{s_t} L_t = 1`:
    every scaled loss is driven to the same value, whatever the raw scale of the task. (With
    :math:`s \to -s` this is the same objective as :class:`~mtl.balancing.weightings.uw.UW`; the
    two differ only in parametrisation and name.)

    The log-scales are ``nn.Parameter`` s: they must be in the optimizer (no weight decay).

    Args:
        num_tasks: number of tasks ``T``.
        init_log_scale: initial value of every :math:`s_t`.
    """


    def __init__(self, num_tasks: int, init_log_scale: float = 0.0) -> None:
        super().__init__(num_tasks)
        self.log_scales = nn.Parameter(torch.full((num_tasks,), float(init_log_scale)))

    def forward(self, losses: Tensor) -> Tensor:
        """``[T]`` losses -> ``[T]`` weights ``exp(s)`` (attached to ``log_scales``)."""
        self._check_losses(losses)
        return torch.exp(self.log_scales).to(device=losses.device, dtype=losses.dtype)

    def regularization(self, losses: Tensor) -> Tensor:
        """``-sum_t s_t``: stops the scales from collapsing to zero."""
        return (-self.log_scales.sum()).to(device=losses.device, dtype=losses.dtype)
