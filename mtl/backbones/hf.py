"""A Hugging Face ``transformers`` encoder, loaded from a local directory, as a backbone.

Needs the optional extra: ``pip install "mtl[hf]"``. ``transformers`` is imported when an
:class:`HFBackbone` is built, never when ``mtl.backbones`` is imported. Nothing is downloaded: the
model is read with ``AutoModel.from_pretrained(path, local_files_only=True)`` from a directory
written by ``save_pretrained`` (or a snapshot directory of the Hugging Face cache).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from mtl.backbones.base import Backbone
from mtl.backbones.timm_backbone import require

#: Where common architectures keep their list of transformer layers, tried in order.
LAYER_PATHS = (
    "encoder.layer",  # BERT, RoBERTa, ELECTRA, DeBERTa
    "encoder.layers",  # encoder of encoder-decoder models, ViT-like encoders
    "transformer.layer",  # DistilBERT
    "layers",  # Llama, Mistral, Qwen, ModernBERT
    "h",  # GPT-2
    "transformer.h",
)


def _find_layers(model: nn.Module) -> nn.ModuleList | None:
    for path in LAYER_PATHS:
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    return None


class _Layer(nn.Module):
    """One transformer layer, exposed as a stage for freezing and inspection only."""

    def __init__(self, layer: nn.Module, index: int) -> None:
        super().__init__()
        self.layer = layer
        self.index = index

    def forward(self, h: Tensor) -> Tensor:
        raise RuntimeError(
            f"Layer {self.index} of a Hugging Face backbone cannot be run on its own: it needs the "
            "attention mask and position data that the model's forward builds. Structure sharing "
            "that calls backbone stages one by one (sharing=cross_stitch) is not supported with "
            "backbone=hf; use sharing=hard, mmoe, omoe, cgc, ple or dselect_k."
        )


class HFBackbone(Backbone):
    """``AutoModel.from_pretrained(path)`` with a pooled output ``[B, hidden_size]``.

    **Inputs**: a tensor of token ids ``[B, L]`` (the attention mask is then ``input_ids !=
    pad_token_id`` when the model's config has a pad token, else all ones), or a dict of tensors
    the model accepts (``input_ids``, ``attention_mask``, ``token_type_ids``, ...), e.g. a
    tokenizer's output.

    **Output**: ``pooling="cls"``: the last hidden state of the first token (BERT's ``[CLS]``);
    ``pooling="mean"``: the mean of the last hidden states over the tokens the attention mask keeps.
    ``out_features = config.hidden_size``.

    **Stages** are the encoder's transformer layers (``stage_channels = [hidden_size] * layers``),
    found at the usual attribute (``encoder.layer`` for BERT-like models, ``layers`` for Llama-like
    ones, ...). They serve freezing, per-stage learning rates and GradNorm's "last shared layer";
    ``forward_stages`` returns every layer's hidden states ``[B, L, hidden_size]``. A layer cannot be
    called on its own (it needs the mask the model builds), so sharing modules that run stages one
    by one (cross-stitch) are not supported. The stages share their modules with ``model``; the
    state dict holds the Hugging Face model's own keys under ``model.``.

    Args:
        input_shape: the shape of one example (token ids ``(L,)``); taken for the family's common
            constructor and not needed (sequence lengths may vary).
        path: local directory holding ``config.json`` and the weights.
        pooling: ``cls`` or ``mean``.
        model_kwargs: extra keyword arguments for ``AutoModel.from_pretrained`` (``dtype``,
            ``attn_implementation``, ...).
    """

    def __init__(
        self,
        input_shape: Sequence[int] | None = None,
        path: str | None = None,
        pooling: str = "cls",
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"backbone.pooling must be 'cls' or 'mean', got '{pooling}'.")
        transformers = require("transformers", "hf")
        if path is None or not Path(str(path)).expanduser().is_dir():
            raise FileNotFoundError(
                f"backbone.path must be a local directory written by save_pretrained (config.json and "
                f"weights), got '{path}'. Models are never downloaded; save one first, e.g. "
                f"AutoModel.from_pretrained('bert-base-uncased').save_pretrained('/models/bert')."
            )
        self.path = str(Path(str(path)).expanduser())
        self.pooling = pooling
        self.model = transformers.AutoModel.from_pretrained(
            self.path, local_files_only=True, **dict(model_kwargs or {})
        )
        config = self.model.config
        self.out_features = int(config.hidden_size)
        self.pad_token_id = getattr(config, "pad_token_id", None)
        layers = _find_layers(self.model)
        if layers is None:
            raise ValueError(
                f"HFBackbone: cannot find the transformer layers of {type(self.model).__name__} "
                f"(looked at {', '.join(LAYER_PATHS)})."
            )
        # Not registered as a child: the layers already live in self.model (see timm_backbone).
        object.__setattr__(self, "_stage_list", nn.ModuleList(_Layer(l, i) for i, l in enumerate(layers)))
        self.stage_channels = [self.out_features] * len(layers)

    @property
    def stages(self) -> nn.ModuleList:  # type: ignore[override]
        return self._stage_list

    def prepare(self, x: Tensor | Mapping[str, Tensor]) -> dict[str, Tensor]:  # type: ignore[override]
        """Token ids ``[B, L]`` or a dict of model inputs -> the keyword arguments of the model."""
        if isinstance(x, Mapping):
            inputs = dict(x)
            if "input_ids" not in inputs and "inputs_embeds" not in inputs:
                raise ValueError(
                    f"HFBackbone: a dict input needs 'input_ids' (or 'inputs_embeds'); got keys {sorted(inputs)}."
                )
            return inputs
        if not isinstance(x, Tensor) or x.dim() != 2 or x.is_floating_point():
            raise ValueError(
                "HFBackbone expects token ids, an integer tensor [B, L], or a dict of model inputs "
                f"(input_ids, attention_mask, ...); got {type(x).__name__}"
                f"{' of shape ' + str(tuple(x.shape)) + ' and dtype ' + str(x.dtype) if isinstance(x, Tensor) else ''}."
            )
        ids = x.long()
        if self.pad_token_id is not None:
            mask = ids.ne(int(self.pad_token_id)).long()
        else:
            mask = torch.ones_like(ids)
        return {"input_ids": ids, "attention_mask": mask}

    def _pool(self, hidden: Tensor, mask: Tensor | None) -> Tensor:
        """``[B, L, D]`` (and a ``[B, L]`` mask) -> ``[B, D]``."""
        if self.pooling == "cls":
            return hidden[:, 0]
        if mask is None:
            return hidden.mean(dim=1)
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)

    def pool(self, h: Tensor) -> Tensor:
        """``[B, L, D] -> [B, D]`` (first token, or the plain mean over all tokens)."""
        return self._pool(h, None)

    def forward_stages(self, x: Tensor | Mapping[str, Tensor]) -> list[Tensor]:  # type: ignore[override]
        """Hidden states after each transformer layer, ``[B, L, hidden_size]`` each."""
        out = self.model(**self.prepare(x), output_hidden_states=True)
        return list(out.hidden_states[1:])

    def forward(self, x: Tensor | Mapping[str, Tensor]) -> Tensor:  # type: ignore[override]
        """Token ids ``[B, L]`` or a dict of inputs -> pooled features ``[B, hidden_size]``."""
        inputs = self.prepare(x)
        hidden = self.model(**inputs).last_hidden_state
        return self._pool(hidden, inputs.get("attention_mask"))
