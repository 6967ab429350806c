"""What a sweep needs from each job: its objective value(s), and failures that do not stop the rest.

``mtl.train.main`` calls :func:`run_job`::

    @hydra.main(...)
    def main(cfg):
        run_dir = HydraConfig.get().runtime.output_dir
        return run_job(cfg, run_dir, lambda: train(cfg, run_dir)[1])

In a multirun (``-m``), an exception in one job is caught here: its traceback goes to the job's log
(``<job>/<jobname>.log``, Hydra's job logging) and to ``<job>/error.txt``, the job's
``results.json`` records ``{"status": "failed", "error": ...}`` (``mtl-report`` lists it as failed),
and the sweeper receives NaN (one per objective), which Optuna records as a failed trial. The other
jobs go on. In a single run the exception propagates as usual. ``KeyboardInterrupt`` is never
caught: stopping a sweep stops it.
"""

from __future__ import annotations

import logging
import math
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping

from hydra.experimental.callback import Callback

from mtl.results import failed_results, lookup_metric, write_json

log = logging.getLogger("mtl.sweeps")

Objective = float | tuple[float, ...] | None


def objective_names(cfg: Mapping[str, Any]) -> list[str]:
    """The metric names a sweeper optimizes: ``optimized_metrics`` (a list) or ``optimized_metric``."""
    many = cfg.get("optimized_metrics")
    if many:
        if isinstance(many, str):
            return [many]
        return [str(m) for m in many]
    one = cfg.get("optimized_metric")
    return [str(one)] if one else []


def objective(cfg: Mapping[str, Any], results: Mapping[str, Any]) -> Objective:
    """The value(s) returned to the sweeper: a float for one metric, a tuple for several, or None.

    Metric names are ``<stage>/<split>/<task>/<metric>``; a wrong name raises ValueError listing the
    valid ones (see :func:`mtl.results.lookup_metric`).
    """

    names = objective_names(cfg)
    if not names:
        return None
    values = tuple(lookup_metric(results, n) for n in names)
    return values if cfg.get("optimized_metrics") else values[0]


def failed_objective(cfg: Mapping[str, Any]) -> Objective:
    """NaN in the shape of :func:`objective` (Optuna marks a trial returning NaN as failed)."""
    names = objective_names(cfg)
    if not names:
        return None
    return tuple(math.nan for _ in names) if cfg.get("optimized_metrics") else math.nan


def is_multirun() -> bool:
    """Whether the current Hydra job is part of a multirun (``-m``)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001 - outside Hydra there is no multirun
        return False


def record_failure(run_dir: str | Path, error: BaseException, config: Any = None) -> None:
    """Write ``error.txt`` (the traceback) and a failed ``results.json`` into ``run_dir``.

    When the job was refused because ``run_dir`` belongs to another run (locked by it, or holding
    stages of another config), that run's ``results.json`` is left as it is: it still describes
    what the directory holds.
    """
    from mtl.schedule.guards import RunDirectoryError

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    (run_dir / "error.txt").write_text(trace)
    if isinstance(error, RunDirectoryError) and (run_dir / "results.json").is_file():
        return
    write_json(run_dir / "results.json", failed_results(error, trace, config))


def run_job(
    cfg: Any,
    run_dir: str | Path,
    job: Callable[[], Mapping[str, Any]],
    catch: bool | None = None,
) -> Objective:
    """Run ``job()`` (returns results) and return the objective for the sweeper.

    Args:
        cfg: the job's composed config (``optimized_metric`` / ``optimized_metrics``).
        run_dir: the job's output directory.
        job: runs the schedule and returns the ``results.json`` content.
        catch: record failures and return NaN instead of raising; default: only in a multirun.
    """
    catch = is_multirun() if catch is None else catch
    if not catch:
        return objective(cfg, job())
    try:
        return objective(cfg, job())
    except Exception as error:  # noqa: BLE001 - one failing job must not stop the sweep
        log.error("Job failed in %s:\n%s", run_dir, traceback.format_exc())
        try:
            from omegaconf import OmegaConf

            config = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else cfg
        except Exception:  # noqa: BLE001
            config = None
        record_failure(run_dir, error, config)
        print(f"FAILED: {type(error).__name__}: {error} (traceback in {Path(run_dir) / 'error.txt'})")
        return failed_objective(cfg)


class SweepSummary(Callback):
    """A Hydra callback: at the end of a multirun, print and write the ``mtl-report`` table.

    Enable with ``hydra.callbacks.summary._target_=mtl.sweeps.SweepSummary`` (or in
    ``conf/hydra/default.yaml``). It never fails the sweep: a report error is only printed.
    """

    def __init__(self, split: str = "test") -> None:
        self.split = split

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from mtl.report import main as report_main

        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            report_main([str(sweep_dir), "--split", self.split])
        except (Exception, SystemExit) as err:  # noqa: BLE001
            print(f"mtl-report on {sweep_dir} failed: {err}")
