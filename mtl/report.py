"""Results as tables: one run (``results_table``), and many runs of a sweep (``mtl-report``).

``mtl-report <sweep or run dirs...>`` finds every job directory under the given directories (a
directory with ``results.json`` or with Hydra's ``.hydra/``), groups the jobs by their command-line
overrides other than ``seed`` (``.hydra/overrides.yaml``; jobs without it are grouped by their
config hash, seed and paths left out), and prints one table with, per task and metric, the mean ±
std over seeds, the number of seeds and Δm% against the single-task baselines it finds among the
same runs (``baseline=single_task``). Failed jobs are rows of their own, with their error. The
table is also written as CSV and Markdown (``report.csv``, ``report.md`` in the first directory,
or ``--out``). Metrics are those of the test split unless ``--split val`` (:data:`DEFAULT_SPLIT`,
shared with ``mtl-plot``'s Pareto plot, so that a table and a plot of one sweep show the same
numbers): the best checkpoint is chosen on val, so test is the unbiased estimate.

Δm (Maninis et al., "Attentive Single-Tasking of Multiple Tasks", CVPR 2019) is the mean, over
every task ``t`` and metric ``m``, of the signed relative change against the single-task baseline:

    Δm = 100 / K · Σ_(t,m) (−1)^l(m) · (M_(t,m) − B_(t,m)) / B_(t,m)

where ``K`` is the number of (task, metric) pairs, ``l(m)`` is 1 when a lower value of ``m`` is
better and 0 otherwise (each metric's direction is recorded in ``results.json`` from its task),
and ``M``, ``B`` are the means over seeds of the method and of the baseline. A positive Δm means better than single-task learning on average.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from rich.console import Console
from rich.table import Table

from mtl.results import config_hash, higher_is_better, read_json, task_metrics

#: The split whose metrics ``mtl-report`` and ``mtl-plot`` show unless told otherwise (``--split``).
DEFAULT_SPLIT = "test"


def results_table(results: Mapping[str, Any], title: str = "Final metrics (best checkpoint)") -> Table:
    """A rich table: one row per stage and task, val and test metrics side by side."""
    table = Table(title=title)
    for col in ("stage", "task", "role", "split", "metrics"):
        table.add_column(col)
    for stage, r in results["stages"].items():
        sources = set(r.get("source_tasks") or [])
        for task, splits in r["tasks"].items():
            for split in ("val", "test"):
                metrics = splits.get(split) or {}
                text = "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
                table.add_row(stage, task, "source" if task in sources else "target", split, text or "-")
    fusion = results.get("fusion") or {}
    for kind in ("ensemble", "soup"):
        for task, splits in (fusion.get(kind) or {}).items():
            for split in ("val", "test"):
                metrics = splits.get(split) or {}
                text = "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
                table.add_row(f"{kind} of {'+'.join(fusion.get('stages', []))}", task, "target", split, text or "-")
    return table


def print_results(results: Mapping[str, Any], console: Console | None = None) -> None:
    (console or Console(width=140)).print(results_table(results))


# ---------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    """One job directory: its results (None when it failed) and how it was launched."""

    path: Path
    results: dict[str, Any] | None
    overrides: list[str] | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.results is not None and self.error is None

    @property
    def config(self) -> dict[str, Any]:
        return (self.results or {}).get("config") or {}

    @property
    def is_baseline(self) -> bool:
        return bool((self.results or {}).get("baseline")) or any(
            _override_key(o) == "baseline" and not o.endswith("=null") for o in self.overrides or []
        )


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _read_overrides(job: Path) -> list[str] | None:
    path = job / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf  # only needed for sweeps written by Hydra

    return [str(o) for o in OmegaConf.to_container(OmegaConf.load(path)) or []]


def _job_error(job: Path) -> str:
    """The error of a job that left no usable results.json: error.txt, its log, or a placeholder."""
    err = job / "error.txt"
    if err.is_file() and err.read_text().strip():
        return _last_line(err.read_text())
    for log in sorted(job.glob("*.log")):
        text = log.read_text(errors="replace")
        lines = [ln for ln in text.splitlines() if ln.strip()]
        for i in range(len(lines) - 1, -1, -1):
            if "Error" in lines[i] or "Exception" in lines[i] or "Traceback" in lines[i]:
                return _last_line("\n".join(lines[i:]))
    return "no results.json"


def _last_line(text: str) -> str:
    """The most telling line of a traceback: its last non-empty line."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "unknown error"


