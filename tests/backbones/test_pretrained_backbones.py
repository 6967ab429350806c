"""backbone=timm and backbone=hf: built from tiny local models, loaded through the real code path.

Nothing is downloaded: every model is created here with random weights and saved to a temporary
directory (a fake Hugging Face cache for ``pretrained=True``). The tests of each adapter skip when
its package is not installed; the tests of the missing-extra errors and of ``import mtl.backbones``
run everywhere.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

import torchvision_stub
from conftest import PYTHON, ROOT, cli_env

from mtl.backbones import HFBackbone, TimmBackbone


@pytest.fixture(autouse=True, scope="module")
def _torchvision_stub_only_here():
    """The stub is removed after this module, so that no other test sees a fake torchvision."""
    yield
    torchvision_stub.uninstall()


def import_timm():
    """timm, or skip. timm imports torchvision; where none is installed a stub stands in for it."""
    torchvision_stub.install_if_missing()
    try:
        import timm
    except Exception as err:  # noqa: BLE001 - a broken torchvision raises RuntimeError, not ImportError
        pytest.skip(f"timm cannot be imported here: {type(err).__name__}: {err}")
    return timm


def tiny_timm_name(timm) -> str:
    """timm's smallest ResNet (``test_resnet``, ~0.4M parameters) where this timm has it."""
    return "test_resnet" if "test_resnet" in timm.list_models("test_*") else "resnet10t"


def reference_features(model, x):
    model.eval()
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


# ============================================================================ missing extras
def test_timm_missing_extra_names_the_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "mtl\[timm\]"'):
        TimmBackbone(model_name="resnet18")


def test_hf_missing_extra_names_the_install_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r'pip install "mtl\[hf\]"'):
        HFBackbone(path=str(tmp_path))


def test_importing_the_library_needs_neither_extra():
    code = textwrap.dedent(
        """
        import sys
        import torchmetrics  # not ours: it imports transformers by itself where that is installed
        for name in list(sys.modules):
            if name.split(".")[0] in ("timm", "transformers", "torchvision"):
                del sys.modules[name]
        for name in ("timm", "transformers", "torchvision"):
            sys.modules[name] = None  # as if not installed: importing them raises ImportError
        import mtl.backbones, mtl.train
        from mtl.backbones import TimmBackbone, HFBackbone
        try:
            TimmBackbone(model_name="resnet18")
        except ImportError as err:
            assert 'pip install "mtl[timm]"' in str(err), err
        else:
            raise AssertionError("no error without timm")
        print("ok")
        """
    )
    out = subprocess.run([PYTHON, "-c", code], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


# ============================================================================ timm
@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    """A tiny timm model with random weights (classifier included), saved as .pth and .safetensors."""
    timm = import_timm()
    name = tiny_timm_name(timm)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=7)
    folder = tmp_path_factory.mktemp("timm")
    state = model.state_dict()
    torch.save(state, folder / "weights.pth")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "weights.safetensors"))
    return name, model, folder


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_timm_loads_a_local_weights_file(timm_weights, fmt):
    name, reference, folder = timm_weights
    backbone = TimmBackbone(model_name=name, pretrained_path=str(folder / f"weights.{fmt}")).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = reference_features(reference, x)
    assert backbone.out_features == expected.shape[1]
    assert torch.allclose(backbone(x), expected, atol=1e-5)
    # the classifier of the file is dropped, the trunk's keys are the timm model's own
    assert not any(k.startswith("model.fc.") for k in backbone.state_dict())


def test_timm_stages_are_the_feature_blocks_and_reproduce_forward(timm_weights):
    name, _, folder = timm_weights
    backbone = TimmBackbone(model_name=name, pretrained_path=str(folder / "weights.pth")).eval()
    assert backbone.split_into_blocks
    info = backbone.model.feature_info
    assert len(backbone.stages) == len(info)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outs = backbone.forward_stages(x)
        assert [o.shape[1] for o in outs] == backbone.stage_channels
        assert torch.allclose(backbone.pool(outs[-1]), backbone(x), atol=1e-6)
    # stages share their parameters with the model (freezing a stage freezes the model's block)
    model_params = {id(p) for p in backbone.model.parameters()}
    assert all(id(p) in model_params for p in backbone.stages.parameters())
    assert len(list(backbone.parameters())) == len(list(backbone.model.parameters()))


def test_timm_vision_transformer_is_one_stage():
    timm = import_timm()
    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    backbone = TimmBackbone(model_name="vit_tiny_patch16_224", model_kwargs=kwargs).eval()
    assert not backbone.split_into_blocks and len(backbone.stages) == 1
    assert backbone.stage_channels == [32] and backbone.out_features == 32
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(backbone.pool(backbone.forward_stages(x)[-1]), backbone(x), atol=1e-6)
    with pytest.raises(ValueError, match="cannot be cut"):
        TimmBackbone(model_name="vit_tiny_patch16_224", split="blocks", model_kwargs=kwargs)
    assert timm is not None


def test_timm_pretrained_reads_the_local_cache_only(timm_weights, tmp_path):
    name, reference, folder = timm_weights
    repo = TimmBackbone(model_name=name).model.pretrained_cfg["hf_hub_id"]
    # the layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<rev>/file}
    entry = tmp_path / ("models--" + repo.replace("/", "--"))
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text("0" * 40)
    snapshot = entry / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes((folder / "weights.safetensors").read_bytes())
    backbone = TimmBackbone(model_name=name, pretrained=True, cache_dir=str(tmp_path)).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(backbone(x), reference_features(reference, x), atol=1e-5)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="nothing is downloaded.*pretrained_path"):
        TimmBackbone(model_name=name, pretrained=True, cache_dir=str(empty))


