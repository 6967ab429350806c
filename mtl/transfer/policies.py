r"""Fine-tuning policies: which backbone blocks train, and how fast, at each epoch.

A policy is a pure function of the epoch and of the number of backbone blocks. It returns one
learning-rate multiplier per block (bottom to top) and one for the heads; the training module
applies them as per-parameter-group learning rates, ``lr_group = lr_base * multiplier``, where a
multiplier of 0 means *frozen*. Nothing is toggled on the model (no ``requires_grad`` changes) and
the only state is the epoch, so a resumed run and every DDP rank compute the same multipliers.

Blocks are the backbone's ``stages`` (:class:`~mtl.backbones.base.Backbone`), index 0 being the
bottom block (closest to the input) and index ``n - 1`` the top one. Several policies speak of the
*depth from the top* of block ``i``:

.. math::

    d_i = n - i, \qquad d = 1 \text{ for the top block}, \; d = n \text{ for the bottom one.}

The heads are at depth 0.

Policies are built by ``_target_`` (a stage's ``policy: {_target_: mtl.transfer.policies.LayerDecay,
decay: 0.75}``, or the presets ``policy@schedule.stages.<stage>.policy=layer_decay`` in
``conf/policy/``); their arguments are the config keys:

========================  ===================================================================
``Full``                  every block at 1
``LinearProbe``           every block at 0 (heads only)
``ProbeThenFull``         0 for ``probe_epochs``, then ``backbone_lr_scale`` (fastai ``fine_tune``)
``GradualUnfreeze``       the top ``e + 1`` blocks train at epoch ``e`` (ULMFiT)
``DiscriminativeLR``      ``factor ** -d`` (ULMFiT)
``LayerDecay``            ``decay ** d`` (BEiT)
``BackboneRamp``          0 until ``unfreeze_at_epoch``, then a geometric ramp (Lightning's
                          ``BackboneFinetuning``)
========================  ===================================================================

:class:`~mtl.transfer.finetuning.FineTuning` applies a policy to a model (its parameter groups,
including the shared parts of the sharing structure, which follow the top block).
"""

from __future__ import annotations

import abc
import math
from typing import Any

from torch import nn

#: Prefix of the config keys named in error messages.
CONFIG_KEY = "schedule.stages.<stage>.policy"


# ------------------------------------------------------------------------------------------------
# Blocks
# ------------------------------------------------------------------------------------------------


def backbone_blocks(backbone: nn.Module) -> list[list[nn.Parameter]]:
    """The backbone's parameters split into blocks, one per stage, bottom to top.

    Block ``i`` holds the parameters of ``backbone.stages[i]``. Parameters of the backbone that
    belong to no stage (a stem kept outside the stages, token embeddings, a final norm) are put
    first in block 0: they follow the bottom block's learning rate and freezing. A parameter shared
    by several stages is listed once, in the lowest stage that holds it. Every parameter is listed,
    whatever its ``requires_grad``.

    Args:
        backbone: a :class:`~mtl.backbones.base.Backbone` (anything with an ordered ``stages``).

    Returns:
        ``[[params of block 0], ..., [params of block n-1]]`` with ``n = len(backbone.stages)``.
    """
    stages = getattr(backbone, "stages", None)
    if stages is None:
        raise TypeError(
            f"{type(backbone).__name__} has no 'stages'; fine-tuning policies need a backbone that "
            f"exposes its ordered stages (see mtl.backbones.base.Backbone)."
        )
    stages = list(stages)
    if not stages:
        raise ValueError(f"{type(backbone).__name__} has no stages; a fine-tuning policy needs at least one.")
    seen: set[int] = set()
    blocks: list[list[nn.Parameter]] = []
    for stage in stages:
        block = []
        for p in stage.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                block.append(p)
        blocks.append(block)
    stray = [p for p in backbone.parameters() if id(p) not in seen]
    blocks[0] = stray + blocks[0]
    return blocks


# ------------------------------------------------------------------------------------------------
# Policies
# ------------------------------------------------------------------------------------------------


def _check_call(epoch: int, num_blocks: int) -> None:
    if int(epoch) != epoch or epoch < 0:
        raise ValueError(f"Fine-tuning policies need an epoch >= 0, got {epoch}.")
    if int(num_blocks) != num_blocks or num_blocks < 0:
        raise ValueError(f"Fine-tuning policies need num_blocks >= 0, got {num_blocks}.")


