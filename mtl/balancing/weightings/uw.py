"""Uncertainty weighting (UW): task weights learned as homoscedastic uncertainties."""

from __future__ import annotations


import torch
from torch import Tensor, nn

from mtl.balancing.weightings.base import LossWeighting


class UW(LossWeighting):
    r"""Uncertainty weighting, Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to
    Weigh Losses for Scene Geometry and Semantics", CVPR 2018.

    Each task has a learned log-variance :math:`s_t = \log \sigma_t^2` (initialised to 0) and the
    objective is

    .. math:: \sum_t e^{-s_t} L_t + s_t ,

    i.e. weights :math:`w_t = e^{-s_t}` (attached, so :math:`s_t` is trained by the total loss) and
    ``regularization = sum_t s_t``. This is the paper's classification form
    (:math:`L/\sigma^2 + \log\sigma`, up to the factor on the log term) and the variant used by
    most implementations; the paper's regression form :math:`L/(2\sigma^2) + \log\sigma` is the
    same objective divided by 2, so it has the same optimum :math:`s_t^* = \log L_t`.

    The log-variances are ``nn.Parameter`` s: they must be in the optimizer (no weight decay).

    Args:
        num_tasks: number of tasks ``T``.
        init_log_variance: initial value of every :math:`s_t`.
    """


    def __init__(self, num_tasks: int, init_log_variance: float = 0.0) -> None:
        super().__init__(num_tasks)
        self.log_variances = nn.Parameter(torch.full((num_tasks,), float(init_log_variance)))

    def forward(self, losses: Tensor) -> Tensor:
        """``[T]`` losses -> ``[T]`` weights ``exp(-s)`` (attached to ``log_variances``)."""
        self._check_losses(losses)
        return torch.exp(-self.log_variances).to(device=losses.device, dtype=losses.dtype)

    def regularization(self, losses: Tensor) -> Tensor:
        """``sum_t s_t``: keeps the uncertainties from growing without bound."""
        return self.log_variances.sum().to(device=losses.device, dtype=losses.dtype)
