"""Shared fixtures: compose the real Hydra config with tiny data and few steps."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# One intra-op thread for the whole suite, set before torch starts its thread pool: the tests that
# fork processes (DDP, kill-and-resume) would otherwise fork a process whose OpenMP pool is running,
# and a forked child can then wait forever on a lock the pool held. It is also what the suite's
# tiny models run fastest with on a shared 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra

import mtl.train  # noqa: E402,F401  (registers the schedule schema, schedule/base, in the ConfigStore)

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")

# tiny multidigits and a couple of batches per split: every schedule runs in seconds
TINY_DATA = [
    "data.n_train=256",
    "data.n_val=64",
    "data.n_test=64",
    "data.batch_size=32",
    "data.label_budget.sum=64",
]
TINY = TINY_DATA + [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
]


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg(*overrides, tiny=True)`` -> composed train config writing under ``tmp_path``."""

    def _make(*overrides: str, tiny: bool = True, config_name: str = "train"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            extra = [f"paths.output_dir={tmp_path / 'run'}"]
            if tiny and not any(o.startswith("backbone=") for o in overrides):
                extra.append("backbone.channels=[8,16]")
            base = TINY if tiny else []
            if any(o.startswith("data=") for o in overrides):
                base = [o for o in base if o not in TINY_DATA]
            return compose(config_name, overrides=base + extra + list(overrides))

    yield _make
    GlobalHydra.instance().clear()


def cli_env() -> dict[str, str]:
    """Environment for subprocess runs of the entry points."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


PYTHON = sys.executable