def _depths(num_blocks: int) -> list[int]:
    """Depth from the top of each block, bottom to top: ``[n, n-1, ..., 1]``."""
    return [num_blocks - i for i in range(num_blocks)]


def _option(name: str, value: Any, *, minimum: float | None = None, maximum: float | None = None,
            strict_min: bool = False, integer: bool = False) -> float:
    key = f"{CONFIG_KEY}.{name}"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number, got {value!r}.") from None
    if math.isnan(number) or (integer and number != int(number)):
        raise ValueError(f"{key} must be {'an integer' if integer else 'a number'}, got {value!r}.")
    if minimum is not None and (number <= minimum if strict_min else number < minimum):
        raise ValueError(f"{key} must be {'>' if strict_min else '>='} {minimum}, got {value!r}.")
    if maximum is not None and number > maximum:
        raise ValueError(f"{key} must be <= {maximum}, got {value!r}.")
    return int(number) if integer else number


class FineTunePolicy(abc.ABC):
    """Base class: learning-rate multipliers per backbone block as a function of the epoch.

    Subclasses implement :meth:`multipliers`; :meth:`head_multiplier` is 1 unless overridden.
    Multipliers are relative to the optimizer's base learning rate (after any scheduler), and 0
    means the block is frozen: the training module should then also keep the block in eval mode
    (frozen normalisation statistics), see :meth:`frozen_blocks`.
    """

    @abc.abstractmethod
    def multipliers(self, epoch: int, num_blocks: int) -> list[float]:
        """Learning-rate multiplier of each block at ``epoch`` (0-based), bottom to top.

        Args:
            epoch: the current epoch, counted from 0 within the stage.
            num_blocks: ``n``, the number of backbone blocks (stages).

        Returns:
            ``n`` floats ``>= 0``; index 0 is the bottom block.
        """

    def head_multiplier(self, epoch: int) -> float:
        """Learning-rate multiplier of the heads at ``epoch`` (1 unless a policy says otherwise)."""
        return 1.0

    def frozen_blocks(self, epoch: int, num_blocks: int) -> list[bool]:
        """Whether each block is frozen (multiplier exactly 0) at ``epoch``, bottom to top."""
        return [m == 0.0 for m in self.multipliers(epoch, num_blocks)]

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({options})"


class Full(FineTunePolicy):
    """Full fine-tuning: every block trains at the base learning rate (multiplier 1)."""


    def multipliers(self, epoch: int, num_blocks: int) -> list[float]:
        _check_call(epoch, num_blocks)
        return [1.0] * num_blocks


class LinearProbe(FineTunePolicy):
    """Linear probing: the backbone is frozen throughout (every multiplier 0); only heads train."""


    def multipliers(self, epoch: int, num_blocks: int) -> list[float]:
        _check_call(epoch, num_blocks)
        return [0.0] * num_blocks