def find_runs(dirs: Iterable[str | Path]) -> list[Run]:
    """Every job under ``dirs``: directories holding ``results.json`` or a Hydra ``.hydra/``.

    A job whose ``results.json`` has ``"status": "failed"`` (written by :mod:`mtl.sweeps`), or that
    has ``.hydra/`` but no ``results.json`` (it crashed), is a failed run with its error.
    """
    jobs: set[Path] = set()
    for d in dirs:
        d = Path(d)
        if not d.exists():
            raise FileNotFoundError(f"{d} does not exist.")
        candidates = [d] + [p.parent for p in d.rglob("results.json")] + [p.parent for p in d.rglob(".hydra")]
        for job in candidates:
            # a stage's own result.json lives under stages/; a job is where results.json or .hydra is
            if (job / "results.json").is_file() or (job / ".hydra").is_dir():
                jobs.add(job.resolve())
    runs = []
    for job in sorted(jobs, key=_job_sort_key):
        overrides = _read_overrides(job)
        path = job / "results.json"
        if not path.is_file():
            runs.append(Run(job, None, overrides, _job_error(job)))
            continue
        try:
            results = read_json(path)
        except ValueError as err:
            runs.append(Run(job, None, overrides, str(err)))
            continue
        if results.get("status") == "failed":
            runs.append(Run(job, None, overrides, _last_line(str(results.get("error") or "failed"))))
        else:
            runs.append(Run(job, results, overrides))
    return runs


def _job_sort_key(path: Path) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.parts)


# ---------------------------------------------------------------------------------------- metrics
def delta_m(
    method: Mapping[str, Mapping[str, float]],
    baseline: Mapping[str, Mapping[str, float]],
    higher: Callable[[str, str], bool] = lambda task, metric: higher_is_better({}, task, metric),
) -> float:
    """Δm in percent (see the module docstring) of ``{task: {metric: value}}`` against a baseline.

    ``higher(task, metric)`` says whether a larger value is better (default: from the metric's
    name, for results without recorded directions). Every (task, metric) pair of ``method`` must be
    in ``baseline``; raises KeyError otherwise.
    """
    terms = []
    for task, metrics in method.items():
        for metric, value in metrics.items():
            base = baseline[task][metric]
            sign = 1.0 if higher(task, metric) else -1.0
            terms.append(sign * (value - base) / abs(base) if base != 0 else math.nan)
    if not terms:
        return math.nan
    return 100.0 * sum(terms) / len(terms)


# ---------------------------------------------------------------------------------------- groups
@dataclass
class Group:
    """Runs that differ only by their seed."""

    key: str
    overrides: list[str]
    runs: list[Run] = field(default_factory=list)
    label: str = ""
    baseline: "Group | None" = None
    note: str = ""

    @property
    def ok_runs(self) -> list[Run]:
        return [r for r in self.runs if r.ok]

    @property
    def is_baseline(self) -> bool:
        return any(r.is_baseline for r in self.ok_runs)

    def values(self, split: str, metrics: Sequence[str] | None) -> dict[tuple[str, str], list[float]]:
        """``{(task, metric): [value per seed]}``."""
        out: dict[tuple[str, str], list[float]] = {}
        for run in self.ok_runs:
            for task, ms in task_metrics(run.results, split).items():
                for metric, value in ms.items():
                    if _wanted(metric, metrics):
                        out.setdefault((task, metric), []).append(value)
        return out

    def means(self, split: str, metrics: Sequence[str] | None) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for (task, metric), vals in self.values(split, metrics).items():
            out.setdefault(task, {})[metric] = statistics.fmean(vals)
        return out


def _wanted(metric: str, metrics: Sequence[str] | None) -> bool:
    return metric in metrics if metrics else metric != "loss"


