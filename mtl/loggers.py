"""Logger adapters for the per-stage loggers the schedule runner creates (``conf/logger/``)."""

from __future__ import annotations

from typing import Any

from pytorch_lightning.loggers import WandbLogger


class WandbStageLogger(WandbLogger):
    """A :class:`~pytorch_lightning.loggers.WandbLogger` that gives each stage its own W&B run.

    Lightning's ``WandbLogger`` reuses a W&B run already in progress, so without this every stage
    of a schedule (and every job of an in-process multirun) would log into the first stage's run.
    Creating this logger finishes the run left open by the previous stage; the last one is finished
    by W&B at exit. The run is named after the stage directory unless ``name`` is given.
    """

    def __init__(self, save_dir: str = ".", name: str | None = None, **kwargs: Any) -> None:
        import wandb

        if wandb.run is not None:
            wandb.finish()
        if name is None:
            from pathlib import Path

            parts = Path(save_dir).resolve().parts
            # <run_dir>/stages/<stage> -> "<run_dir name>/<stage>"
            name = f"{parts[-3]}/{parts[-1]}" if len(parts) >= 3 and parts[-2] == "stages" else None
        super().__init__(save_dir=save_dir, name=name, **kwargs)
