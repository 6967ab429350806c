r"""Fine-tuning regularizers: penalties that keep a fine-tuned network close to its source.

Every function returns a scalar tensor **already multiplied by its coefficient** (``alpha`` and
``beta`` for L2-SP, ``weight`` for the others), so the caller adds it to the loss as is; the
defaults are the coefficients of the papers or of their reference implementations, and
``weight=1`` gives the raw term. The config keys named in errors are
``schedule.stages.<stage>.regularizers.<name>``.

========================  ===================================================  ===============
function                  paper                                                acts on
========================  ===================================================  ===============
:func:`l2sp`              Li, Grandvalet & Davoine, ICML 2018                  parameters
:func:`lwf_distillation`  Li & Hoiem, ECCV 2016 / TPAMI 2017                   source-head outputs
:func:`bss`               Chen et al., NeurIPS 2019                            features ``[B, D]``
:func:`delta`             Li et al., ICLR 2019                                 stage feature maps
========================  ===================================================  ===============
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

CONFIG_KEY = "schedule.stages.<stage>.regularizers"

#: Task kinds :func:`lwf_distillation` understands (those of :class:`mtl.tasks.Task`).
KINDS = ("multiclass", "binary", "multilabel", "regression")


def _zero(like: Sequence[Tensor]) -> Tensor:
    """A scalar 0 on the device/dtype of the first tensor, with a graph when it has one."""
    for t in like:
        return t.sum() * 0.0
    return torch.zeros(())


# ------------------------------------------------------------------------------------------------
# L2-SP
# ------------------------------------------------------------------------------------------------


def snapshot(params: Iterable[Tensor]) -> list[Tensor]:
    """Detached copies of ``params`` (the starting point :math:`w^0` of :func:`l2sp`).

    Take it right after loading the pretrained weights, before the first optimizer step. On
    resume, rebuild it from the pretrained file (not from the resumed weights), or keep it in a
    checkpointed buffer.
    """
    return [p.detach().clone() for p in params]


def l2sp(
    params: Iterable[Tensor],
    start_params: Sequence[Tensor],
    alpha: float = 0.01,
    new_params: Iterable[Tensor] | None = None,
    beta: float = 0.01,
) -> Tensor:
    r"""L2-SP, Li, Grandvalet & Davoine, "Explicit Inductive Bias for Transfer Learning with
    Convolutional Networks", ICML 2018.

    .. math::

        \Omega(w) = \frac{\alpha}{2} \,\lVert w_S - w_S^0 \rVert_2^2
                  + \frac{\beta}{2} \,\lVert w_{\bar S} \rVert_2^2

    where :math:`w_S` are the parameters shared with the source network (the pretrained backbone),
    :math:`w_S^0` their pretrained values (:func:`snapshot`) and :math:`w_{\bar S}` the parameters
    that are new for the target task (heads). When L2-SP is used, the optimizer's own weight
    decay should be 0 on these parameters, or they are pulled towards 0 as well. The paper selects
    :math:`\alpha, \beta` by validation; the defaults (0.01, 0.01) are the trade-offs of the
    Transfer-Learning-Library's L2-SP/DELTA example.

    Args:
        params: :math:`w_S`, any shapes.
        start_params: :math:`w_S^0`, same number, order and shapes as ``params`` (moved to each
            parameter's device and dtype if needed).
        alpha: :math:`\alpha \ge 0`.
        new_params: :math:`w_{\bar S}`; omitted: no second term.
        beta: :math:`\beta \ge 0`.

    Returns:
        scalar tensor.
    """
    params = list(params)
    start_params = list(start_params)
    new_params = [] if new_params is None else list(new_params)
    if alpha < 0 or beta < 0:
        raise ValueError(f"{CONFIG_KEY}.l2sp: alpha and beta must be >= 0, got alpha={alpha}, beta={beta}.")
    if len(params) != len(start_params):
        raise ValueError(
            f"{CONFIG_KEY}.l2sp: {len(params)} parameters but {len(start_params)} starting values; take "
            f"the snapshot of the same parameter list (mtl.transfer.regularizers.snapshot)."
        )
    bad = [i for i, (p, p0) in enumerate(zip(params, start_params)) if p.shape != p0.shape]
    if bad:
        i = bad[0]
        raise ValueError(
            f"{CONFIG_KEY}.l2sp: parameter {i} has shape {tuple(params[i].shape)} but its starting value "
            f"{tuple(start_params[i].shape)} ({len(bad)} mismatch(es)); the snapshot does not match the model."
        )
    terms = []
    if params and alpha > 0:
        drift = sum((p - p0.to(p)).pow(2).sum() for p, p0 in zip(params, start_params))
        terms.append(0.5 * alpha * drift)
    if new_params and beta > 0:
        terms.append(0.5 * beta * sum(p.pow(2).sum() for p in new_params))
    if not terms:
        return _zero(params + new_params)
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


# ------------------------------------------------------------------------------------------------
# Learning without Forgetting
# ------------------------------------------------------------------------------------------------


def lwf_distillation(
    new_logits: Tensor,
    old_logits: Tensor,
    kind: str,
    temperature: float = 2.0,
    weight: float = 1.0,
) -> Tensor:
    r"""Knowledge-distillation term of Learning without Forgetting, Li & Hoiem, "Learning without
    Forgetting", ECCV 2016 (TPAMI 2017).

    ``old_logits`` are the source heads' outputs on the target batch recorded before fine-tuning
    (by the source network or a frozen copy of it); ``new_logits`` are the same heads' outputs now.
    With temperature :math:`T`, batch size :math:`B`:

    * ``multiclass`` (``[B, C]``), Hinton et al.'s form:

      .. math::

          \mathcal L = \lambda\, T^2 \,\frac1B \sum_b
          \mathrm{KL}\!\left(\mathrm{softmax}(o_b/T) \,\middle\|\, \mathrm{softmax}(z_b/T)\right).

      LwF writes the loss as the cross-entropy :math:`-\sum_c p^{old}_c \log p^{new}_c`, which
      is this KL plus the entropy of :math:`p^{old}` (a constant): same gradient, but the KL is 0
      when nothing has moved. The :math:`T^2` factor (Hinton, Vinyals & Dean 2015) keeps the
      gradient's scale independent of :math:`T`; LwF has no such factor (its :math:`\lambda_o = 1`
      corresponds to ``weight = 1 / T**2`` here).
    * ``binary`` (``[B]`` or ``[B, 1]``) and ``multilabel`` (``[B, C]``): each output is a
      Bernoulli variable with target :math:`q = \sigma(o/T)`; the loss is :math:`\lambda T^2`
      times the mean over elements of the binary KL, i.e. of
      :math:`\mathrm{BCE}(\sigma(z/T), q) - H(q)` (BCE with soft targets minus their constant
      entropy).
    * ``regression``: :math:`\lambda` times the mean squared error to the old outputs (no
      temperature).

    Args:
        new_logits: current outputs ``[B, ...]``.
        old_logits: recorded outputs, same shape (detached here).
        kind: ``multiclass``, ``binary``, ``multilabel`` or ``regression`` (the source task's kind).
        temperature: :math:`T > 0` (LwF: 2).
        weight: :math:`\lambda` (LwF's :math:`\lambda_o = 1`).

    Returns:
        scalar tensor; 0 when ``new_logits == old_logits``.
    """
    key = f"{CONFIG_KEY}.lwf"
    if kind not in KINDS:
        raise ValueError(f"{key}: task kind must be one of {KINDS}, got '{kind}'.")
    if temperature <= 0:
        raise ValueError(f"{key}.temperature must be > 0, got {temperature}.")
    if new_logits.shape != old_logits.shape:
        raise ValueError(
            f"{key}: new outputs {tuple(new_logits.shape)} and recorded outputs {tuple(old_logits.shape)} "
            f"differ in shape; record the source heads' outputs on the same batch."
        )
    old = old_logits.detach().to(new_logits.dtype)
    if new_logits.numel() == 0:
        return new_logits.sum() * 0.0
    if kind == "regression":
        return weight * F.mse_loss(new_logits, old)
    t = float(temperature)
    if kind == "multiclass":
        if new_logits.dim() != 2:
            raise ValueError(f"{key}: multiclass outputs must be [B, C], got {tuple(new_logits.shape)}.")
        kl = F.kl_div(
            F.log_softmax(new_logits / t, dim=1), F.log_softmax(old / t, dim=1), reduction="batchmean", log_target=True
        )
        return weight * t * t * kl
    target = torch.sigmoid(old / t)
    cross = F.binary_cross_entropy_with_logits(new_logits / t, target)
    entropy = F.binary_cross_entropy_with_logits(old / t, target)
    return weight * t * t * (cross - entropy)


# ------------------------------------------------------------------------------------------------
# Batch Spectral Shrinkage
# ------------------------------------------------------------------------------------------------


def bss(features: Tensor, k: int = 1, weight: float = 0.001) -> Tensor:
    r"""Batch Spectral Shrinkage, Chen, Wang, Fu, Long & Wang, "Catastrophic Forgetting Meets
    Negative Transfer: Batch Spectral Shrinkage for Safe Transfer Learning", NeurIPS 2019.

    With :math:`\sigma_1 \ge \dots \ge \sigma_m` the singular values of the batch feature matrix
    :math:`F \in \mathbb R^{B \times D}`, :math:`m = \min(B, D)`,

    .. math::

        L_\text{bss}(F) = \eta \sum_{i=1}^{k} \sigma_{m+1-i}^2,

    the squared ``k`` smallest singular values: shrinking them suppresses the feature directions
    that are not transferable. When a batch has fewer than ``k`` singular values (``min(B, D) <
    k``, e.g. a small last batch), all ``min(B, D)`` of them are used. The SVD runs in float32
    (at least) whatever the autocast dtype.

    Args:
        features: :math:`F`, the representation fed to the heads, ``[B, D]``.
        k: number of smallest singular values (paper: 1).
        weight: :math:`\eta` (paper: 0.001).

    Returns:
        scalar tensor.
    """
    key = f"{CONFIG_KEY}.bss"
    if features.dim() != 2:
        raise ValueError(f"{key}: features must be a [B, D] matrix, got shape {tuple(features.shape)}.")
    if int(k) != k or k < 1:
        raise ValueError(f"{key}.k must be an integer >= 1, got {k}.")
    if features.numel() == 0:
        return features.sum() * 0.0
    work = features if features.dtype in (torch.float32, torch.float64) else features.float()
    with torch.autocast(device_type=features.device.type, enabled=False):
        sigma = torch.linalg.svdvals(work)  # descending, min(B, D) values
    smallest = sigma[-min(int(k), sigma.numel()) :]
    return weight * smallest.pow(2).sum().to(features.dtype)


# ------------------------------------------------------------------------------------------------
# DELTA
# ------------------------------------------------------------------------------------------------


#: Reductions :func:`delta` understands.
DELTA_REDUCTIONS = ("auto", "sum", "position_mean", "batch_mean")


def delta(
    features: Sequence[Tensor],
    source_features: Sequence[Tensor],
    channel_weights: Sequence[Tensor | None] | None = None,
    weight: float = 0.01,
    channel_dim: int = 1,
    reduction: str = "auto",
) -> Tensor:
    r"""DELTA's behavioural regularizer, Li, Xiong, Wang, Huan, Chen & Liu, "DELTA: DEep Learning
    Transfer using Feature Map with Attention for Convolutional Networks", ICLR 2019.

    For stages :math:`j` with feature maps :math:`FM_j` of the network being fine-tuned and
    :math:`FM^0_j` of the source network on the same batch :math:`x_1, \dots, x_B`, with
    :math:`d_{j,b,c} = \lVert FM_{j,c}(x_b) - FM^0_{j,c}(x_b) \rVert_2^2` (the norm runs over the
    :math:`M_j` positions of channel :math:`c`: all dimensions but the batch and channel ones),

    .. math::

        \Omega = \alpha \sum_j \frac12 \sum_{b=1}^{B} \sum_{c} w_{j,c}\, \frac{d_{j,b,c}}{n_j},

    the scale of the Transfer-Learning-Library (``tllib.regularization.delta``), the reference
    implementation used with DELTA's published settings: a sum over the batch of
    :math:`\tfrac12\lVert\cdot\rVert^2`. ``reduction`` chooses :math:`n_j`:

    * ``"sum"``: :math:`n_j = 1` (their ``BehavioralRegularization``, the unweighted
      "feature-map" variant of the paper);
    * ``"position_mean"``: :math:`n_j = M_j` (their ``AttentionBehavioralRegularization``, which
      divides by :math:`h w`; its weights are :math:`C \cdot \mathrm{softmax}`, as returned by
      :func:`delta_attention_weights`);
    * ``"auto"`` (default): ``"sum"`` for a stage without channel weights and ``"position_mean"``
      for a stage with them, i.e. each of their two classes at its own scale;
    * ``"batch_mean"``: :math:`\alpha \sum_j \frac1B \sum_b \sum_c w_{j,c} d_{j,b,c}`, mtl's former
      reduction, :math:`2/B` times ``"sum"`` (24 times weaker at their batch size of 48), so that
      the weight does not depend on the batch size.

    The default :math:`\alpha = 0.01` is their example's ``--trade-off-backbone``. Without
    ``channel_weights`` every :math:`w_{j,c} = 1`. The paper's attention weights measure how much
    the source loss rises when channel :math:`c` is removed; see :func:`delta_attention_weights`.
    The source maps are detached. Unlike the paper's full objective, the L2 penalty on the new
    (head) parameters is not included: use :func:`l2sp` with ``alpha=0`` and ``new_params`` for it.

    Args:
        features: one tensor per stage, ``[B, C_j, *positions]`` (``[B, C_j]`` for vectors); with
            ``channel_dim=-1``, ``[B, *positions, C_j]`` (transformer hidden states ``[B, L, H]``).
        source_features: the source network's maps, same shapes.
        channel_weights: one entry per stage, ``[C_j]`` (shared by the batch) or ``[B, C_j]``
            (per example), or ``None`` for all ones; omitted: all ones.
        weight: :math:`\alpha` (default 0.01: Transfer-Learning-Library's DELTA example).
        channel_dim: the channel dimension of every map (1, or -1 for channels-last).
        reduction: ``"auto"``, ``"sum"``, ``"position_mean"`` or ``"batch_mean"``, see above.

    Returns:
        scalar tensor.
    """
    key = f"{CONFIG_KEY}.delta"
    if reduction not in DELTA_REDUCTIONS:
        raise ValueError(f"{key}.reduction must be one of {DELTA_REDUCTIONS}, got {reduction!r}.")
    features, source_features = list(features), list(source_features)
    if len(features) != len(source_features):
        raise ValueError(
            f"{key}: {len(features)} feature maps but {len(source_features)} source maps; pass the "
            f"same stages of both networks."
        )
    if channel_weights is None:
        channel_weights = [None] * len(features)
    channel_weights = list(channel_weights)
    if len(channel_weights) != len(features):
        raise ValueError(f"{key}: {len(channel_weights)} channel weight tensors for {len(features)} stages.")
    if not features:
        return torch.zeros(())
    total = None
    for j, (fm, fm0, w) in enumerate(zip(features, source_features, channel_weights)):
        if fm.shape != fm0.shape:
            raise ValueError(
                f"{key}: stage {j} maps have shapes {tuple(fm.shape)} and {tuple(fm0.shape)} (source)."
            )
        if fm.dim() < 2:
            raise ValueError(f"{key}: stage {j} map must be at least [B, C], got {tuple(fm.shape)}.")
        sq = (fm - fm0.detach().to(fm.dtype)).pow(2).movedim(channel_dim, 1)
        per_channel = sq.flatten(2).sum(dim=2) if sq.dim() > 2 else sq  # [B, C]
        positions = sq[0, 0].numel()
        if w is not None:
            w = w.to(per_channel)
            if w.shape not in (per_channel.shape[1:], per_channel.shape):
                raise ValueError(
                    f"{key}: stage {j} channel weights have shape {tuple(w.shape)}; expected "
                    f"[{per_channel.shape[1]}] or [{per_channel.shape[0]}, {per_channel.shape[1]}]."
                )
            per_channel = per_channel * w
        mode = reduction if reduction != "auto" else ("sum" if w is None else "position_mean")
        if mode == "batch_mean":
            term = per_channel.sum(dim=1).mean()
        else:
            term = 0.5 * per_channel.sum()
            if mode == "position_mean":
                term = term / positions
        total = term if total is None else total + term
    return weight * total


def delta_attention_weights(
    loss_increase: Tensor, temperature: float = 1.0, standardize: bool = False
) -> Tensor:
    r"""DELTA's channel attention from the rise of the source loss when a channel is removed.

    For one stage, with :math:`\Delta_c = L(x, y; w^0_{\setminus c}) - L(x, y; w^0)` the increase of
    the source loss when channel :math:`c` is zeroed (computed by the caller with the source
    network), Li et al. (ICLR 2019) weight channels by :math:`\mathrm{softmax}_c(\Delta_c)`. This
    returns

    .. math::

        w_c = C \,\mathrm{softmax}_c\!\left(\tilde\Delta_c / \tau\right),

    scaled by the number of channels :math:`C` so that equal attention gives :math:`w_c = 1`, as the
    Transfer-Learning-Library's ``AttentionBehavioralRegularization`` does (it multiplies its
    softmax attention by :math:`C`); pass them to :func:`delta`, whose default reduction then
    averages over positions as that class does. :math:`\tilde\Delta` is :math:`\Delta` or, with
    ``standardize``, its z-score over channels with the population standard deviation (``np.std``,
    as in their ``calculate_channel_attention``, which standardizes and uses :math:`\tau = 5`);
    channels with equal :math:`\Delta` (zero deviation, up to round-off) get equal weights, where
    ``np.std`` would divide by zero.

    Args:
        loss_increase: :math:`\Delta`, ``[C]`` (averaged over data) or ``[B, C]`` (per example).
        temperature: :math:`\tau > 0`.
        standardize: z-score :math:`\Delta` over channels first.

    Returns:
        weights of the same shape, detached, for :func:`delta`'s ``channel_weights``.
    """
    if temperature <= 0:
        raise ValueError(f"{CONFIG_KEY}.delta.temperature must be > 0, got {temperature}.")
    if loss_increase.dim() not in (1, 2):
        raise ValueError(f"{CONFIG_KEY}.delta: loss increases must be [C] or [B, C], got {tuple(loss_increase.shape)}.")
    z = loss_increase.detach().float()
    if standardize:
        std = z.std(dim=-1, keepdim=True, correction=0)
        # A deviation at round-off level of the values (all equal) carries no ranking: weights 1.
        flat = std <= 1e-6 * z.abs().amax(dim=-1, keepdim=True)
        z = torch.where(flat, 0.0, (z - z.mean(dim=-1, keepdim=True)) / std.clamp_min(1e-30))
    return (z.shape[-1] * torch.softmax(z / temperature, dim=-1)).to(loss_increase.dtype)
