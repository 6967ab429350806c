"""Any `timm <https://github.com/huggingface/pytorch-image-models>`_ image model as a backbone.

Needs the optional extra: ``pip install "mtl[timm]"``. ``timm`` is imported when a
:class:`TimmBackbone` is built, never when ``mtl.backbones`` is imported.

Weights never come from the network. ``pretrained_path`` loads a local state dict (``.safetensors``,
or a ``torch.save`` file: ``.pth``, ``.pt``, ``.bin``, ``.ckpt``); ``pretrained=True`` looks the
model's default weights up in the local Hugging Face cache (where ``timm``'s own
``pretrained=True`` download puts them) and fails with a clear message if they are not there.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from mtl.backbones.base import Backbone, image_channels

#: Top-level children of timm models that belong to the classifier head, i.e. that
#: ``forward_head`` uses rather than ``forward_features``.
HEAD_CHILDREN = ("global_pool", "head", "fc", "classifier", "head_drop", "fc_norm", "pre_logits")

#: Weight files timm publishes on the Hugging Face Hub, in the order timm prefers them.
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def require(module: str, extra: str) -> Any:
    """Import an optional dependency, or fail with the install line of the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"This backbone needs the optional package '{module}', which is not installed or does not "
            f"import ({err}). Install it with: pip install \"mtl[{extra}]\""
        ) from err


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a local ``.safetensors`` file or a ``torch.save`` file.

    A checkpoint that wraps the weights (``{"state_dict": ...}``, ``{"model": ...}``) is unwrapped,
    and a ``module.`` prefix left by ``DataParallel`` is removed.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"backbone.pretrained_path: no file at '{path}'.")
    if path.suffix == ".safetensors":
        safetensors_torch = require("safetensors.torch", "timm")
        state = safetensors_torch.load_file(str(path), device="cpu")
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"backbone.pretrained_path: '{path}' does not hold a state dict of tensors.")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


