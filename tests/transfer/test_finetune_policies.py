"""Fine-tuning policies: multipliers per block on hand-checkable cases, blocks of a backbone."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mtl.backbones.base import Backbone
from mtl.schedule.parts import build_policy
from mtl.transfer.policies import (
    BackboneRamp,
    DiscriminativeLR,
    FineTunePolicy,
    Full,
    GradualUnfreeze,
    LayerDecay,
    LinearProbe,
    ProbeThenFull,
    backbone_blocks,
)

POLICIES = [Full, LinearProbe, ProbeThenFull, GradualUnfreeze, DiscriminativeLR, LayerDecay, BackboneRamp]


class _Tiny(Backbone):
    """Three linear stages plus a stray stem parameter outside the stages."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.stages = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)])
        self.stage_channels = [4, 4, 2]
        self.out_features = 2

    def prepare(self, x):
        return x * self.scale


def test_backbone_blocks_one_per_stage_and_stray_params_go_bottom() -> None:
    bb = _Tiny()
    blocks = backbone_blocks(bb)
    assert len(blocks) == 3
    assert blocks[0][0] is bb.scale
    assert [len(b) for b in blocks] == [3, 2, 2]
    assert blocks[2][0] is bb.stages[2].weight
    flat = [id(p) for b in blocks for p in b]
    assert sorted(flat) == sorted(id(p) for p in bb.parameters())


def test_backbone_blocks_shared_parameter_listed_once() -> None:
    bb = _Tiny()
    bb.stages[2] = nn.Linear(4, 4)
    bb.stages[2].weight = bb.stages[1].weight  # tied across stages 1 and 2
    blocks = backbone_blocks(bb)
    ids = [id(p) for b in blocks for p in b]
    assert len(ids) == len(set(ids))
    assert any(p is bb.stages[1].weight for p in blocks[1])
    assert not any(p is bb.stages[1].weight for p in blocks[2])


def test_backbone_blocks_needs_stages() -> None:
    with pytest.raises(TypeError, match="stages"):
        backbone_blocks(nn.Linear(2, 2))


def test_backbone_blocks_real_resnet() -> None:
    from mtl.backbones.resnet import ResNet

    bb = ResNet(num_stages=2)
    blocks = backbone_blocks(bb)
    assert len(blocks) == 2
    assert sum(p.numel() for b in blocks for p in b) == sum(p.numel() for p in bb.parameters())


def test_full_and_linear_probe() -> None:
    assert Full().multipliers(3, 4) == [1.0] * 4
    probe = LinearProbe()
    assert probe.multipliers(0, 3) == [0.0] * 3
    assert probe.frozen_blocks(7, 3) == [True] * 3
    assert probe.head_multiplier(7) == 1.0


def test_probe_then_full() -> None:
    p = ProbeThenFull()
    assert p.multipliers(0, 2) == [0.0, 0.0]
    assert p.multipliers(1, 2) == [0.1, 0.1]
    assert p.multipliers(5, 2) == [0.1, 0.1]
    p = ProbeThenFull(probe_epochs=2, backbone_lr_scale=0.01, head_lr_scale=0.5)
    assert p.frozen_blocks(1, 2) == [True, True]
    assert p.head_multiplier(1) == 1.0
    assert p.multipliers(2, 2) == [0.01, 0.01]
    assert p.head_multiplier(2) == 0.5


def test_gradual_unfreeze_top_blocks_first() -> None:
    p = GradualUnfreeze()
    assert p.multipliers(0, 3) == [0.0, 0.0, 1.0]
    assert p.multipliers(1, 3) == [0.0, 1.0, 1.0]
    assert p.multipliers(2, 3) == [1.0, 1.0, 1.0]
    assert p.multipliers(10, 3) == [1.0, 1.0, 1.0]
    assert p.frozen_blocks(0, 3) == [True, True, False]


