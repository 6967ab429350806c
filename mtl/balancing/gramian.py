r"""The Gramian engine: task weights from ``G = J J^T`` without holding ``J``, then one backward.

Most gradient aggregators update along a weighting of the task gradients, ``g = w^T J``, with
weights that depend on the Gramian alone: ``w = f(G, L)`` (UPGrad, DualProj, MGDA, CAGrad, IMTL-G,
Nash-MTL, FairGrad, PCGrad, GradVac, Aligned-MTL, ConFIG, MoDo, SDMGrad; their class attribute
``gramian_based`` is True). For them the ``[T, P]`` Jacobian over the shared parameters is never
needed as a whole (the idea of TorchJD's *autogram*):

1. ``G = sum_l G_l``, layer by layer. For an ``nn.Linear`` layer of the shared part (recorded by
   forward hooks once the engine is attached to the model, :meth:`GramianEngine.attach`) with
   inputs ``a [N, d_in]`` and the task ``t``'s gradient of its outputs ``D_t [N, d_out]``
   (``N`` = the examples, or every position of a sequence), the weight's task gradient is
   ``D_t^T a`` and
   ``<D_t^T a, D_s^T a> = sum_{n,m} (a a^T)_{nm} (D_t D_s^T)_{nm}``: the Gramian needs only the
   ``T x N x d_out`` output gradients (one backward per task down to the layer outputs, no weight
   gradients) and the ``N x N`` Gram of the inputs, never the ``T x d_out x d_in`` Jacobian; the bias
   adds ``(1^T D_t) . (1^T D_s)``. The other shared parameters (convolutions, normalisation,
   embeddings) go by chunks ``k`` of at most ``chunk_size`` elements (a larger parameter is a
   chunk of its own), ``G += J_k J_k^T`` with each ``J_k`` computed over that chunk alone and
   freed before the next: peak memory ``T x max_k P_k`` instead of ``T x P``.
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

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from mtl.balancing.jacobian import METHODS, reduce_jacobian, task_jacobian

__all__ = ["GramianEngine", "gramian_by_chunks", "gramian_factor", "linear_layers_gramian", "parameter_chunks"]


@dataclass
class GramianEngine:
    """The Gramian engine (``balancer.engine: {_target_: mtl.balancing.GramianEngine}``).

    Args:
        chunk_size: most parameter elements per chunk for the parameters outside recorded linear
            layers (a larger parameter is a chunk of its own).
        method: ``loop``, ``batched`` or ``auto``: how each chunk's Jacobian is computed.

    :meth:`attach` it to the shared part of the model (the training module does) so that its linear
    layers take the per-layer route; without it every parameter goes by chunks.
    """

    chunk_size: int = 1_000_000
    method: str = "auto"
    space: str = "params"  # the only space: the representation's Jacobian is small anyway
    _records: list = field(default_factory=list, init=False, repr=False, compare=False)

    def attach(self, module: nn.Module) -> None:
        """Record the inputs and outputs of every ``nn.Linear`` in ``module`` during forward passes
        with gradients enabled (the training step's)."""
        for layer in module.modules():
            if isinstance(layer, nn.Linear):
                layer.register_forward_hook(self._record)

    def _record(self, layer: nn.Module, inputs, output: Tensor) -> None:
        if torch.is_grad_enabled() and output.requires_grad:
            self._records.append((layer, inputs[0], output))

    def take_records(self) -> list[tuple[nn.Module, Tensor, Tensor]]:
        """The linear layers' ``(layer, input, output)`` since the last call."""
        records, self._records = self._records, []
        return records

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
        Jk = reduce_jacobian(task_jacobian(losses, chunk, method=method, retain_graph=True))
        G += (Jk @ Jk.T).double()
        del Jk
    return 0.5 * (G + G.T)


def linear_layers_gramian(
    losses: Tensor, records: Sequence[tuple[nn.Module, Tensor, Tensor]]
) -> tuple[Tensor, list[Tensor]]:
    """The Gramian over the weights and biases of recorded linear layers, from their inputs and the
    task gradients of their outputs (see the module docstring); ``(G [T, T] float64, the
    parameters it covers)``. Under DDP the per-layer gradient statistics are not reduced here: the
    caller uses this route only when not distributed."""
    T = losses.numel()
    G = torch.zeros(T, T, dtype=torch.float64, device=losses.device)
    if not records:
        return G, []
    by_layer: dict[int, list] = {}
    for layer, a, y in records:
        by_layer.setdefault(id(layer), []).append((layer, a, y))
    outputs = [y for _, _, y in records]
    # D_t for every recorded output: one backward per task, down to the layer outputs only
    grads = [torch.autograd.grad(losses[t], outputs, retain_graph=True, allow_unused=True) for t in range(T)]
    covered: list[Tensor] = []
    index = {id(y): i for i, y in enumerate(outputs)}
    for calls in by_layer.values():
        layer = calls[0][0]
        a = torch.cat([c[1].detach().reshape(-1, c[1].shape[-1]) for c in calls]).float()  # [N, d_in]
        D = torch.stack([
            torch.cat([
                (g[index[id(c[2])]] if g[index[id(c[2])]] is not None else torch.zeros_like(c[2])).reshape(-1, c[2].shape[-1])
                for c in calls
            ])
            for g in grads
        ]).float()  # [T, N, d_out]
        A = a @ a.T
        G += torch.einsum("tno,sno->ts", D, torch.matmul(A, D)).double()
        covered.append(layer.weight)
        if layer.bias is not None and layer.bias.requires_grad:
            S = D.sum(dim=1)  # [T, d_out]
            G += (S @ S.T).double()
            covered.append(layer.bias)
    return 0.5 * (G + G.T), covered


def gramian_factor(G: Tensor) -> Tensor:
    """``R [T, T]`` with ``R R^T = G`` (eigenvalues below 0, round-off, clipped to 0), float32."""
    lam, V = torch.linalg.eigh(G.to(torch.float64))
    return (V * lam.clamp_min(0).sqrt()).to(torch.float32)
