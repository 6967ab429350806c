"""Fine-tuning regularizers on hand-computable values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtl.transfer.regularizers import bss, delta, delta_attention_weights, l2sp, lwf_distillation, snapshot


# ------------------------------------------------------------------------------------------ L2-SP
def test_l2sp_hand_value() -> None:
    w1 = torch.tensor([1.0, 2.0], requires_grad=True)
    w2 = torch.tensor([[0.0, 3.0]], requires_grad=True)
    start = [torch.tensor([0.0, 0.0]), torch.tensor([[1.0, 1.0]])]
    head = torch.tensor([2.0, -1.0], requires_grad=True)
    # ||w - w0||^2 = 1 + 4 + 1 + 4 = 10 ; ||head||^2 = 5
    value = l2sp([w1, w2], start, alpha=0.2, new_params=[head], beta=0.4)
    assert value.item() == pytest.approx(0.1 * 10 + 0.2 * 5)
    value.backward()
    assert torch.allclose(w1.grad, 0.2 * torch.tensor([1.0, 2.0]))
    assert torch.allclose(head.grad, 0.4 * head.detach())


def test_l2sp_zero_at_start_and_snapshot_is_detached_copy() -> None:
    w = torch.nn.Parameter(torch.randn(3, 2))
    start = snapshot([w])
    assert not start[0].requires_grad and start[0].data_ptr() != w.data_ptr()
    assert l2sp([w], start).item() == 0.0
    with torch.no_grad():
        w.add_(1.0)
    assert start[0].ne(w).all()  # the snapshot did not move with the parameter
    assert l2sp([w], start, alpha=1.0).item() == pytest.approx(0.5 * 6)


def test_l2sp_errors_name_config_key() -> None:
    with pytest.raises(ValueError, match=r"regularizers\.l2sp: 1 parameters but 2"):
        l2sp([torch.zeros(2)], [torch.zeros(2), torch.zeros(2)])
    with pytest.raises(ValueError, match=r"regularizers\.l2sp: parameter 0 has shape"):
        l2sp([torch.zeros(2)], [torch.zeros(3)])


# ------------------------------------------------------------------------------------------ LwF
def test_lwf_zero_when_unchanged() -> None:
    z = torch.randn(5, 4)
    for kind, out in (("multiclass", z), ("binary", z[:, :1]), ("multilabel", z), ("regression", z)):
        assert lwf_distillation(out.clone(), out, kind).abs().item() < 1e-6, kind


def test_lwf_multiclass_matches_hand_kl() -> None:
    new = torch.tensor([[0.0, 0.0], [2.0, 0.0]], requires_grad=True)
    old = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    t = 2.0
    # row 0: p_old = softmax([1, 0]), p_new = [1/2, 1/2]; row 1 identical -> KL 0
    p = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    kl0 = float((p * (p.log() - math.log(0.5))).sum())
    expected = t * t * (kl0 + 0.0) / 2
    value = lwf_distillation(new, old, "multiclass", temperature=t)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    # same gradient as LwF's modified cross-entropy (they differ by the constant entropy of p_old)
    value.backward()
    new2 = new.detach().clone().requires_grad_(True)
    ce = -(torch.softmax(old / t, 1) * torch.log_softmax(new2 / t, 1)).sum(1).mean() * t * t
    ce.backward()
    assert torch.allclose(new.grad, new2.grad, atol=1e-6)


def test_lwf_binary_is_bce_minus_entropy() -> None:
    new = torch.tensor([[0.0], [1.0]])
    old = torch.tensor([[2.0], [-2.0]])
    t = 2.0
    q = torch.sigmoid(old / t)
    bce = F.binary_cross_entropy(torch.sigmoid(new / t), q)
    ent = F.binary_cross_entropy(q, q)
    value = lwf_distillation(new, old, "binary", temperature=t, weight=0.5)
    assert value.item() == pytest.approx(0.5 * t * t * (bce - ent).item(), rel=1e-5)
    assert value.item() > 0


def test_lwf_regression_is_mse_and_old_is_detached() -> None:
    new = torch.tensor([[1.0, 2.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0]], requires_grad=True)
    value = lwf_distillation(new, old, "regression", temperature=5.0)
    assert value.item() == pytest.approx(2.5)
    value.backward()
    assert old.grad is None


def test_lwf_errors() -> None:
    with pytest.raises(ValueError, match=r"regularizers\.lwf: task kind"):
        lwf_distillation(torch.zeros(2, 2), torch.zeros(2, 2), "ranking")
    with pytest.raises(ValueError, match=r"regularizers\.lwf\.temperature"):
        lwf_distillation(torch.zeros(2, 2), torch.zeros(2, 2), "multiclass", temperature=0)
    with pytest.raises(ValueError, match="differ in shape"):
        lwf_distillation(torch.zeros(2, 2), torch.zeros(2, 3), "multiclass")


# ------------------------------------------------------------------------------------------ BSS
def test_bss_diagonal_matrix() -> None:
    f = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 2.0]], requires_grad=True)
    assert bss(f, k=1, weight=1.0).item() == pytest.approx(0.25)
    assert bss(f, k=2, weight=1.0).item() == pytest.approx(0.25 + 4.0)
    assert bss(f).item() == pytest.approx(0.001 * 0.25)
    bss(f, weight=1.0).backward()
    # d sigma_min^2 / dF = 2 sigma_min u v^T, here at entry (1, 1)
    expected = torch.zeros(3, 3)
    expected[1, 1] = 1.0
    assert torch.allclose(f.grad, expected, atol=1e-5)


def test_bss_wide_and_tall_batches() -> None:
    # B < D: 2 singular values (4 and 1)
    wide = torch.tensor([[4.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    assert bss(wide, weight=1.0).item() == pytest.approx(1.0)
    # k larger than min(B, D): all of them
    assert bss(wide, k=5, weight=1.0).item() == pytest.approx(17.0)
    # B > D
    tall = wide.t().contiguous()
    assert bss(tall, weight=1.0).item() == pytest.approx(1.0)


def test_bss_errors() -> None:
    with pytest.raises(ValueError, match=r"regularizers\.bss: features must be a \[B, D\]"):
        bss(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"regularizers\.bss\.k"):
        bss(torch.zeros(2, 3), k=0)


# ------------------------------------------------------------------------------------------ DELTA
def test_delta_known_maps() -> None:
    # stage 0: [B=2, C=2, 2] maps, stage 1: [B=2, C=1] vectors
    fm0 = torch.zeros(2, 2, 2)
    fm = fm0.clone()
    fm[0, 0] = torch.tensor([1.0, 1.0])  # example 0, channel 0: squared norm 2
    fm[1, 1] = torch.tensor([2.0, 0.0])  # example 1, channel 1: squared norm 4
    v0 = torch.zeros(2, 1)
    v = torch.tensor([[3.0], [0.0]])  # example 0: 9
    # stage 0: mean over batch of (2, 4) = 3 ; stage 1: mean of (9, 0) = 4.5
    assert delta([fm, v], [fm0, v0], weight=1.0).item() == pytest.approx(7.5)
    assert delta([fm, v], [fm0, v0]).item() == pytest.approx(0.075)
    # channel weights [C]: channel 0 x 2, channel 1 x 0 -> stage 0 = mean(4, 0) = 2
    w = [torch.tensor([2.0, 0.0]), None]
    assert delta([fm, v], [fm0, v0], channel_weights=w, weight=1.0).item() == pytest.approx(2 + 4.5)
    # per-example weights [B, C]
    w = [torch.tensor([[1.0, 1.0], [1.0, 0.5]]), torch.tensor([[0.0], [1.0]])]
    assert delta([fm, v], [fm0, v0], channel_weights=w, weight=1.0).item() == pytest.approx((2 + 2) / 2 + 0)


def test_delta_channels_last_and_source_detached() -> None:
    h0 = torch.zeros(1, 3, 2, requires_grad=True)  # [B, L, H]
    h = torch.ones(1, 3, 2, requires_grad=True)
    w = [torch.tensor([1.0, 0.0])]
    # hidden unit 0 over 3 tokens: 3
    value = delta([h], [h0], channel_weights=w, weight=1.0, channel_dim=-1)
    assert value.item() == pytest.approx(3.0)
    value.backward()
    assert h0.grad is None and h.grad is not None


def test_delta_errors() -> None:
    with pytest.raises(ValueError, match=r"regularizers\.delta: 1 feature maps but 2"):
        delta([torch.zeros(1, 2)], [torch.zeros(1, 2), torch.zeros(1, 2)])
    with pytest.raises(ValueError, match="stage 0 maps have shapes"):
        delta([torch.zeros(1, 2)], [torch.zeros(1, 3)])
    with pytest.raises(ValueError, match="channel weights have shape"):
        delta([torch.zeros(1, 2)], [torch.zeros(1, 2)], channel_weights=[torch.ones(3)])


def test_delta_attention_weights() -> None:
    equal = delta_attention_weights(torch.tensor([0.3, 0.3, 0.3, 0.3]))
    assert torch.allclose(equal, torch.ones(4))
    w = delta_attention_weights(torch.tensor([math.log(3.0), 0.0]))
    assert torch.allclose(w, torch.tensor([1.5, 0.5]))
    per_example = delta_attention_weights(torch.randn(3, 5), temperature=5.0, standardize=True)
    assert per_example.shape == (3, 5)
    assert torch.allclose(per_example.sum(dim=1), torch.full((3,), 5.0))
