"""The entry point ``mtl.train.main`` becomes with :func:`mtl.sweeps.run_job` (proposed to the lead):
multirun failures recorded per job, one or several objectives returned to the sweeper."""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mtl.sweeps import run_job
from mtl.train import CONFIG_DIR, train


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig):
    run_dir = HydraConfig.get().runtime.output_dir
    return run_job(cfg, run_dir, lambda: train(cfg, run_dir)[1])


if __name__ == "__main__":
    main()
