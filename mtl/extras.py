"""What ``mtl-train`` does before a run starts (lightning-hydra-template's ``extras``).

``extras.ignore_warnings`` silences Python warnings, ``extras.enforce_tags`` refuses a run without
``tags``, and the composed config is written as a tree to ``<run>/config_tree.log`` (and printed
with ``extras.print_config=true``).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

#: top-level groups shown first in the config tree, in this order; the rest follow as composed
TREE_ORDER = ("data", "backbone", "sharing", "model", "balancer", "schedule", "trainer", "optimizer")


def check_tags(tags: Any, enforce: bool) -> list[str]:
    """``tags`` as a list of strings; an error that says what to write when they are malformed, or
    missing while ``extras.enforce_tags`` is set."""
    if tags is None:
        tags = []
    if isinstance(tags, str) or not all(isinstance(t, (str, int, float)) for t in tags):
        raise ValueError(f"tags must be a list of names, e.g. tags=[ablation,v2]; got {tags!r}.")
    tags = [str(t) for t in tags]
    if enforce and not tags:
        raise ValueError(
            "extras.enforce_tags is true and the run has no tags: add tags=[<name>,...] (for example "
            "tags=[ablation]), or extras.enforce_tags=false."
        )
    return tags


def config_tree(cfg: DictConfig, order: Sequence[str] = TREE_ORDER) -> str:
    """The config as a text tree (one branch per top-level key, its YAML below), unresolved
    interpolations shown as written."""
    from rich.console import Console
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order]
    for key in keys:
        node = cfg._get_node(key)
        text = OmegaConf.to_yaml(node, resolve=False) if OmegaConf.is_config(node) else str(node._value())
        tree.add(str(key)).add(Syntax(text.rstrip(), "yaml", theme="ansi_dark"))
    buffer = io.StringIO()
    Console(file=buffer, width=100, color_system=None).print(tree)
    return buffer.getvalue()


def apply_extras(cfg: DictConfig, run_dir: str | Path, echo=print) -> None:
    """Apply ``cfg.extras`` before a run (``enforce_tags`` is checked with the rest of the config,
    by ``mtl.train.check_config``)."""
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    tree = config_tree(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config_tree.log").write_text(tree)
    if extras.get("print_config"):
        echo(tree)