class ProbeThenFull(FineTunePolicy):
    r"""Probe, then fine-tune everything at a reduced backbone rate (fastai's ``Learner.fine_tune``).

    .. math::

        m_i(e) = \begin{cases} 0 & e < E_\text{probe} \\ s & e \ge E_\text{probe} \end{cases}
        \qquad
        m_\text{head}(e) = \begin{cases} 1 & e < E_\text{probe} \\ h & e \ge E_\text{probe} \end{cases}

    fastai's ``fine_tune(epochs, base_lr, freeze_epochs=1, lr_mult=100)`` trains the head alone for
    ``freeze_epochs`` one-cycle epochs, then halves ``base_lr`` and trains everything with
    discriminative rates ``slice(base_lr / lr_mult, base_lr)`` spread geometrically over its layer
    groups (backbone groups at ``base_lr/2/100`` up to the head at ``base_lr/2``). Here the
    unfrozen phase uses one scale ``s`` for every block relative to the heads; the default
    ``s = 0.1`` is the common "10x smaller learning rate for the pretrained backbone" (also the
    ``backbone_factor`` of FastAI.jl's port of ``fine_tune``) rather than fastai's 1/100, because
    our base rate is not re-tuned by an LR finder and one-cycle between phases. To mimic fastai
    more closely set ``backbone_lr_scale=0.01, head_lr_scale=0.5``; combine with
    ``discriminative_lr`` for a per-block spread.

    Args:
        probe_epochs: :math:`E_\text{probe}`, epochs with the backbone frozen (fastai
            ``freeze_epochs`` default: 1).
        backbone_lr_scale: :math:`s`, multiplier of every block afterwards (default 0.1).
        head_lr_scale: :math:`h`, multiplier of the heads afterwards (default 1; fastai halves it).
    """


    def __init__(self, probe_epochs: int = 1, backbone_lr_scale: float = 0.1, head_lr_scale: float = 1.0) -> None:
        self.probe_epochs = _option("probe_epochs", probe_epochs, minimum=0, integer=True)
        self.backbone_lr_scale = _option("backbone_lr_scale", backbone_lr_scale, minimum=0)
        self.head_lr_scale = _option("head_lr_scale", head_lr_scale, minimum=0, strict_min=True)

    def multipliers(self, epoch: int, num_blocks: int) -> list[float]:
        _check_call(epoch, num_blocks)
        scale = 0.0 if epoch < self.probe_epochs else self.backbone_lr_scale
        return [scale] * num_blocks

    def head_multiplier(self, epoch: int) -> float:
        return 1.0 if epoch < self.probe_epochs else self.head_lr_scale


class GradualUnfreeze(FineTunePolicy):
    r"""Gradual unfreezing, Howard & Ruder, "Universal Language Model Fine-tuning for Text
    Classification" (ULMFiT), ACL 2018.

    Blocks are unfrozen from the top, one more every ``epochs_per_block`` epochs, starting at
    ``start_epoch``. With :math:`k(e) = \lfloor (e - e_0) / p \rfloor + 1` trainable blocks at epoch
    :math:`e \ge e_0` (none before :math:`e_0`), block ``i`` at depth :math:`d_i = n - i` from
    the top gets

    .. math::

        m_i(e) = \begin{cases} f^{-(d_i - 1)} & d_i \le k(e) \\ 0 & \text{otherwise.} \end{cases}

    With the defaults (``start_epoch=0``, ``epochs_per_block=1``, ``factor=1``) the top ``e + 1``
    blocks train at the base rate during epoch ``e``. ULMFiT unfreezes "the last layer" (its
    classifier) alone during the first epoch: ``start_epoch=1`` reproduces that (heads only during
    epoch 0). ULMFiT combines gradual unfreezing with discriminative rates: ``factor=2.6`` gives
    the top block the base rate and each lower block 2.6 times less.

    Args:
        start_epoch: :math:`e_0`, first epoch at which a block trains (default 0).
        epochs_per_block: :math:`p`, epochs between two unfreezings (ULMFiT: 1).
        factor: :math:`f \ge 1`, discriminative ratio between neighbouring unfrozen blocks (default
            1: no discrimination).
    """


    def __init__(self, start_epoch: int = 0, epochs_per_block: int = 1, factor: float = 1.0) -> None:
        self.start_epoch = _option("start_epoch", start_epoch, minimum=0, integer=True)
        self.epochs_per_block = _option("epochs_per_block", epochs_per_block, minimum=1, integer=True)
        self.factor = _option("factor", factor, minimum=0, strict_min=True)

    def multipliers(self, epoch: int, num_blocks: int) -> list[float]:
        _check_call(epoch, num_blocks)
        if epoch < self.start_epoch:
            return [0.0] * num_blocks
        trainable = (epoch - self.start_epoch) // self.epochs_per_block + 1
        return [self.factor ** -(d - 1) if d <= trainable else 0.0 for d in _depths(num_blocks)]


class DiscriminativeLR(FineTunePolicy):
    r"""Discriminative fine-tuning, Howard & Ruder, "Universal Language Model Fine-tuning for Text
    Classification" (ULMFiT), ACL 2018.

    ULMFiT sets :math:`\eta^{l-1} = \eta^l / 2.6`: each layer learns 2.6 times slower than the one
    above it. The heads keep the base rate and block ``i`` at depth :math:`d_i = n - i` gets

    .. math::

        m_i = f^{-d_i}, \qquad m_\text{head} = 1,

    so the top block trains at ``base / f`` and the bottom one at ``base / f**n``, at every epoch.

    Args:
        factor: :math:`f > 0` (ULMFiT: 2.6).
    """


    def __init__(self, factor: float = 2.6) -> None:
        self.factor = _option("factor", factor, minimum=0, strict_min=True)

    def multipliers(self, epoch: int, num_blocks: int) -> list[float]:
        _check_call(epoch, num_blocks)
        return [self.factor ** -d for d in _depths(num_blocks)]


