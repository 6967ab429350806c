"""Counting the operations that make the host wait for an accelerator, on any device.

On a GPU, some operations cannot be queued: the host must wait for the device to finish before
it can go on, because it needs a value (``tensor.item()``, ``bool(tensor)``, ``if mask.any():``)
or a size that depends on the data (boolean indexing, ``nonzero``, ``masked_select``,
``bincount``, ``unique``). A training step that makes one stalls the pipeline each time.
``torch.cuda.set_sync_debug_mode`` reports them on a GPU only; :class:`HostSyncCounter` counts the
same kinds of operation at the dispatcher, so a CPU test can check that a step makes none::

    with HostSyncCounter() as syncs:
        module.training_step(batch, 0)
    assert syncs.total == 0, syncs.where

Copies to the host wait too. On an accelerator they reach the dispatcher as a copy from the device
to the CPU and are counted (``"copy to host"``); on a CPU ``.cpu()`` and ``.numpy()`` are no-ops
that never reach it, so there the count is a lower bound for code that moves work to NumPy.

On a CPU run every tensor is on the host, so the counter counts what would wait if the same
tensors were on a GPU. Code that moves a small tensor to the host on purpose and then reads it
there (the gradient aggregators copy their ``T x T`` Gramian with ``host()``, one copy per step,
and solve on the CPU) is counted for every read; on a GPU only the copy waits. Reading a tensor
that lives on the CPU by design is not a device sync. torch.optim's step
counters are such tensors (CPU-resident unless ``capturable`` or ``fused``), so reads from
``torch/optim`` are not counted.
"""

from __future__ import annotations

import collections
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncCounter", "SYNCING_OPS"]

#: aten operations that make the host wait for the device
SYNCING_OPS = frozenset(
    {
        "_local_scalar_dense",  # item(), bool(), int(), float() of a tensor
        "nonzero",
        "masked_select",
        "bincount",
        "unique",
        "_unique",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "repeat_interleave",
        "histogram",
    }
)

_SKIP_FRAMES = ("torch/utils/_python_dispatch", "torch/_ops.py", "mtl/syncs.py", "torch/_compile.py", "torch/_dynamo")


class HostSyncCounter(TorchDispatchMode):
    """A dispatch mode that counts syncing operations while it is active.

    Attributes:
        counts: ``{op name: count}``.
        where: ``{"op <- file:line <- ...": count}``, the three innermost Python frames of each.
        total: the number of syncing operations.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.where: collections.Counter[str] = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def _record(self, name: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-2] if not any(s in f.filename for s in _SKIP_FRAMES)]
        if frames and "torch/optim" in frames[-1].filename:
            return
        self.counts[name] += 1
        path = " <- ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in reversed(frames[-3:]))
        self.where[f"{name} <- {path}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        indices = args[1] if name == "index" and len(args) > 1 else ()
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
            self._record("index (boolean mask)")
        elif name in SYNCING_OPS:
            self._record(name)
        elif name in ("_to_copy", "copy_") and _device_to_host(name, args, kwargs):
            self._record("copy to host")
        return func(*args, **kwargs)


def _device_to_host(name: str, args, kwargs) -> bool:
    """Whether a dispatched copy goes from an accelerator to the CPU."""
    if name == "copy_":
        dst, src = args[0], args[1]
        return isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst.device.type == "cpu"
    src, device = args[0], kwargs.get("device")
    return src.device.type != "cpu" and device is not None and torch.device(device).type == "cpu"
