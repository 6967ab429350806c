"""Transfer math on CUDA under mixed precision (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from mtl.transfer.fusion import average_predictions, uniform_soup
from mtl.transfer.regularizers import bss, delta, l2sp, lwf_distillation, snapshot

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_regularizers_under_autocast(dtype: torch.dtype) -> None:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8).to(dev)
    start = snapshot(lin.parameters())
    x = torch.randn(32, 16, device=dev)
    with torch.autocast("cuda", dtype=dtype):
        f = lin(x)  # low-precision features
        assert f.dtype == dtype
        reg = bss(f, k=2, weight=1.0)
        ref = bss(f.float(), k=2, weight=1.0)
        dist = lwf_distillation(f, f.detach() + 0.1, "multilabel")
        fm = delta([f.unsqueeze(-1)], [f.detach().unsqueeze(-1) * 0.5], weight=1.0)
    total = reg.float() + dist.float() + fm.float() + l2sp(lin.parameters(), start, alpha=1.0)
    assert torch.isfinite(total)
    assert torch.allclose(reg.float(), ref.float(), rtol=2e-2)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in lin.parameters())


def test_fusion_on_cuda() -> None:
    dev = torch.device("cuda")
    outs = [{"a": torch.randn(4, 3, device=dev), "b": torch.randn(4, 1, device=dev)} for _ in range(3)]
    fused = average_predictions(outs, {"a": "multiclass", "b": "binary"})
    mean = torch.stack([o["a"].softmax(-1) for o in outs]).mean(0)
    assert fused["a"].device.type == "cuda" and torch.allclose(fused["a"].exp(), mean, atol=1e-6)
    nets = [torch.nn.BatchNorm1d(4).to(dev) for _ in range(2)]
    soup = uniform_soup([n.state_dict() for n in nets])
    assert all(v.device.type == "cuda" for v in soup.values())
