import pytest
import torch

from mtl import MultiTaskModel, Task
from mtl.backbones import CNN, MLP
from mtl.transfer.loading import load_weights


def test_backbones_shapes():
    mlp = MLP(input_shape=(64,), hidden=[32, 16])
    assert mlp(torch.randn(5, 1, 8, 8)).shape == (5, 16) and mlp.out_features == 16
    assert len(mlp.stages) == 2 and mlp.stage_channels == [32, 16]
    cnn = CNN(input_shape=(1, 8, 8), channels=[4, 8, 8])
    assert cnn(torch.randn(3, 8, 8)).shape == (3, 8)  # [B, H, W] is one channel
    assert cnn(torch.randn(3, 1, 10, 14)).shape == (3, 8)  # any image size
    grid = CNN(input_shape=(1, 8, 8), channels=[4, 8], pool_size=[1, 2])
    assert grid.out_features == 16 and grid(torch.randn(2, 1, 10, 14)).shape == (2, 16)


def test_cnn_wrong_channels_is_a_clear_error():
    with pytest.raises(ValueError, match=r"input_shape with 3 channel"):
        CNN(input_shape=(3, 8, 8))(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"backbone=mlp"):
        CNN(input_shape=(12,))  # tabular rows: the error names the backbone that fits


def test_model_heads_and_task_subsets():
    tasks = [Task("a", num_classes=3), Task("b", kind="regression", out_features=2)]
    model = MultiTaskModel(MLP(input_shape=(8,), hidden=[16]), tasks)
    out = model(torch.randn(4, 8))
    assert out["a"].shape == (4, 3) and out["b"].shape == (4, 2)
    outs, rep = model.forward_with_representation(torch.randn(4, 8), ["a"])
    assert list(outs) == ["a"] and rep.shape == (4, 16)
    with pytest.raises(KeyError, match="no head for task"):
        model(torch.randn(2, 8), ["z"])


def test_head_hidden_layers():
    model = MultiTaskModel(MLP(input_shape=(8,), hidden=[16]), [Task("a", num_classes=3)], head_hidden=[32])
    assert sum(p.numel() for p in model.heads["a"].parameters()) == 16 * 32 + 32 + 32 * 3 + 3


def test_load_weights_reports_and_keeps_new_heads_fresh(tmp_path):
    src = MultiTaskModel(MLP(input_shape=(8,), hidden=[16]), [Task("a", num_classes=3)])
    torch.save(src.state_dict(), tmp_path / "w.pt")
    dst = MultiTaskModel(MLP(input_shape=(8,), hidden=[16]), [Task("b", num_classes=2)])
    head_before = dst.heads["b"].weight.clone()
    report = load_weights(dst, tmp_path / "w.pt")
    assert torch.equal(dst.backbone.stages[0][1].weight, src.backbone.stages[0][1].weight)
    assert torch.equal(dst.heads["b"].weight, head_before)
    assert "heads.b.weight" in report.missing and "heads.a.weight" in report.unexpected
    assert "heads of ['a']" in report.summary()


def test_load_weights_backbone_mismatch_lists_keys(tmp_path):
    src = MultiTaskModel(MLP(input_shape=(8,), hidden=[16, 8]), [Task("a", num_classes=3)])
    torch.save(src.state_dict(), tmp_path / "w.pt")
    dst = MultiTaskModel(CNN(channels=[4]), [Task("a", num_classes=3)])
    with pytest.raises(ValueError, match=r"do not fit(.|\n)*missing keys(.|\n)*unexpected keys"):
        load_weights(dst, tmp_path / "w.pt")
    wide = MultiTaskModel(MLP(input_shape=(8,), hidden=[32, 8]), [Task("a", num_classes=3)])
    with pytest.raises(ValueError, match="shape mismatches"):
        load_weights(wide, tmp_path / "w.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights(dst, tmp_path / "nope.ckpt")


def test_load_weights_with_key_map(tmp_path):
    from mtl.transfer.loading import map_keys

    src = MultiTaskModel(MLP(input_shape=(8,), hidden=[16]), [Task("a", num_classes=3)])
    foreign = {"module.encoder." + k[len("sharing.backbone."):]: v for k, v in src.state_dict().items() if k.startswith("sharing.backbone.")}
    torch.save(foreign, tmp_path / "foreign.pt")
    dst = MultiTaskModel(MLP(input_shape=(8,), hidden=[16]), [Task("b", num_classes=2)])
    with pytest.raises(ValueError, match="init_key_map"):
        load_weights(dst, tmp_path / "foreign.pt")
    report = load_weights(dst, tmp_path / "foreign.pt", {"module.encoder.": "sharing.backbone."})
    assert torch.equal(dst.backbone.stages[0][1].weight, src.backbone.stages[0][1].weight)
    assert report.unexpected == [] and all(k.startswith("heads.") for k in report.missing)
    assert list(map_keys({"module.x": 1, "y": 2}, {"module.": ""})) == ["x", "y"]
