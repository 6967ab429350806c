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
    # Transfer-Learning-Library scale: 1/2 sum over the batch. stage 0: (2 + 4) / 2 = 3;
    # stage 1: 9 / 2 = 4.5.
    assert delta([fm, v], [fm0, v0], weight=1.0).item() == pytest.approx(7.5)
    assert delta([fm, v], [fm0, v0]).item() == pytest.approx(0.075)  # default weight 0.01
    # channel weights [C] (attention): per-position mean, 1/2 sum over the batch.
    # stage 0: channel 0 x 2, channel 1 x 0 -> (2 * 2 / 2 positions) / 2 = 1; stage 1 unweighted.
    w = [torch.tensor([2.0, 0.0]), None]
    assert delta([fm, v], [fm0, v0], channel_weights=w, weight=1.0).item() == pytest.approx(1 + 4.5)
    # per-example weights [B, C]: stage 0 (2 / 2 + 4 * 0.5 / 2) / 2 = 1, stage 1 (0 + 0) / 2 = 0
    # (a weighted vector stage has one position).
    w = [torch.tensor([[1.0, 1.0], [1.0, 0.5]]), torch.tensor([[0.0], [1.0]])]
    assert delta([fm, v], [fm0, v0], channel_weights=w, weight=1.0).item() == pytest.approx(1 + 0)
    # Explicit reductions.
    w = [torch.tensor([2.0, 0.0]), None]
    assert delta([fm, v], [fm0, v0], channel_weights=w, weight=1.0, reduction="sum").item() == pytest.approx(2 + 4.5)
    assert delta([fm, v], [fm0, v0], weight=1.0, reduction="position_mean").item() == pytest.approx(1.5 + 4.5)
    # mtl's former reduction: mean over the batch, no 1/2 (equal to "sum" at B = 2 only).
    assert delta([fm, v], [fm0, v0], weight=1.0, reduction="batch_mean").item() == pytest.approx(3 + 4.5)


def test_delta_matches_transfer_learning_library_scale() -> None:
    # Their BehavioralRegularization: sum_j 0.5 ||FM_j - FM0_j||^2 over the whole batch; their
    # AttentionBehavioralRegularization: sum_j 0.5 sum_{b,c} C a_c ||.||^2_{(h,w)} / (h w) with a
    # softmax attention a. Both written out here on B = 48 (their batch size), where mtl's former
    # reduction was 2 / 48 = 1/24 of theirs.
    gen = torch.Generator().manual_seed(0)
    maps = [torch.randn(48, 3, 4, 5, generator=gen), torch.randn(48, 6, 2, 2, generator=gen)]
    source = [torch.randn(m.shape, generator=gen) for m in maps]
    theirs = sum(0.5 * torch.norm(m - s) ** 2 for m, s in zip(maps, source))
    torch.testing.assert_close(delta(maps, source, weight=1.0), theirs)
    torch.testing.assert_close(delta(maps, source, weight=1.0, reduction="batch_mean") * 24, theirs)
    raw = [torch.randn(m.shape[1], generator=gen) for m in maps]
    attention = [torch.softmax(r, 0) for r in raw]
    theirs = 0.0
    for m, s, a in zip(maps, source, attention):
        b, c, h, w = m.shape
        dist = torch.norm((m - s).reshape(b, c, h * w), 2, 2) ** 2
        theirs = theirs + 0.5 * torch.sum(c * a * dist / (h * w))
    ours = delta(maps, source, channel_weights=[delta_attention_weights(r) for r in raw], weight=1.0)
    torch.testing.assert_close(ours, theirs)


def test_delta_channels_last_and_source_detached() -> None:
    h0 = torch.zeros(1, 3, 2, requires_grad=True)  # [B, L, H]
    h = torch.ones(1, 3, 2, requires_grad=True)
    w = [torch.tensor([1.0, 0.0])]
    # hidden unit 0 over 3 tokens: squared norm 3; weighted, so averaged over the 3 positions
    # (tokens) and halved: 0.5; summed over them instead: 1.5.
    value = delta([h], [h0], channel_weights=w, weight=1.0, channel_dim=-1)
    assert value.item() == pytest.approx(0.5)
    assert delta([h], [h0], channel_weights=w, weight=1.0, channel_dim=-1, reduction="sum").item() == pytest.approx(1.5)
    value.backward()
    assert h0.grad is None and h.grad is not None


def test_delta_errors() -> None:
    with pytest.raises(ValueError, match=r"regularizers\.delta: 1 feature maps but 2"):
        delta([torch.zeros(1, 2)], [torch.zeros(1, 2), torch.zeros(1, 2)])
    with pytest.raises(ValueError, match="stage 0 maps have shapes"):
        delta([torch.zeros(1, 2)], [torch.zeros(1, 3)])
    with pytest.raises(ValueError, match="channel weights have shape"):
        delta([torch.zeros(1, 2)], [torch.zeros(1, 2)], channel_weights=[torch.ones(3)])
    with pytest.raises(ValueError, match=r"regularizers\.delta\.reduction"):
        delta([torch.zeros(1, 2)], [torch.zeros(1, 2)], reduction="mean")


def test_delta_attention_weights() -> None:
    equal = delta_attention_weights(torch.tensor([0.3, 0.3, 0.3, 0.3]))
    assert torch.allclose(equal, torch.ones(4))
    w = delta_attention_weights(torch.tensor([math.log(3.0), 0.0]))
    assert torch.allclose(w, torch.tensor([1.5, 0.5]))
    per_example = delta_attention_weights(torch.randn(3, 5), temperature=5.0, standardize=True)
    assert per_example.shape == (3, 5)
    assert torch.allclose(per_example.sum(dim=1), torch.full((3,), 5.0))
    # Standardised with the population std (np.std) as in their calculate_channel_attention:
    # Delta = (1, 2, 3, 4): z = (-1.5, -0.5, 0.5, 1.5) / sqrt(1.25), weights 4 softmax(z / 5).
    z = torch.tensor([-1.5, -0.5, 0.5, 1.5]) / math.sqrt(1.25)
    w = delta_attention_weights(torch.tensor([1.0, 2.0, 3.0, 4.0]), temperature=5.0, standardize=True)
    assert torch.allclose(w, 4 * torch.softmax(z / 5, 0))
    # Equal increases (zero deviation, where np.std would divide by zero): equal weights.
    assert torch.allclose(delta_attention_weights(torch.full((4,), 0.3), standardize=True), torch.ones(4))
