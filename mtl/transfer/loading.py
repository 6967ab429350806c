"""Loading pretrained weights into a MultiTaskModel, with a report of what matched."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

HEAD_PREFIX = "heads."


@dataclass
class LoadReport:
    """What :func:`load_weights` did.

    Attributes:
        loaded: keys copied into the model.
        missing: model keys left as initialised (the heads of new tasks).
        unexpected: keys of the file the model has no use for (e.g. heads of source tasks).
        mismatched: keys present in both but with different shapes (heads only; a shared one is
            an error).
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def summary(self) -> str:
        def short(keys: list[str]) -> str:
            heads = sorted({k.split(".")[1] for k in keys if k.startswith(HEAD_PREFIX)})
            other = [k for k in keys if not k.startswith(HEAD_PREFIX)]
            parts = [f"heads of {heads}"] if heads else []
            if other:
                parts.append(", ".join(other[:5]) + (" ..." if len(other) > 5 else ""))
            return "; ".join(parts) or "none"

        return (
            f"Loaded {len(self.loaded)} tensors from {self.source}. "
            f"Missing (kept fresh): {short(self.missing)}. Unexpected (ignored): {short(self.unexpected)}."
            + (f" Shape mismatch (kept fresh): {short(self.mismatched)}." if self.mismatched else "")
        )


def load_checkpoint(path: str | Path, what: str = "Checkpoint") -> Any:
    """``torch.load(path)`` (tensors and plain data only), with errors that name the file.

    Raises:
        FileNotFoundError: there is no such file.
        ValueError: the file is empty, truncated or not a PyTorch file (the message says what to do).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} '{path}' does not exist. Set the stage's init to 'fresh', 'previous' or an "
            f"existing .ckpt / state_dict file."
        )
    if path.stat().st_size == 0:
        raise ValueError(f"{what} '{path}' is empty (0 bytes): an interrupted save or copy. Delete it or copy it again.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several types for a damaged file
        raise ValueError(
            f"{what} '{path}' cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:200]}): it "
            f"is truncated, damaged or not a PyTorch checkpoint. Delete it (a stage's last.ckpt: the "
            f"stage then restarts) or copy it again."
        ) from None


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The model weights in a Lightning checkpoint or a plain ``state_dict`` file.

    Lightning checkpoints hold ``state_dict`` with keys prefixed ``model.`` (the attribute of
    :class:`~mtl.module.MultiTaskModule`); only those are read (a balancer's state is not model
    weights) and the prefix is stripped.
    """
    path = Path(path)
    obj: Any = load_checkpoint(path)
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if isinstance(state, Mapping) and any(k.startswith("model.") for k in state):
        state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"'{path}' holds neither a Lightning checkpoint nor a state_dict of tensors.")
    return dict(state)


def map_keys(
    state: Mapping[str, Tensor], key_map: Mapping[str, str] | None, where: str = "init_key_map", source: str = ""
) -> dict[str, Tensor]:
    """Rename key prefixes: ``{"encoder.": "sharing.backbone."}`` maps ``encoder.x`` to
    ``sharing.backbone.x``; an empty target strips the prefix (``{"module.": ""}``). The first
    matching prefix wins; keys matching none are kept as they are.

    Raises:
        ValueError: a prefix of ``key_map`` matches no key (a typo would otherwise be ignored);
            the message names ``where`` and lists the file's key prefixes.
    """
    if not key_map:
        return dict(state)
    unused = [old for old in key_map if not any(k.startswith(old) for k in state)]
    if unused:
        prefixes = sorted({k.split(".")[0] + "." for k in state})
        raise ValueError(
            f"{where}: prefix(es) {unused} match no key of {source or 'the file'}; its keys start with "
            f"{prefixes[:12]}. Fix or remove those entries."
        )
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        for old, new in key_map.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


def load_weights(
    model: nn.Module, path: str | Path, key_map: Mapping[str, str] | None = None, where: str = "init_key_map"
) -> LoadReport:
    """Copy the weights of ``path`` into ``model``: all shared weights, and heads where they fit.

    Every shared parameter and buffer of the model must be in the file with the same shape;
    otherwise a ``ValueError`` lists the missing, unexpected and mismatched keys (the backbone does
    not fit). Task-specific weights (heads, and the parts of a sharing structure named after a task,
    such as ``sharing.gates.<task>``) are copied for tasks present in both and stay as initialised
    for new tasks. ``key_map`` renames key prefixes of the file first (see :func:`map_keys`), for
    weights saved by other code (``{"module.": ""}``, ``{"encoder.": "sharing.backbone."}``);
    ``where`` names that option in errors.
    """
    state = map_keys(read_state_dict(path), key_map, where, f"'{path}'")
    own = model.state_dict()
    tasks = set(getattr(model, "tasks", {}) or {})

    def task_specific(key: str) -> bool:
        return key.startswith(HEAD_PREFIX) or any(part in tasks for part in key.split(".")[:-1])

    report = LoadReport(source=str(path))
    for key, value in own.items():
        if key not in state:
            report.missing.append(key)
        elif state[key].shape != value.shape:
            report.mismatched.append(key)
        else:
            report.loaded.append(key)
    report.unexpected = [k for k in state if k not in own]
    bad_missing = [k for k in report.missing if not task_specific(k)]
    bad_shape = [k for k in report.mismatched if not task_specific(k)]
    if bad_missing or bad_shape:
        shared_unexpected = [k for k in report.unexpected if not k.startswith(HEAD_PREFIX)]
        lines = [f"The shared weights in '{path}' do not fit this model's backbone/sharing."]
        if bad_missing:
            lines.append(f"  missing keys ({len(bad_missing)}): {bad_missing[:20]}")
        if shared_unexpected:
            lines.append(f"  unexpected keys ({len(shared_unexpected)}): {shared_unexpected[:20]}")
        if bad_shape:
            shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in bad_shape[:10]]
            lines.append(f"  shape mismatches: {shapes}")
        lines.append(
            "  Use the same backbone and sharing config as the run that wrote the file, or map its "
            "key prefixes with the stage's init_key_map (e.g. {'encoder.': 'sharing.backbone.'})."
        )
        raise ValueError("\n".join(lines))
    model.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
    return report
