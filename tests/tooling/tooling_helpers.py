"""Helpers of the tooling tests: hand-made run directories, group overrides, a crash callback."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytorch_lightning as pl

ROOT = Path(__file__).resolve().parents[2]


def group_override(group: str, option: str) -> str:
    """``group=option`` when conf/train.yaml lists the group in its defaults, else ``+group=option``."""
    text = (ROOT / "conf" / "train.yaml").read_text()
    return f"{group}={option}" if f"- {group}:" in text else f"+{group}={option}"


def write_run(job: Path, stages: dict, overrides: list[str] | None = None, config: dict | None = None,
              **top) -> Path:
    """A job directory as mtl-train leaves it: results.json and (optionally) .hydra/overrides.yaml.

    ``stages``: ``{stage: {task: {metric: value}}}`` (the same values for val and test).
    """
    job.mkdir(parents=True, exist_ok=True)
    results = {
        "stages": {
            s: {"tasks": {t: {"val": dict(m), "test": dict(m)} for t, m in tasks.items()},
                "target_tasks": list(tasks), "source_tasks": []}
            for s, tasks in stages.items()
        },
        "config": config or {},
        "config_hash": "x",
        "wall_time_s": 1.0,
        **top,
    }
    (job / "results.json").write_text(json.dumps(results))
    if overrides is not None:
        (job / ".hydra").mkdir(exist_ok=True)
        (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return job


class KillAtJob(pl.Callback):
    """Kill this process (SIGKILL, like a lost machine) when the Hydra job number equals
    ``$MTL_TEST_KILL_AT_JOB``: an interruption at a known point of a sweep."""

    def on_train_start(self, trainer, pl_module) -> None:
        wanted = os.environ.get("MTL_TEST_KILL_AT_JOB")
        if wanted is None:
            return
        from hydra.core.hydra_config import HydraConfig

        if str(HydraConfig.get().job.num) == wanted:
            os.kill(os.getpid(), signal.SIGKILL)


def key_override(key: str, value: str) -> str:
    """``key=value`` when conf/train.yaml defines the top-level key, else ``+key=value``."""
    text = (ROOT / "conf" / "train.yaml").read_text()
    return f"{key}={value}" if f"\n{key}:" in text else f"+{key}={value}"