def test_timm_rejects_weights_of_another_model(timm_weights, tmp_path):
    timm = import_timm()
    name, _, _ = timm_weights
    other = "test_vit" if "test_vit" in timm.list_models("test_*") else "resnet18"
    torch.save(timm.create_model(other).state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError, match="does not fit"):
        TimmBackbone(model_name=name, pretrained_path=str(tmp_path / "other.pth"))
    with pytest.raises(FileNotFoundError, match="no file"):
        TimmBackbone(model_name=name, pretrained_path=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="timm has no model"):
        TimmBackbone(model_name="no_such_model_xyz")


def test_timm_backbone_trains_from_the_config(timm_weights, tmp_path, make_cfg):
    """backbone=timm through the real entry point: one-channel digits, weights from a local file."""
    timm = import_timm()
    name, _, _ = timm_weights
    torch.save(timm.create_model(name, in_chans=1).state_dict(), tmp_path / "gray.pth")
    from mtl.train import train

    cfg = make_cfg(
        "schedule=multitask", "backbone=timm", f"backbone.model_name={name}",
        f"backbone.pretrained_path={tmp_path / 'gray.pth'}", "logger=none",
    )
    assert cfg.backbone.input_shape is None  # filled from the data
    _, results = train(cfg)
    tasks = results["stages"]["train"]["tasks"]
    assert set(tasks) == {"left", "right", "sum"}
    assert all(torch.isfinite(torch.tensor(m["test"]["loss"])) for m in tasks.values())


# ============================================================================ Hugging Face
@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A 2-layer BERT with hidden size 32 and random weights, saved with save_pretrained."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, pad_token_id=0,
    )
    model = transformers.BertModel(config).eval()
    folder = tmp_path_factory.mktemp("bert")
    model.save_pretrained(str(folder))
    return folder, model


def token_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[2, 5, 9, 11, 3, 0, 0], [2, 7, 8, 3, 0, 0, 0]])
    return ids, (ids != 0).long()


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_hf_loads_a_local_directory(bert_dir, pooling):
    folder, reference = bert_dir
    backbone = HFBackbone(path=str(folder), pooling=pooling).eval()
    ids, mask = token_batch()
    with torch.no_grad():
        hidden = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        if pooling == "cls":
            expected = hidden[:, 0]
        else:
            expected = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        from_ids = backbone(ids)  # mask derived from pad_token_id
        from_dict = backbone({"input_ids": ids, "attention_mask": mask})
    assert backbone.out_features == 32 and from_ids.shape == (2, 32)
    assert torch.allclose(from_ids, expected, atol=1e-5)
    assert torch.allclose(from_dict, expected, atol=1e-5)


def test_hf_stages_are_the_encoder_layers(bert_dir):
    folder, reference = bert_dir
    backbone = HFBackbone(path=str(folder)).eval()
    assert len(backbone.stages) == 2 and backbone.stage_channels == [32, 32]
    assert backbone.stages[-1].layer is backbone.model.encoder.layer[-1]
    ids, mask = token_batch()
    with torch.no_grad():
        outs = backbone.forward_stages(ids)
        assert len(outs) == 2
        assert torch.allclose(outs[-1], backbone.model(input_ids=ids, attention_mask=mask).last_hidden_state)
    with pytest.raises(RuntimeError, match="cross_stitch"):
        backbone.stages[0](outs[0])
    # no duplicate keys: the stages are views into the model
    assert all(k.startswith("model.") for k in backbone.state_dict())


def test_hf_errors_say_what_to_do(bert_dir, tmp_path):
    folder, _ = bert_dir
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        HFBackbone(path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="pooling"):
        HFBackbone(path=str(folder), pooling="max")
    backbone = HFBackbone(path=str(folder))
    with pytest.raises(ValueError, match="token ids"):
        backbone(torch.randn(2, 7))
    with pytest.raises(ValueError, match="input_ids"):
        backbone({"attention_mask": torch.ones(2, 3)})


def test_hf_config_instantiates_and_trains_a_step(bert_dir, make_cfg):
    folder, _ = bert_dir
    cfg = make_cfg("backbone=hf", f"backbone.path={folder}", "backbone.pooling=mean")
    backbone = instantiate(cfg.backbone)
    assert isinstance(backbone, HFBackbone) and backbone.pooling == "mean"
    from mtl import MultiTaskModel, Task

    model = MultiTaskModel(backbone, [Task("a", kind="binary"), Task("b", kind="regression")])
    ids, _ = token_batch()
    out = model(ids)
    loss = out["a"].sum() + out["b"].sum()
    loss.backward()
    assert backbone.model.encoder.layer[0].attention.self.query.weight.grad is not None


def test_configs_exist_and_name_the_classes():
    for name, target in [("timm", "mtl.backbones.TimmBackbone"), ("hf", "mtl.backbones.HFBackbone")]:
        text = (Path(ROOT) / "conf" / "backbone" / f"{name}.yaml").read_text()
        assert f"_target_: {target}" in text