def _strip_seed(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config without what differs between seeds of one setting (seed, paths)."""
    config = {k: v for k, v in config.items() if k not in ("seed", "paths")}
    if isinstance(config.get("data"), Mapping):
        config["data"] = {k: v for k, v in config["data"].items() if k != "seed"}
    return config


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Group runs by their overrides other than ``seed`` (or config hash without seed)."""
    groups: dict[str, Group] = {}
    for run in runs:
        if run.overrides is not None:
            overrides = sorted(o for o in run.overrides if _override_key(o) != "seed")
            key = "overrides:" + "\n".join(overrides)
        elif run.results is not None:
            overrides = []
            key = "config:" + config_hash(_strip_seed(run.config))
        else:
            overrides, key = [], f"path:{run.path}"
        groups.setdefault(key, Group(key, overrides)).runs.append(run)
    out = list(groups.values())
    # label each group by what tells it apart: the overrides not shared by every group
    common = set.intersection(*(set(g.overrides) for g in out)) if out else set()
    for g in out:
        varying = [o for o in g.overrides if o not in common]
        if varying:
            g.label = " ".join(varying)
        elif g.key.startswith("config:"):
            g.label = f"config {g.key[7:]}"
        elif g.key.startswith("path:"):
            g.label = str(g.runs[0].path)
        else:
            g.label = "(all runs)"
    return out


def _match_key(config: Mapping[str, Any]) -> str:
    """What a method and its single-task baseline must share: data, backbone, schedule name."""
    stripped = _strip_seed(config)
    return config_hash(
        {
            "data": stripped.get("data"),
            "backbone": config.get("backbone"),
            "schedule": (config.get("schedule") or {}).get("name"),
        }
    )


def attach_baselines(groups: Sequence[Group], split: str, metrics: Sequence[str] | None) -> None:
    """Find each method group's single-task baseline group (same data, backbone, schedule name)."""
    baselines: dict[str, list[Group]] = {}
    for g in groups:
        if g.is_baseline:
            baselines.setdefault(_match_key(g.ok_runs[0].config), []).append(g)
    if not baselines:
        return  # one note for the whole table, not one per row (see build_report)
    for g in groups:
        if not g.ok_runs or g.is_baseline:
            continue
        found = baselines.get(_match_key(g.ok_runs[0].config), [])
        if not found:
            g.note = "no single-task baseline with the same data, backbone and schedule (run baseline=single_task)"
            continue
        if len(found) > 1:
            g.note = f"{len(found)} matching baselines; using '{found[0].label}'"
        g.baseline = found[0]
        missing = [
            f"{t}/{m}"
            for t, ms in g.means(split, metrics).items()
            for m in ms
            if m not in g.baseline.means(split, metrics).get(t, {})
        ]
        if missing:
            g.note = f"the baseline lacks {', '.join(missing)}"
            g.baseline = None


# ---------------------------------------------------------------------------------------- table
@dataclass
class Report:
    """The rows of the sweep table (plain data; rendered as rich, CSV and Markdown)."""

    columns: list[tuple[str, str]]  # (task, metric)
    rows: list[dict[str, Any]]
    split: str
    notes: list[str]


def build_report(
    dirs: Iterable[str | Path], split: str = DEFAULT_SPLIT, metrics: Sequence[str] | None = None
) -> Report:
    """Collect, group and summarize every run under ``dirs`` (see the module docstring)."""
    runs = find_runs(dirs)
    groups = group_runs(runs)
    attach_baselines(groups, split, metrics)
    columns: list[tuple[str, str]] = []
    for g in groups:
        for col in g.values(split, metrics):
            if col not in columns:
                columns.append(col)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for g in groups:
        if g.ok_runs:
            values = g.values(split, metrics)
            cells = {
                col: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
                for col, v in values.items()
            }
            dm = None
            if g.is_baseline:
                dm_text = "baseline"
            elif g.baseline is not None:
                first = g.ok_runs[0].results
                dm = delta_m(g.means(split, metrics), g.baseline.means(split, metrics), lambda t, m: higher_is_better(first, t, m))
                dm_text = f"{dm:+.2f}"
            else:
                dm_text = ""
            if g.note:
                notes.append(f"{g.label}: {g.note}")
            rows.append(
                {
                    "run": g.label,
                    "status": "ok",
                    "seeds": len(g.ok_runs),
                    "cells": cells,
                    "delta_m": dm,
                    "delta_m_text": dm_text,
                    "baseline": g.baseline.label if g.baseline is not None else "",
                    "error": "",
                    "path": " ".join(str(r.path) for r in g.ok_runs),
                }
            )
        for run in g.runs:
            if not run.ok:
                rows.append(
                    {
                        "run": g.label,
                        "status": "failed",
                        "seeds": 0,
                        "cells": {},
                        "delta_m": None,
                        "delta_m_text": "",
                        "baseline": "",
                        "error": run.error or "failed",
                        "path": str(run.path),
                    }
                )
    if any(r["status"] == "ok" for r in rows) and not any(g.is_baseline for g in groups):
        notes.append("Δm is blank: no single-task baseline among these runs (run the same setting with baseline=single_task).")
    return Report(columns, rows, split, notes)


def _cell(row: Mapping[str, Any], col: tuple[str, str]) -> str:
    if col not in row["cells"]:
        return ""
    mean, std, _ = row["cells"][col]
    return f"{mean:.4f} ± {std:.4f}"


def report_table(report: Report) -> Table:
    table = Table(title=f"Sweep report ({report.split} split, mean ± std over seeds)")
    table.add_column("run")
    table.add_column("status")
    table.add_column("seeds", justify="right")
    for task, metric in report.columns:
        table.add_column(f"{task} {metric}", justify="right")
    table.add_column("Δm%", justify="right")
    for row in report.rows:
        if row["status"] == "failed":
            table.add_row(row["run"], f"[red]failed[/red]: {row['error']}", "0", *[""] * len(report.columns), "")
        else:
            table.add_row(row["run"], "ok", str(row["seeds"]), *[_cell(row, c) for c in report.columns], row["delta_m_text"])
    return table


def report_markdown(report: Report) -> str:
    head = ["run", "status", "seeds", *[f"{t} {m}" for t, m in report.columns], "Δm%"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report.rows:
        status = f"failed: {row['error']}" if row["status"] == "failed" else "ok"
        cells = [row["run"], status, str(row["seeds"]), *[_cell(row, c) for c in report.columns], row["delta_m_text"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    text = "\n".join(lines) + "\n"
    if report.notes:
        text += "\n" + "\n".join(f"- {n}" for n in report.notes) + "\n"
    return text


def report_csv(report: Report) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    head = ["run", "status", "error", "seeds"]
    for t, m in report.columns:
        head += [f"{report.split}/{t}/{m}/mean", f"{report.split}/{t}/{m}/std", f"{report.split}/{t}/{m}/n"]
    head += ["delta_m_pct", "baseline", "path"]
    writer.writerow(head)
    for row in report.rows:
        values: list[Any] = [row["run"], row["status"], row["error"], row["seeds"]]
        for col in report.columns:
            values += list(row["cells"][col]) if col in row["cells"] else ["", "", ""]
        values += ["" if row["delta_m"] is None else row["delta_m"], row["baseline"], row["path"]]
        writer.writerow(values)
    return buf.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    """``mtl-report <dirs...> [--split test] [--metrics acc,f1] [--out PREFIX]``."""
    parser = argparse.ArgumentParser(
        prog="mtl-report",
        description="One table of every run under the given sweep or run directories: mean ± std "
        "over seeds per task and metric, and Δm%% against single-task baselines.",
    )
    parser.add_argument("dirs", nargs="+", type=Path, help="sweep or run directories")
    parser.add_argument("--split", default=DEFAULT_SPLIT, choices=("val", "test"),
                        help=f"split of the metrics (default: {DEFAULT_SPLIT}, as in mtl-plot)")
    parser.add_argument("--metrics", default=None, help="comma-separated metric names (default: all but loss)")
    parser.add_argument(
        "--out", type=Path, default=None,
        help="write <out>.csv and <out>.md (default: <first dir>/report.csv and report.md)",
    )
    args = parser.parse_args(argv)
    metrics = [m for m in args.metrics.split(",") if m] if args.metrics else None
    try:
        report = build_report(args.dirs, split=args.split, metrics=metrics)
    except FileNotFoundError as err:
        parser.error(str(err))
    if not report.rows:
        parser.error(f"no runs (results.json or .hydra/) under {', '.join(map(str, args.dirs))}")
    console = Console(width=max(140, 40 + 22 * len(report.columns)))
    console.print(report_table(report))
    for note in report.notes:
        console.print(f"note: {note}", highlight=False)
    prefix = args.out or (args.dirs[0] / "report")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = prefix.with_name(prefix.name + ".csv"), prefix.with_name(prefix.name + ".md")
    csv_path.write_text(report_csv(report))
    md_path.write_text(report_markdown(report))
    console.print(f"Wrote {csv_path} and {md_path}", highlight=False)
    return 1 if all(r["status"] == "failed" for r in report.rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