class LayerDecay(FineTunePolicy):
    r"""Layer-wise learning-rate decay, Bao, Dong, Piao & Wei, "BEiT: BERT Pre-Training of Image
    Transformers", ICLR 2022 (after Clark et al., ELECTRA, 2020).

    The heads keep the base rate and block ``i`` at depth :math:`d_i = n - i` from the top gets

    .. math::

        m_i = \lambda^{d_i}, \qquad m_\text{head} = 1,

    as in BEiT's fine-tuning code, where the classifier has scale :math:`\lambda^0`, the top
    transformer block :math:`\lambda^1` and the patch embedding :math:`\lambda^{L+1}` (here the
    parameters outside the stages share block 0's :math:`\lambda^{n}`, see :func:`backbone_blocks`).

    Args:
        decay: :math:`\lambda \in (0, 1]`; default 0.65, the value of BEiT's ImageNet fine-tuning
            recipe for ViT-B (0.75 for ViT-L, 0.9 is the argparse default of its script).
    """


    def __init__(self, decay: float = 0.65) -> None:
        self.decay = _option("decay", decay, minimum=0, maximum=1, strict_min=True)

    def multipliers(self, epoch: int, num_blocks: int) -> list[float]:
        _check_call(epoch, num_blocks)
        return [self.decay**d for d in _depths(num_blocks)]


class BackboneRamp(FineTunePolicy):
    r"""Frozen, then a geometric warm-up of the whole backbone (Lightning's ``BackboneFinetuning``).

    .. math::

        m_i(e) = \begin{cases} 0 & e < e_u \\
        \min\!\left(r_\max,\; r_0 \, \gamma^{\,e - e_u}\right) & e \ge e_u \end{cases}

    Lightning's callback adds the backbone to the optimizer at ``unfreeze_backbone_at_epoch`` with
    ``backbone_initial_ratio_lr`` times the current learning rate, multiplies it each epoch by
    ``lambda_func`` (1.5 by default) and, with ``should_align=True``, caps it at the optimizer's
    rate: these are :math:`e_u = 10`, :math:`r_0 = 0.1`, :math:`\gamma = 1.5`,
    :math:`r_\max = 1`. Every block gets the same multiplier.

    Args:
        unfreeze_at_epoch: :math:`e_u`, first epoch the backbone trains (default 10).
        initial_ratio: :math:`r_0 > 0` (default 0.1).
        ramp: :math:`\gamma > 0`, per-epoch factor (default 1.5).
        max_ratio: :math:`r_\max > 0`, cap (default 1).
    """


    def __init__(
        self,
        unfreeze_at_epoch: int = 10,
        initial_ratio: float = 0.1,
        ramp: float = 1.5,
        max_ratio: float = 1.0,
    ) -> None:
        self.unfreeze_at_epoch = _option("unfreeze_at_epoch", unfreeze_at_epoch, minimum=0, integer=True)
        self.initial_ratio = _option("initial_ratio", initial_ratio, minimum=0, strict_min=True)
        self.ramp = _option("ramp", ramp, minimum=0, strict_min=True)
        self.max_ratio = _option("max_ratio", max_ratio, minimum=0, strict_min=True)

    def multipliers(self, epoch: int, num_blocks: int) -> list[float]:
        _check_call(epoch, num_blocks)
        if epoch < self.unfreeze_at_epoch:
            return [0.0] * num_blocks
        # log-space so that a long run with ramp > 1 cannot overflow before the cap applies
        log_ratio = math.log(self.initial_ratio) + (epoch - self.unfreeze_at_epoch) * math.log(self.ramp)
        ratio = self.max_ratio if log_ratio >= math.log(self.max_ratio) else math.exp(log_ratio)
        return [ratio] * num_blocks
