"""``hydra/sweeper=mtl_optuna``: an Optuna search as a Hydra sweeper, on Optuna 3-5.

Why not ``hydra-optuna-sweeper``: its last release (1.2.0/1.3.0) pins ``optuna<3`` (installing it
downgrades Optuna to 2.10) and Optuna 2's SQLite storage fails under SQLAlchemy 2, so a persistent,
resumable study is not possible with it in a current environment. This sweeper is small and uses
only Optuna's public ask-and-tell API.

What it does:

* **Search space** from ``hydra.sweeper.params`` and from sweep overrides on the command line, in
  Hydra's sweep syntax: ``choice(a,b)`` / ``a,b`` / ``glob(*)`` (categorical), ``range(1,5)``
  (integers, Hydra's exclusive stop), ``interval(1e-4,1e-2)`` (floats; integers if both ends are),
  ``tag(log, interval(...))`` (log scale). Plain overrides are passed to every trial.
* **Persistent storage**: ``storage: sqlite:///<sweep dir>/optuna.db`` keeps the study. Running the
  same command again (same ``hydra.sweep.dir``) loads it and runs only the trials still missing
  to reach ``n_trials``. Trials left RUNNING by an interrupted sweep are marked failed and retried
  with the same parameters in the same job directory, so the schedule runner resumes them from
  their last checkpoint. One sweeper process per study (trials RUNNING at start are taken as stale).
* **Objectives**: the job returns a float (``optimized_metric``) or a tuple (``optimized_metrics``),
  one value per entry of ``direction``. Several directions make a multi-objective study whose
  Pareto front (``study.best_trials``) is printed and written to ``optimization_results.yaml``.
  A job that fails (exception, or NaN returned by :func:`mtl.sweeps.run_job`) is a FAIL trial and
  counts toward ``n_trials``; the search goes on.
* **Parallelism**: ``n_jobs`` trials are asked at once and handed to the configured launcher as one
  batch (``hydra/launcher=joblib`` runs them in parallel).
"""

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


@dataclass
class OptunaSweeperConf:
    """Config of ``hydra/sweeper=mtl_optuna`` (every key can be overridden: ``hydra.sweeper.n_trials=50``)."""

    _target_: str = "hydra_plugins.mtl_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    #: name of the study inside the storage
    study_name: str = "mtl"
    #: an Optuna storage URL; null: in memory (no resume). Relative sqlite paths are made absolute.
    storage: Optional[str] = "sqlite:///${hydra.sweep.dir}/optuna.db"
    #: "maximize" / "minimize", or a list of them (one per objective: multi-objective)
    direction: Any = "maximize"
    #: total number of finished trials wanted in the study (counting earlier runs of the command)
    n_trials: int = 20
    #: trials run at once (one launcher batch)
    n_jobs: int = 1
    #: an Optuna sampler config (``_target_: optuna.samplers.TPESampler``), null: Optuna's default
    sampler: Any = None
    #: {key: "interval(0.1, 1)" | "choice(a, b)" | "range(1, 5)" | "tag(log, interval(1e-4, 1e-1))"}
    params: Dict[str, str] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/sweeper", name="mtl_optuna", node=OptunaSweeperConf, provider="mtl")