def test_gradual_unfreeze_start_period_and_factor() -> None:
    p = GradualUnfreeze(start_epoch=1, epochs_per_block=2, factor=2.0)
    assert p.multipliers(0, 3) == [0.0, 0.0, 0.0]  # heads only, as ULMFiT's first epoch
    assert p.multipliers(1, 3) == [0.0, 0.0, 1.0]
    assert p.multipliers(2, 3) == [0.0, 0.0, 1.0]
    assert p.multipliers(3, 3) == [0.0, 0.5, 1.0]
    assert p.multipliers(5, 3) == [0.25, 0.5, 1.0]


def test_discriminative_lr() -> None:
    p = DiscriminativeLR()
    m = p.multipliers(0, 3)
    assert m == pytest.approx([2.6**-3, 2.6**-2, 2.6**-1])
    assert p.head_multiplier(0) == 1.0
    assert DiscriminativeLR(factor=2.0).multipliers(4, 2) == [0.25, 0.5]


def test_layer_decay_beit() -> None:
    p = LayerDecay()
    assert p.multipliers(0, 2) == pytest.approx([0.65**2, 0.65])
    assert LayerDecay(decay=0.5).multipliers(0, 3) == [0.125, 0.25, 0.5]
    assert LayerDecay(decay=1.0).multipliers(0, 3) == [1.0, 1.0, 1.0]


def test_backbone_ramp_like_lightning() -> None:
    p = BackboneRamp()
    assert p.multipliers(9, 2) == [0.0, 0.0]
    assert p.multipliers(10, 2) == pytest.approx([0.1, 0.1])
    assert p.multipliers(11, 2) == pytest.approx([0.15, 0.15])
    assert p.multipliers(12, 1) == pytest.approx([0.225])
    # 0.1 * 1.5**6 = 1.139 > 1: capped
    assert p.multipliers(16, 1) == [1.0]
    assert p.multipliers(10_000, 1) == [1.0]
    q = BackboneRamp(unfreeze_at_epoch=0, initial_ratio=0.5, ramp=2.0, max_ratio=0.8)
    assert q.multipliers(0, 1) == pytest.approx([0.5])
    assert q.multipliers(1, 1) == [0.8]


def test_policies_are_pure_functions_of_the_epoch() -> None:
    for cls in POLICIES:
        p, name = cls(), cls.__name__
        first = [p.multipliers(e, 4) for e in range(15)]
        again = [p.multipliers(e, 4) for e in reversed(range(15))][::-1]
        assert first == again, name
        for m in first:
            assert len(m) == 4 and all(x >= 0 and math.isfinite(x) for x in m), name


def test_policy_config_errors_name_the_key() -> None:
    key = "schedule.stages.finetune.policy"
    with pytest.raises(ValueError, match=r"(?s)schedule\.stages\.finetune\.policy: .*Nope"):
        build_policy({"_target_": "mtl.transfer.policies.Nope"}, key)
    with pytest.raises(ValueError, match=r"(?s)schedule\.stages\.finetune\.policy: .*decay"):
        build_policy({"_target_": "mtl.transfer.policies.DiscriminativeLR", "decay": 0.5}, key)
    with pytest.raises(ValueError, match=r"needs a _target_"):
        build_policy({"decay": 0.5}, key)
    with pytest.raises(TypeError, match=r"must build a FineTunePolicy, got Linear"):
        build_policy({"_target_": "torch.nn.Linear", "in_features": 1, "out_features": 1}, key)
    with pytest.raises(ValueError, match=r"policy\.decay must be <= 1"):
        LayerDecay(decay=1.5)
    with pytest.raises(ValueError, match=r"policy\.probe_epochs must be an integer"):
        ProbeThenFull(probe_epochs=1.5)
    with pytest.raises(ValueError, match="epoch >= 0"):
        Full().multipliers(-1, 2)


def test_base_class_contract() -> None:
    class Half(FineTunePolicy):
        def multipliers(self, epoch: int, num_blocks: int) -> list[float]:
            return [0.0 if i < num_blocks // 2 else 1.0 for i in range(num_blocks)]

    assert Half().frozen_blocks(0, 4) == [True, True, False, False]
    assert Half().head_multiplier(3) == 1.0
