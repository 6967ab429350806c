"""SDMGrad: stochastic direction-oriented multi-objective gradient descent."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mtl.balancing.aggregators.base import GradientAggregator, gramian, host
from mtl.balancing.solvers import project_simplex_np


class SDMGrad(GradientAggregator):
    r"""SDMGrad of Xiao, Ban and Ji, "Direction-oriented Multi-objective Learning: Simple and
    Provable Stochastic Algorithms", NeurIPS 2023.

    The update is kept close to a target direction, the mean gradient :math:`g_0 = \frac1T\sum_t
    g_t`: with :math:`\lambda \ge 0` the regularisation, the weights solve

    .. math:: \min_{w \in \Delta_T} \tfrac12 \|J^\top w\|^2 + \lambda\, w^\top J g_0 ,

    by ``niter`` projected stochastic gradient steps per iteration, warm-started from the previous
    weights, and the update is

    .. math:: g = \frac{J^\top w + \lambda g_0}{1 + \lambda},

    i.e. MGDA for :math:`\lambda = 0` and the mean gradient for :math:`\lambda \to \infty`. As in
    LibMTL (modified from the official code), the inner problem uses the Gramian divided by the squared mean
    gradient norm, :math:`\tilde G = G / (\bar n^2 + 10^{-8})` with
    :math:`\bar n = \frac1T\sum_t\|g_t\|`, its gradient :math:`\tilde G w + \lambda \tilde G
    \mathbf 1/T`, and SGD with learning rate ``lr`` and momentum ``momentum`` (a fresh momentum
    buffer at every call), each step followed by the projection onto the simplex. Defaults are
    LibMTL's: :math:`\lambda = 0.3`, ``niter = 20``, ``lr = 5``, ``momentum = 0.5``.

    What this implementation does instead of double sampling: the paper estimates the gradient of
    the inner objective with two independent mini-batches :math:`\xi_1, \xi_2` (``J_{xi1}
    J_{xi2}^T``, unbiased for the Gramian of the expected gradients) and takes the update from a
    third, :math:`\zeta`; LibMTL does the same (its trainer draws three batches for SDMGrad). The
    aggregator interface receives one Jacobian per step, so here :math:`\xi_1 = \xi_2 = \zeta` and
    :math:`\tilde G` is built from ``J J^T``, whose expectation also contains the covariance of
    the gradient noise (the bias double sampling removes); the update uses the same ``J``.

    :math:`w` is the buffer ``w``; ``last_weights`` are the effective weights
    :math:`(w + \lambda/T)/(1 + \lambda)`.

    Args:
        num_tasks: number of tasks ``T``.
        lam: regularisation :math:`\lambda \ge 0` towards the mean gradient.
        niter: projected SGD steps on the weights per call.
        lr: their learning rate.
        momentum: their momentum.
    """

    gramian_based = True

    w: Tensor

    def __init__(
        self, num_tasks: int, lam: float = 0.3, niter: int = 20, lr: float = 5.0, momentum: float = 0.5
    ) -> None:
        super().__init__(num_tasks)
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}.")
        if int(niter) != niter or niter < 0:
            raise ValueError(f"niter must be an integer >= 0, got {niter}.")
        self.lam = lam
        self.niter = int(niter)
        self.lr = lr
        self.momentum = momentum
        self.register_buffer("w", torch.full((num_tasks,), 1.0 / num_tasks))

    def aggregate(self, J: Tensor, losses: Tensor | None) -> tuple[Tensor, Tensor]:
        G = host(gramian(J))
        T = G.shape[0]
        scale = G.diagonal().clamp_min(0).sqrt().mean()
        G = G / (scale**2 + 1e-8)
        # The T-sized loop in float64 NumPy: the same arithmetic as torch ops, at a fraction of
        # their per-call cost (20 steps of a handful of ops each were most of this method's time).
        G_np = G.numpy()
        G_mean = G_np.mean(axis=1)
        w = host(self.w).numpy()
        buf = None
        for _ in range(self.niter):
            grad = G_np @ w + self.lam * G_mean
            buf = grad if buf is None else self.momentum * buf + grad
            w = project_simplex_np(w - self.lr * buf)
        w = torch.from_numpy(np.ascontiguousarray(w))
        self.w.copy_(w.to(self.w))
        weights = (w + self.lam / T) / (1.0 + self.lam)
        return self.combine(weights, J)