def _distribution(override: Override) -> Any:
    """An Optuna distribution for one sweep override (see the module docstring for the syntax)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    log_scale = "log" in getattr(value, "tags", set())
    if isinstance(value, IntervalSweep):
        lo, hi = value.start, value.end
        if isinstance(lo, int) and isinstance(hi, int):
            return IntDistribution(lo, hi, log=log_scale)
        return FloatDistribution(float(lo), float(hi), log=log_scale)
    if isinstance(value, RangeSweep):
        values = list(value.range())
        if not values:
            raise ValueError(f"{override.input_line}: empty range")
        if all(isinstance(v, int) for v in values) and isinstance(value.step, int):
            return IntDistribution(values[0], values[-1], log=log_scale, step=value.step)
        return FloatDistribution(float(values[0]), float(values[-1]), step=float(value.step))
    if override.is_choice_sweep():
        if log_scale:
            raise ValueError(f"{override.input_line}: 'log' applies to interval() and range(), not choice()")
        return CategoricalDistribution(list(override.sweep_string_iterator()))
    raise ValueError(f"{override.input_line}: not a sweep the Optuna sweeper understands")


def _as_override_value(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(value)


class OptunaSweeper(Sweeper):
    """See the module docstring; arguments are :class:`OptunaSweeperConf`'s fields."""

    def __init__(
        self,
        study_name: str = "mtl",
        storage: Optional[str] = None,
        direction: Any = "maximize",
        n_trials: int = 20,
        n_jobs: int = 1,
        sampler: Any = None,
        params: Optional[Dict[str, str]] = None,
    ) -> None:
        directions = list(direction) if isinstance(direction, (list, tuple)) or OmegaConf.is_list(direction) else [direction]
        for d in directions:
            if str(d) not in ("maximize", "minimize"):
                raise ValueError(f"hydra.sweeper.direction: '{d}' is not 'maximize' or 'minimize'.")
        self.study_name = study_name
        self.storage = storage
        self.directions = [str(d) for d in directions]
        self.n_trials = int(n_trials)
        self.n_jobs = max(1, int(n_jobs))
        self.sampler = sampler
        self.params = dict(params or {})
        self.config: Optional[DictConfig] = None
        self.launcher: Any = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # ------------------------------------------------------------------ study
    def _storage_url(self, sweep_dir: Path) -> Optional[str]:
        url = self.storage
        if not url:
            return None
        if url.startswith("sqlite:///"):
            path = Path(url[len("sqlite:///"):])
            if not path.is_absolute():
                path = Path.cwd() / path
            path.parent.mkdir(parents=True, exist_ok=True)
            url = f"sqlite:///{path}"
        return url

    def _make_sampler(self) -> Any:
        if self.sampler is None:
            return None
        if OmegaConf.is_config(self.sampler) or isinstance(self.sampler, dict):
            from hydra.utils import instantiate

            return instantiate(self.sampler)
        return self.sampler  # already instantiated (Hydra instantiates nested _target_ configs)

    def _search_space(self, arguments: List[str]) -> Tuple[Dict[str, Any], List[str]]:
        """``({key: distribution}, fixed overrides)`` from the params config and the command line."""
        assert self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        lines = [f"{k}={v}" for k, v in self.params.items()]
        space: Dict[str, Any] = {}
        fixed: List[str] = []
        for override in parser.parse_overrides(lines) + parser.parse_overrides(arguments):
            key = override.get_key_element()
            if override.is_sweep_override():
                space[key] = _distribution(override)
            elif key in space and override.input_line in arguments:
                # a plain value on the command line fixes a key the preset searches over
                del space[key]
                fixed.append(override.input_line)
            else:
                fixed.append(override.input_line)
        return space, fixed

    def _check_objective(self) -> None:
        assert self.config is not None
        many = self.config.get("optimized_metrics")
        one = self.config.get("optimized_metric")
        n = len(many) if many else (1 if one else 0)
        if n == 0:
            raise ValueError(
                "The Optuna sweeper needs an objective: set optimized_metric=<stage>/<split>/<task>/<metric> "
                "(or optimized_metrics=[...] with one hydra.sweeper.direction per metric)."
            )
        if n != len(self.directions):
            raise ValueError(
                f"{n} objective(s) ({list(many) if many else one}) but {len(self.directions)} "
                f"direction(s) {self.directions}; give hydra.sweeper.direction one entry per objective."
            )

    # ------------------------------------------------------------------ sweep
    def sweep(self, arguments: List[str]) -> Any:
        import optuna
        from optuna.trial import TrialState

        assert self.config is not None and self.launcher is not None
        self._check_objective()
        space, fixed = self._search_space(arguments)
        if not space:
            raise ValueError(
                "The Optuna sweeper has nothing to search: give hydra.sweeper.params or sweep overrides "
                "such as 'optimizer.lr=tag(log, interval(1e-4, 1e-2))'."
            )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        study = optuna.create_study(
            storage=self._storage_url(sweep_dir),
            study_name=self.study_name,
            directions=self.directions,
            sampler=self._make_sampler(),
            load_if_exists=True,
        )
        if [d.name.lower() for d in study.directions] != self.directions:
            raise ValueError(
                f"The stored study '{self.study_name}' has directions {[d.name.lower() for d in study.directions]}, "
                f"not {self.directions}; use another hydra.sweep.dir or hydra.sweeper.study_name."
            )
        self._recover_interrupted(study)
        done = self._finished(study)
        if done:
            log.info(f"Optuna study '{self.study_name}' resumed: {done} of {self.n_trials} trials already finished.")
        returns = []
        while done < self.n_trials:
            batch = min(self.n_jobs, self.n_trials - done)
            trials = [study.ask(space) for _ in range(batch)]
            jobs = []
            # job directories are numbered 0, 1, ... in launch order; a retried trial keeps its own
            next_job = 1 + max((int(t.user_attrs.get("job_num", -1)) for t in study.get_trials(deepcopy=False)), default=-1)
            for trial in trials:
                if "job_num" in trial.user_attrs:
                    job_num = int(trial.user_attrs["job_num"])
                else:
                    job_num, next_job = next_job, next_job + 1
                    trial.set_user_attr("job_num", job_num)
                overrides = tuple(fixed + [f"{k}={_as_override_value(v)}" for k, v in trial.params.items()])
                jobs.append((job_num, trial, overrides))
            try:
                self.validate_batch_is_legal([o for _, _, o in jobs])
            except Exception:
                # a config error, not a bad trial: do not count these trials toward n_trials
                for _, trial, _ in jobs:
                    study.tell(trial, state=TrialState.FAIL)
                self._exclude(study, [t.number for _, t, _ in jobs])
                raise
            results = self._launch(jobs)
            for (job_num, trial, _), ret in zip(jobs, results):
                self._tell(study, trial, ret, TrialState)
            returns.append(results)
            done = self._finished(study)
        self._write_summary(study, sweep_dir)
        return returns

    def _launch(self, jobs: Sequence[Tuple[int, Any, Tuple[str, ...]]]) -> List[Any]:
        """Launch the batch; consecutive job numbers go together (a retried trial keeps its number)."""
        results: List[Any] = []
        start = 0
        while start < len(jobs):
            end = start + 1
            while end < len(jobs) and jobs[end][0] == jobs[end - 1][0] + 1:
                end += 1
            chunk = jobs[start:end]
            results.extend(self.launcher.launch([o for _, _, o in chunk], initial_job_idx=chunk[0][0]))
            start = end
        return results

    def _tell(self, study: Any, trial: Any, ret: Any, TrialState: Any) -> None:
        from hydra.core.utils import JobStatus

        if ret.status != JobStatus.COMPLETED:
            log.warning(f"Trial {trial.number} failed: {ret._return_value!r}")
            study.tell(trial, state=TrialState.FAIL)
            return
        value = ret.return_value
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if any(v is None or not math.isfinite(float(v)) for v in values) or len(values) != len(self.directions):
            log.warning(f"Trial {trial.number} returned {value!r}; recorded as failed.")
            study.tell(trial, state=TrialState.FAIL)
            return
        study.tell(trial, [float(v) for v in values])

    def _recover_interrupted(self, study: Any) -> None:
        """Mark trials left RUNNING by an interrupted sweep failed, and queue them again."""
        from optuna.trial import TrialState

        stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not stale:
            return
        for trial in stale:
            study.tell(trial.number, state=TrialState.FAIL)
            job_num = int(trial.user_attrs.get("job_num", trial.number))
            study.enqueue_trial(trial.params, user_attrs={"job_num": job_num, "retry_of": trial.number})
            log.info(f"Trial {trial.number} was interrupted; it will run again in job {job_num}.")
        self._exclude(study, [t.number for t in stale])

    @staticmethod
    def _exclude(study: Any, numbers: List[int]) -> None:
        """Trials that do not count toward n_trials (interrupted, or never launched)."""
        interrupted = list(study.user_attrs.get("interrupted_trials", []))
        study.set_user_attr("interrupted_trials", interrupted + list(numbers))

    @staticmethod
    def _finished(study: Any) -> int:
        from optuna.trial import TrialState

        interrupted = set(study.user_attrs.get("interrupted_trials", []))
        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        return sum(1 for t in study.get_trials(deepcopy=False, states=states) if t.number not in interrupted)

    def _write_summary(self, study: Any, sweep_dir: Path) -> None:
        from optuna.trial import TrialState

        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        summary: Dict[str, Any] = {"study_name": self.study_name, "directions": self.directions,
                                   "n_trials": len(study.trials), "n_complete": len(complete)}
        if complete:
            best = study.best_trials if len(self.directions) > 1 else [study.best_trial]
            summary["best_trials" if len(self.directions) > 1 else "best_trial"] = [
                {"number": t.number, "job": t.user_attrs.get("job_num", t.number), "values": list(t.values),
                 "params": dict(t.params)}
                for t in best
            ]
            if len(self.directions) == 1:
                summary["best_value"] = best[0].values[0]
                summary["best_params"] = dict(best[0].params)
                summary["best_trial"] = summary["best_trial"][0]
        OmegaConf.save(OmegaConf.create(summary), sweep_dir / "optimization_results.yaml")
        what = "Pareto front" if len(self.directions) > 1 else "Best trial"
        log.info(f"{what} of '{self.study_name}' ({len(complete)} complete trials): "
                 f"{summary.get('best_trials', summary.get('best_trial'))}")
        log.info(f"Written to {sweep_dir / 'optimization_results.yaml'}")
