r"""The Gramian engine: task weights from ``G = J J^T`` without holding ``J``, then one backward.

Most gradient aggregators update along a weighting of the task gradients, ``g = w^T J``, with
weights that depend on the Gramian alone: ``w = f(G, L)`` (UPGrad, DualProj, MGDA, CAGrad, IMTL-G,
Nash-MTL, FairGrad, PCGrad, GradVac, Aligned-MTL, ConFIG, MoDo, SDMGrad; their class attribute
``gramian_based`` is True). For them the ``[T, P]`` Jacobian over the shared parameters is never
needed as a whole (the idea of TorchJD's *autogram*):

1. ``G = sum_k J_k J_k^T`` over chunks ``k`` of the shared parameters (``chunk_size`` elements at
   most each; a larger parameter is its own chunk), each ``J_k`` computed by the Jacobian engine
   over that chunk alone and freed before the next: peak memory ``T x max_k P_k`` instead of
   ``T x P``, at the price of one Jacobian computation per chunk (``T`` backward passes each with
   ``method="loop"``, one vmapped pass with ``batched``).
2. The aggregator runs on a ``[T, T]`` surrogate ``R = V diag(sqrt(lambda))`` with ``R R^T = G``
   (``G = V diag(lambda) V^T``, negative round-off eigenvalues clipped): its weights are the ones it
   would compute on ``J``, because it sees ``J`` only through its Gramian.
3. One backward of ``sum_t w_t L_t`` over the shared parameters writes ``g = w^T J``; the
   task-specific parameters get ``d(sum_t L_t)/d theta`` from a second, ordinary backward.

Under DDP each chunk ``J_k`` is averaged over the ranks before it enters ``G`` (the same all-reduce
as :func:`~mtl.balancing.jacobian.reduce_jacobian`, chunk by chunk), so ``G`` is the exact Gramian
of the global Jacobian on every rank; the local gradients of ``sum_t w_t L_t`` are then averaged
over the ranks, which is ``w^T J_global``. (Summing local Gramians would not be exact:
``J_global J_global^T`` has cross-rank terms.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from mtl.balancing.jacobian import METHODS, reduce_jacobian, task_jacobian

__all__ = ["GramianEngine", "gramian_by_chunks", "gramian_factor", "parameter_chunks"]


@dataclass(frozen=True)
class GramianEngine:
    """The Gramian engine's settings (``balancer.engine: {_target_: mtl.balancing.GramianEngine}``).

    Args:
        chunk_size: most parameter elements per chunk (a larger parameter is a chunk of its own).
        method: ``loop``, ``batched`` or ``auto``: how each chunk's Jacobian is computed.
    """

    chunk_size: int = 1_000_000
    method: str = "auto"
    space: str = "params"  # the only space: the representation's Jacobian is small anyway

    def __post_init__(self) -> None:
        if int(self.chunk_size) < 1:
            raise ValueError(f"balancer.engine.chunk_size must be a positive int, got {self.chunk_size}.")
        if self.method not in METHODS:
            raise ValueError(f"balancer.engine.method must be one of {METHODS}, got '{self.method}'.")
        if self.space != "params":
            raise ValueError(
                "mtl.balancing.GramianEngine works in the params space only; use "
                "mtl.balancing.JacobianEngine for balancer.engine.space=representation."
            )


def parameter_chunks(params: Sequence[Tensor], chunk_size: int) -> list[list[Tensor]]:
    """Consecutive groups of ``params`` holding at most ``chunk_size`` elements each (a parameter
    larger than that is a group of its own)."""
    chunks: list[list[Tensor]] = []
    current: list[Tensor] = []
    size = 0
    for p in params:
        if current and size + p.numel() > chunk_size:
            chunks.append(current)
            current, size = [], 0
        current.append(p)
        size += p.numel()
    if current:
        chunks.append(current)
    return chunks


def gramian_by_chunks(losses: Tensor, params: Sequence[Tensor], chunk_size: int, method: str = "auto") -> Tensor:
    """``[T, T]`` float64 Gramian of the Jacobian of ``losses [T]`` over ``params``, one chunk of
    the parameters at a time (each chunk's Jacobian averaged over DDP ranks first). The graph is
    retained."""
    T = losses.numel()
    G = torch.zeros(T, T, dtype=torch.float64, device=losses.device)
    for chunk in parameter_chunks(params, chunk_size):
        Jk = reduce_jacobian(task_jacobian(losses, chunk, method=method, retain_graph=True)).to(torch.float64)
        G += Jk @ Jk.T
        del Jk
    return 0.5 * (G + G.T)


def gramian_factor(G: Tensor) -> Tensor:
    """``R [T, T]`` with ``R R^T = G`` (eigenvalues below 0, round-off, clipped to 0), float32."""
    lam, V = torch.linalg.eigh(G.to(torch.float64))
    return (V * lam.clamp_min(0).sqrt()).to(torch.float32)
