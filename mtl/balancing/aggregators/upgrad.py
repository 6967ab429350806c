"""UPGrad: unconflicting projection of gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl.balancing.aggregators.base import GradientAggregator, gramian, host
from mtl.balancing.solvers import dual_cone_weights_batched


def normalize_and_regularize(G: Tensor, reg_eps: float) -> Tensor:
    """``G / trace(G) + reg_eps I`` (``G`` itself plus the ridge if the trace is zero)."""
    trace = G.diagonal().sum()
    if bool(trace > 0):
        G = G / trace
    return G + reg_eps * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)


class UPGrad(GradientAggregator):
    r"""Unconflicting projection of gradients of Quinton and Rey, "Jacobian Descent for
    Multi-Objective Optimization", arXiv 2406.16700, 2024.

    Project every task gradient onto the dual cone of the rows, :math:`\{x : Jx \ge 0\}`, and
    average the projections: :math:`g = \frac1T \sum_t \pi_J(g_t)`. By Proposition 1 of the paper,
    :math:`\pi_J(J^\top u) = J^\top v` with :math:`v = \arg\min_{v \ge u} v^\top G v`, so

    .. math:: g = \Big(\frac1T \sum_t v_t\Big)^\top J, \qquad v_t = \arg\min_{v \ge e_t} v^\top G v .

    The result has a non-negative inner product with every row; when no pair of rows conflicts it
    is the mean of the rows. As in TorchJD, ``G`` is divided by its trace and ``reg_eps * I`` is
    added before solving (so the guarantee holds up to :math:`J g \ge -\text{reg\_eps}\,
    \operatorname{tr}(G)\, w`); the QPs are solved exactly by
    :func:`~mtl.balancing.solvers.dual_cone_weights_batched` (the T problems share ``G`` and are
    solved together by block principal pivoting: a few batched face solves, checked against the
    KKT conditions, with the active set as the fallback).

    Args:
        num_tasks: number of tasks ``T``.
        reg_eps: ridge added to the trace-normalised Gramian (TorchJD default ``1e-4``).
    """

    gramian_based = True

    def __init__(self, num_tasks: int, reg_eps: float = 1e-4) -> None:
        super().__init__(num_tasks)
        if reg_eps < 0:
            raise ValueError(f"reg_eps must be >= 0, got {reg_eps}.")
        self.reg_eps = reg_eps

    def aggregate(self, J: Tensor, losses: Tensor | None) -> tuple[Tensor, Tensor]:
        G = normalize_and_regularize(host(gramian(J)), self.reg_eps)
        T = G.shape[0]
        V = dual_cone_weights_batched(torch.eye(T, dtype=G.dtype) / T, G)
        return self.combine(V.sum(0), J)
