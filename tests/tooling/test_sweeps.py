"""Real multiruns in a subprocess: seeds grouped in the report, failures recorded, joblib, Optuna."""

import csv
import json
import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from tooling_helpers import ROOT, group_override, key_override

from conftest import PYTHON, TINY, cli_env

TINY_CLI = TINY + ["backbone.channels=[8,16]", "schedule=multitask"]
HERE = Path(__file__).resolve().parent


def run(*args, cwd, env=None, ok=True):
    env = {**cli_env(), **(env or {})}
    env["PYTHONPATH"] = f"{HERE}{':'}{env['PYTHONPATH']}"
    proc = subprocess.run([PYTHON, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    if ok:
        assert proc.returncode == 0, out[-4000:]
    return proc.returncode, out


def test_multirun_two_by_two_with_two_seeds_gives_mean_std_rows(tmp_path):
    sweep = tmp_path / "sweep"
    run("-m", "mtl.train", "-m", "balancer=ew,pcgrad", "seed=0,1", f"hydra.sweep.dir={sweep}", *TINY_CLI, cwd=tmp_path)
    assert len(list(sweep.glob("*/results.json"))) == 4
    _, out = run("-m", "mtl.report", str(sweep), cwd=tmp_path)
    rows = {line.split("|")[1].strip(): line for line in (sweep / "report.md").read_text().splitlines()[2:] if line.startswith("| ")}
    assert set(rows) == {"balancer=ew", "balancer=pcgrad"}, out
    for line in rows.values():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert cells[1] == "ok" and cells[2] == "2"            # two seeds per row
        assert all(" ± " in c for c in cells[3:-1])            # mean ± std per task and metric
    assert "Δm is blank" in out
    assert (sweep / "report.csv").is_file()
    # the single-task baselines of the same setting: the report finds them and fills Δm
    base = tmp_path / "baseline"
    run("-m", "mtl.train", "-m", group_override("baseline", "single_task"), "seed=0,1", f"hydra.sweep.dir={base}",
        *TINY_CLI, cwd=tmp_path)
    _, out = run("-m", "mtl.report", str(sweep), str(base), "--out", str(tmp_path / "both"), cwd=tmp_path)
    rows = {r["run"]: r for r in csv.DictReader((tmp_path / "both.csv").open())}
    assert set(rows) == {"balancer=ew", "balancer=pcgrad", "baseline=single_task"}, out
    assert rows["balancer=ew"]["baseline"] == "baseline=single_task"
    assert math.isfinite(float(rows["balancer=ew"]["delta_m_pct"]))
    assert rows["baseline=single_task"]["seeds"] == "2"


def test_a_failing_job_does_not_stop_the_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    code, out = run("-m", "mtl.train", "-m", "schedule.stages.train.tasks=[nope],[left]",
                    f"hydra.sweep.dir={sweep}", *TINY_CLI, cwd=tmp_path)
    failed = json.loads((sweep / "0" / "results.json").read_text())
    assert failed["status"] == "failed" and "unknown task" in failed["error"]
    assert "unknown task" in (sweep / "0" / "error.txt").read_text()
    assert "Job failed" in (sweep / "0" / "train.log").read_text()   # traceback in the job log
    assert "stages" in json.loads((sweep / "1" / "results.json").read_text())  # the next job ran
    assert "Sweep report" in out                                      # printed by SweepSummary
    md = (sweep / "report.md").read_text()
    assert "failed: ValueError: schedule.stages.train.tasks: unknown task" in md
    assert "| ok | 1 |" in md


def test_joblib_runs_two_jobs_in_parallel(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    _, out = run("-m", "mtl.train", "-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "seed=0,1",
                 f"hydra.sweep.dir={sweep}", *TINY_CLI, "logger=none", cwd=tmp_path)
    assert "Joblib.Parallel(n_jobs=2" in out
    assert len(list(sweep.glob("*/results.json"))) == 2


def _trial_states(db: Path) -> list[str]:
    with sqlite3.connect(db) as con:
        return [s for (s,) in con.execute("select state from trials order by number")]


def test_optuna_search_interrupted_after_two_trials_resumes_to_four(tmp_path):
    pytest.importorskip("optuna")
    sweep = tmp_path / "search"
    args = ["-m", "mtl.train", "-m", "hydra/sweeper=mtl_optuna", "hydra.sweeper.n_trials=4",
            "optimized_metric=train/val/sum/acc", "optimizer.lr=tag(log, interval(1e-4, 1e-2))",
            "+callbacks.crash._target_=tooling_helpers.KillAtJob", f"hydra.sweep.dir={sweep}",
            *TINY_CLI, "logger=none"]
    code, out = run(*args, cwd=tmp_path, env={"MTL_TEST_KILL_AT_JOB": "2"}, ok=False)
    assert code != 0, out[-2000:]                                  # killed while running job 2
    assert _trial_states(sweep / "optuna.db") == ["COMPLETE", "COMPLETE", "RUNNING"]
    _, out = run(*args, cwd=tmp_path)                             # the same command resumes
    assert "2 of 4 trials already finished" in out and "Trial 2 was interrupted" in out
    states = _trial_states(sweep / "optuna.db")
    assert states.count("COMPLETE") == 4 and states[2] == "FAIL", states
    summary = OmegaConf.load(sweep / "optimization_results.yaml")
    assert summary.n_complete == 4 and "optimizer.lr" in summary.best_params
    assert sorted(p.parent.name for p in sweep.glob("*/results.json")) == ["0", "1", "2", "3"]
    _, out = run(*args, cwd=tmp_path)                             # finished: nothing more runs
    assert "4 of 4 trials already finished" in out
    assert _trial_states(sweep / "optuna.db").count("COMPLETE") == 4


def test_optuna_multi_objective_gives_a_pareto_front(tmp_path):
    pytest.importorskip("optuna")
    sweep = tmp_path / "pareto"
    run("-m", "mtl.train", "-m", group_override("hparams_search", "multidigits_pareto"),
        key_override("optimized_metrics", "[train/val/left/acc,train/val/sum/acc]"),
        "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler._target_=optuna.samplers.RandomSampler",
        "~hydra.sweeper.sampler.population_size", f"hydra.sweep.dir={sweep}", *TINY_CLI, "logger=none", cwd=tmp_path)
    summary = OmegaConf.load(sweep / "optimization_results.yaml")
    assert summary.n_complete == 3 and list(summary.directions) == ["maximize", "maximize"]
    assert 1 <= len(summary.best_trials) <= 3
    assert all(len(t["values"]) == 2 for t in summary.best_trials)
    assert {"++data.tasks.left.weight", "optimizer.lr"} <= set(summary.best_trials[0]["params"])
