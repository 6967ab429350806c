"""Synthetic regression tasks with controlled correlation (the MMoE paper's protocol)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from mtl.data.base import MultiTaskDataModule
from mtl.tasks import Task


def make_synthetic(
    n: int,
    num_tasks: int,
    correlation: float,
    dim: int = 100,
    num_sines: int = 10,
    scale: float = 1.0,
    noise: float = 0.1,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Data following Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate
    Mixture-of-Experts" (KDD 2018), section 3.2, generalised to ``num_tasks`` tasks.

    Task weight vectors ``w_t = scale * (L U)_t`` where ``U`` has orthonormal rows and ``L`` is the
    Cholesky factor of the correlation matrix with ``correlation`` off the diagonal, so every pair of
    weight vectors has cosine ``correlation`` (for two tasks this is exactly the paper's
    ``w1 = c u1, w2 = c (p u1 + sqrt(1 - p^2) u2)``). With ``x ~ N(0, I)``,
    ``y_t = w_t.x + sum_i sin(alpha_i w_t.x + beta_i) + eps``, ``alpha_i, beta_i ~ N(0, 1)`` shared
    by all tasks, ``eps ~ N(0, noise^2)``. The label correlation (Pearson) falls with the weight
    correlation, as in the paper.

    Returns:
        ``x [n, dim]`` and ``y [n, num_tasks]`` (float32).
    """
    if not -1.0 <= correlation <= 1.0:
        raise ValueError(f"data.correlation must be in [-1, 1], got {correlation}.")
    if num_tasks > dim:
        raise ValueError(f"data.num_tasks ({num_tasks}) cannot exceed data.dim ({dim}).")
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, num_tasks)))
    corr = np.full((num_tasks, num_tasks), correlation) + (1 - correlation) * np.eye(num_tasks)
    # a correlation of exactly 1 makes the matrix singular; a tiny jitter keeps Cholesky defined
    chol = np.linalg.cholesky(corr + 1e-9 * np.eye(num_tasks))
    weights = scale * chol @ basis.T  # [T, dim]
    alpha = rng.standard_normal(num_sines)
    beta = rng.standard_normal(num_sines)
    x = rng.standard_normal((n, dim))
    proj = x @ weights.T  # [n, T]
    y = proj + np.sin(proj[..., None] * alpha + beta).sum(-1) + noise * rng.standard_normal(proj.shape)
    return x.astype(np.float32), y.astype(np.float32)


class SyntheticDataModule(MultiTaskDataModule):
    """Regression tasks ``t0, t1, ...`` with pairwise weight correlation ``correlation``.

    Args:
        num_tasks: number of tasks (their names are ``t0 .. t{num_tasks-1}``).
        correlation: cosine between task weight vectors (the MMoE paper's ``p``).
        n_train, n_val, n_test: split sizes (one generated sample, split in order).
        dim, num_sines, scale, noise: see :func:`make_synthetic`.
    """

    def __init__(
        self,
        num_tasks: int = 2,
        correlation: float = 0.5,
        n_train: int = 8000,
        n_val: int = 1000,
        n_test: int = 1000,
        dim: int = 100,
        num_sines: int = 10,
        scale: float = 1.0,
        noise: float = 0.1,
        **kwargs,
    ) -> None:
        self.num_tasks = int(num_tasks)
        self.options = dict(
            correlation=float(correlation), dim=int(dim), num_sines=int(num_sines),
            scale=float(scale), noise=float(noise),
        )
        self.sizes = (int(n_train), int(n_val), int(n_test))
        super().__init__(**kwargs)

    def available_tasks(self) -> Sequence[str]:
        return tuple(f"t{i}" for i in range(self.num_tasks))

    def default_tasks(self) -> dict[str, Task]:
        return {t: Task(t, kind="regression") for t in self.available_tasks()}

    def build(self):
        x, y = make_synthetic(sum(self.sizes), self.num_tasks, seed=self.seed, **self.options)
        out, start = {}, 0
        for split, n in zip(("train", "val", "test"), self.sizes):
            sl = slice(start, start + n)
            start += n
            labels = {f"t{i}": torch.from_numpy(y[sl, i].copy()) for i in range(self.num_tasks)}
            out[split] = (torch.from_numpy(x[sl].copy()), {t: labels[t] for t in self.tasks})
        return out