class _ForwardFeatures(nn.Module):
    """The whole ``forward_features`` of a timm model as one stage."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)


class TimmBackbone(Backbone):
    """A ``timm.create_model(model_name, num_classes=0)`` trunk with its pooled features as output.

    ``forward(x)`` is timm's ``forward_head(forward_features(x), pre_logits=True)``: ``[B, C, H, W]``
    images (``[B, H, W]`` is read as one channel) -> ``[B, out_features]``, where ``out_features`` is
    the model's pooled width (``num_features``, or ``head_hidden_size`` where a model has one).

    **What a stage is.** With ``split="auto"`` (default) the model is cut at the blocks its
    ``feature_info`` names (e.g. ResNet: stem, ``layer1`` .. ``layer4``; ConvNeXt:
    ``stages.0`` .. ``stages.3``; EfficientNet: groups of ``blocks``): stage ``i`` holds the
    top-level children from after block ``i-1`` up to block ``i``, and ``stage_channels`` are the
    ``feature_info`` widths. This is only right for models whose ``forward_features`` calls its
    children one after the other, so the cut is checked once at construction on a dummy input: if
    ``pool(stages(x))`` does not equal timm's own forward (vision transformers add position
    embeddings and class tokens between their children), the backbone falls back to a single stage,
    the whole ``forward_features``, with ``stage_channels = [num_features]``. ``split="blocks"``
    makes that fallback an error, ``split="none"`` always uses the single stage. ``split_into_blocks``
    says which one was built. Stages share their modules with ``model``; the state dict holds the
    timm model's own keys under ``model.``.

    Args:
        model_name: any name ``timm.list_models()`` knows, e.g. ``resnet18``, ``convnext_tiny``.
        input_shape: shape of one image, ``(C, H, W)`` (timm's ``in_chans`` is ``C``; None: 3).
        pretrained: load the model's default pretrained weights from the local Hugging Face cache.
            Nothing is downloaded: if they are not cached, an error says how to get them.
        pretrained_path: a local weights file (see :func:`load_state_dict_file`); wins over
            ``pretrained``. Classifier weights in the file are ignored; any other missing or
            unexpected key is an error.
        cache_dir: Hugging Face cache to look in for ``pretrained`` (default: the usual one,
            ``HF_HUB_CACHE`` / ``HF_HOME``).
        split: ``auto``, ``blocks`` or ``none`` (see above).
        model_kwargs: extra keyword arguments for ``timm.create_model`` (``drop_path_rate``,
            ``img_size``, widths of small variants...).
    """

    def __init__(
        self,
        input_shape: Sequence[int] | None = None,
        model_name: str = "resnet18",
        pretrained: bool = False,
        pretrained_path: str | None = None,
        cache_dir: str | None = None,
        split: str = "auto",
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if split not in ("auto", "blocks", "none"):
            raise ValueError(f"backbone.split must be 'auto', 'blocks' or 'none', got '{split}'.")
        timm = require("timm", "timm")
        self.model_name = str(model_name)
        self.in_channels = image_channels(input_shape, 3, "timm")
        kwargs = dict(model_kwargs or {})
        try:
            self.model = timm.create_model(
                self.model_name, pretrained=False, num_classes=0, in_chans=self.in_channels, **kwargs
            )
        except RuntimeError as err:
            if "Unknown model" in str(err):
                raise ValueError(
                    f"backbone.model_name: timm has no model '{model_name}'; see timm.list_models()."
                ) from err
            raise
        if pretrained_path is not None:
            self.load_weights(load_state_dict_file(pretrained_path), source=str(pretrained_path))
        elif pretrained:
            path = self.cached_weights(cache_dir)
            self.load_weights(load_state_dict_file(path), source=str(path))

        self.out_features = int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)
        stages, channels = (None, None) if split == "none" else self._split_at_feature_blocks()
        if stages is None and split == "blocks":
            raise ValueError(
                f"backbone.split=blocks: timm model '{model_name}' cannot be cut into sequential blocks "
                f"(its forward_features does more than call its children in order); use split=auto or none."
            )
        self.split_into_blocks = stages is not None
        if stages is None:
            stages, channels = [_ForwardFeatures(self.model)], [int(self.model.num_features)]
        # Not registered as a child: the modules already live in self.model, and registering them
        # twice would duplicate every key of the state dict.
        object.__setattr__(self, "_stage_list", nn.ModuleList(stages))
        self.stage_channels = channels

    @property
    def stages(self) -> nn.ModuleList:  # type: ignore[override]
        return self._stage_list

    # ------------------------------------------------------------------ weights
    def cached_weights(self, cache_dir: str | None = None) -> Path:
        """Local path of the model's default weights in the Hugging Face cache (never downloads)."""
        hub = require("huggingface_hub", "timm")
        cfg = dict(getattr(self.model, "pretrained_cfg", None) or {})
        repo = cfg.get("hf_hub_id")
        tried = []
        if repo:
            names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else list(HUB_WEIGHT_FILES)
            for name in names:
                found = hub.try_to_load_from_cache(repo, name, cache_dir=cache_dir)
                if isinstance(found, str):
                    return Path(found)
                tried.append(f"{repo}/{name}")
        where = cache_dir or "the default Hugging Face cache (HF_HUB_CACHE / HF_HOME)"
        raise FileNotFoundError(
            f"backbone.pretrained=true: weights of timm model '{self.model_name}' are not in {where} "
            f"(looked for {tried or 'a Hub id, but the model has none'}); nothing is downloaded. "
            f"Download them once where there is network (python -c \"import timm; "
            f"timm.create_model('{self.model_name}', pretrained=True)\") or pass "
            f"backbone.pretrained_path=/path/to/weights.safetensors."
        )

    def load_weights(self, state: Mapping[str, Tensor], source: str = "state dict") -> None:
        """Load timm weights into ``self.model``, ignoring the classifier's (``num_classes=0``)."""
        classifier = str((getattr(self.model, "pretrained_cfg", None) or {}).get("classifier") or "")
        prefixes = tuple(f"{c}." for c in ([classifier] if classifier else []) + ["fc", "head", "classifier"])
        own = self.model.state_dict()
        # checkpoints of this backbone (keys under "model.") load as well as timm's own files
        if own and not any(k in own for k in state) and all(k.startswith("model.") for k in state):
            state = {k[len("model."):]: v for k, v in state.items()}
        result = self.model.load_state_dict(dict(state), strict=False)
        unexpected = [k for k in result.unexpected_keys if not k.startswith(prefixes)]
        if result.missing_keys or unexpected:
            raise ValueError(
                f"backbone.pretrained_path: {source} does not fit timm model '{self.model_name}' "
                f"(missing keys: {result.missing_keys[:5]}{'...' if len(result.missing_keys) > 5 else ''}, "
                f"unexpected keys: {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}). "
                f"Check backbone.model_name and backbone.model_kwargs."
            )

    # ------------------------------------------------------------------ stages
    def _split_at_feature_blocks(self) -> tuple[list[nn.Module] | None, list[int] | None]:
        """Cut the children at ``feature_info`` blocks; None if that does not reproduce the model."""
        info = list(getattr(self.model, "feature_info", None) or [])
        info = [i for i in info if isinstance(i, dict) and "module" in i and "num_chs" in i]
        if not info:
            return None, None
        ends = [str(i["module"]) for i in info]
        # children in call order, one level flattened where a block lives inside a container
        parents = {e.split(".")[0] for e in ends if "." in e}
        named: list[tuple[str, nn.Module]] = []
        for name, child in self.model.named_children():
            if name in parents:
                named += [(f"{name}.{n}", c) for n, c in child.named_children()]
            else:
                named.append((name, child))
        names = [n for n, _ in named]
        if any(e not in names for e in ends) or [names.index(e) for e in ends] != sorted(names.index(e) for e in ends):
            return None, None
        stages, start = [], 0
        for k, end in enumerate(ends):
            stop = names.index(end) + 1
            if k == len(ends) - 1:  # the last stage also takes what runs before the head
                while stop < len(named) and named[stop][0].split(".")[0] not in HEAD_CHILDREN:
                    stop += 1
            if stop <= start:
                return None, None
            stages.append(nn.Sequential(*[m for _, m in named[start:stop]]))
            start = stop
        channels = self._stage_widths_if_exact(stages)
        if channels is None:
            return None, None
        return stages, channels

    def _stage_widths_if_exact(self, stages: list[nn.Module]) -> list[int] | None:
        """Output widths of ``stages`` if running them in order and pooling equals timm's forward on
        a dummy input (the widths are measured: a last stage that took the layers before the head,
        such as EfficientNet's ``conv_head``, is wider than its ``feature_info`` entry), else None."""
        cfg = dict(getattr(self.model, "pretrained_cfg", None) or {})
        size = tuple(cfg.get("input_size") or (3, 224, 224))[1:] if cfg.get("fixed_input_size") else (64, 64)
        x = torch.randn(2, self.in_channels, *size, generator=torch.Generator().manual_seed(0))
        ref = next(self.model.parameters(), None)
        if ref is not None:
            x = x.to(device=ref.device, dtype=ref.dtype)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                expected = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
                h, widths = x, []
                for stage in stages:
                    h = stage(h)
                    widths.append(int(h.shape[1]))
                got = self.model.forward_head(h, pre_logits=True)
            exact = got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
            return widths if exact else None
        except Exception:  # noqa: BLE001 - a cut that cannot even run is simply not a valid cut
            return None
        finally:
            self.model.train(was_training)

    # ------------------------------------------------------------------ forward
    def prepare(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"timm backbone '{self.model_name}' expects images [B, {self.in_channels}, H, W] (or "
                f"[B, H, W] for one channel), got shape {tuple(x.shape)}. Set backbone.in_channels."
            )
        return x

    def pool(self, h: Tensor) -> Tensor:
        """timm's ``forward_head(h, pre_logits=True)``: pooled ``[B, out_features]``."""
        return self.model.forward_head(h, pre_logits=True).flatten(1)
