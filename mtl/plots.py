"""Plots of runs and sweeps as PNG files (matplotlib, imported lazily, Agg backend).

``mtl-plot <run_or_sweep_dir> [--tasks a b] [--metric acc] [--split test]`` writes, for every run
under the directory, into ``<run>/plots/``:

* ``<stage>_curves.png``: per task, train and val loss and the val metrics over epochs;
* ``<stage>_weights.png``: the weight each task's loss effectively has in the stage's objective,
  over epochs: the balancer's weight (``train/weight/<task>``) times the task's static weight,
  and, in a combined stage, times the alpha mix, ``alpha / |S|`` for a source task and
  ``(1 - alpha) / |T|`` for a target (alpha per epoch from ``train/alpha``), see
  :func:`effective_weights`;
* ``<stage>_cosine.png``: the task-gradient cosine matrix of the last epoch (``train/cos/<a>/<b>``,
  logged by gradient aggregators);

and, for a directory holding several runs, ``<dir>/plots/pareto_<a>_<b>.png``: every run's final
metric of two tasks on ``--split`` (default ``test``, the split ``mtl-report`` shows: the best
checkpoint is chosen on val), with the Pareto front (the runs no other run beats on both)
highlighted. Runs are labelled by the command-line overrides that differ between the jobs
(``balancer=pcgrad seed=1``, from ``.hydra/overrides.yaml``), else by their directory name.

Curves and weights mark, as vertical lines, the epoch of the stage's best checkpoint
(``best_epoch`` of its ``result.json``) and the epochs at which its fine-tuning policy unfreezes a
backbone block (the policy is rebuilt from ``stages/<stage>/fingerprint.json`` and asked, see
:func:`unfreeze_epochs`).

Everything is read from ``<run>/stages/<stage>/`` (``metrics.csv``, ``result.json``,
``fingerprint.json``) and ``<run>/results.json``.

``--predictions N`` also writes, for every stage with dense tasks (segmentation, depth, normal),
``<run>/plots/<stage>_predictions.png``: ``N`` images of ``--predictions-split`` (``test``) with the
true and the predicted segmentation, depth and normals of the stage's best checkpoint. It rebuilds
the data and the model from the config stored in ``results.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from mtl.report import DEFAULT_SPLIT, Run, find_runs
from mtl.results import higher_is_better, task_metrics
from mtl.transfer.alpha import AlphaSchedule, mixing_weights

Points = list[tuple[float, float]]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------- reading
def read_metrics(path: str | Path) -> dict[str, Points]:
    """``{column: [(epoch, value), ...]}`` from a Lightning ``metrics.csv``, one point per epoch.

    CSVLogger writes train and val values on separate rows; empty cells are skipped and several
    rows of one epoch are averaged (per-step columns become per-epoch means).
    """
    sums: dict[str, dict[float, list[float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            epoch = row.get("epoch")
            if epoch in (None, ""):
                continue
            for key, value in row.items():
                if key in ("epoch", "step") or value in (None, ""):
                    continue
                try:
                    v = float(value)
                except ValueError:
                    continue
                sums.setdefault(key, {}).setdefault(float(epoch), []).append(v)
    return {k: sorted((e, sum(v) / len(v)) for e, v in per.items()) for k, per in sums.items()}


def _tasks_in(columns: Sequence[str]) -> list[str]:
    tasks: list[str] = []
    for c in columns:
        parts = c.split("/")
        if len(parts) == 3 and parts[0] in ("train", "val") and parts[1] not in ("weight", "cos", "grad_norm"):
            if parts[1] not in tasks:
                tasks.append(parts[1])
    return tasks


def _last_train_epoch(metrics: Mapping[str, Points]) -> float:
    """The last epoch with a training value (the runner re-validates the best checkpoint after fit,
    logged one epoch past it; those points are not part of the curves)."""
    epochs = [e for c, pts in metrics.items() if c.startswith("train/") for e, _ in pts]
    return max(epochs) if epochs else math.inf


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; {} when it is missing or unreadable (plots never fail on it)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


@dataclass
class StageInfo:
    """What a stage directory records about the stage, as the plots need it.

    Attributes:
        targets, sources: the stage's target and source tasks (sources: a combined stage).
        task_weights: ``{task: Task.weight}`` from the data config (1.0 where not set).
        alpha: the stage's alpha schedule (combined stages), for runs that did not log ``train/alpha``.
        max_epochs: the stage's ``max_epochs`` (the alpha schedule's horizon).
        balancer: the stage's balancer config node (``{"method": ..., "engine": ...}``), None when
            the stage ran the static sum, ``"unknown"`` when nothing records it.
        policy: the fine-tuning policy's config node (None: everything trains).
        best_epoch: the epoch of the best checkpoint (None until the stage finished).
        checkpoint: the best (else last) checkpoint file, when present.
    """

    targets: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    task_weights: dict[str, float] = field(default_factory=dict)
    alpha: AlphaSchedule | None = None
    max_epochs: int | None = None
    balancer: Any = "unknown"
    policy: Any = None
    best_epoch: int | None = None
    checkpoint: Path | None = None


def _find_task_weights(data: Any, out: dict[str, float]) -> None:
    """Collect ``tasks: {name: {weight: w}}`` nodes anywhere in a data config (combined data nests)."""
    if isinstance(data, Mapping):
        tasks = data.get("tasks")
        if isinstance(tasks, Mapping):
            for name, spec in tasks.items():
                if isinstance(spec, Mapping) and spec.get("weight") is not None:
                    out.setdefault(str(name), float(spec["weight"]))
        for value in data.values():
            _find_task_weights(value, out)
    elif isinstance(data, (list, tuple)):
        for value in data:
            _find_task_weights(value, out)


def read_stage_info(run_dir: str | Path, stage: str) -> StageInfo:
    """The :class:`StageInfo` of ``<run_dir>/stages/<stage>``.

    Read from the stage's ``fingerprint.json`` (written before it trains: roles, alpha, policy,
    balancer, data config), its ``result.json`` (written when it finished: roles, ``best_epoch``)
    and, for what these lack, the run's ``results.json`` (its stage result and the config's
    ``schedule.stages.<stage>``). Missing files leave the defaults of :class:`StageInfo`.
    """
    run_dir = Path(run_dir)
    stage_dir = run_dir / "stages" / stage
    fingerprint = _read_json(stage_dir / "fingerprint.json")
    run_results = _read_json(run_dir / "results.json")
    result = _read_json(stage_dir / "result.json") or ((run_results.get("stages") or {}).get(stage) or {})
    config = run_results.get("config") or {}
    node = fingerprint.get("stage") or (((config.get("schedule") or {}).get("stages") or {}).get(stage) or {})
    info = StageInfo()
    targets = result.get("target_tasks") or node.get("tasks") or []
    info.targets = [str(t) for t in targets] if isinstance(targets, (list, tuple)) else []
    sources = result.get("source_tasks") or node.get("source_tasks") or []
    info.sources = [str(s) for s in sources] if isinstance(sources, (list, tuple)) else []
    _find_task_weights(fingerprint.get("data") or config.get("data"), info.task_weights)
    if "alpha" in node:
        try:
            info.alpha = AlphaSchedule(float(node["alpha"]), node.get("alpha_end"), node.get("alpha_schedule") or "constant")
        except (TypeError, ValueError):
            info.alpha = None
    max_epochs = node.get("max_epochs") or (config.get("trainer") or {}).get("max_epochs")
    info.max_epochs = int(max_epochs) if max_epochs else None
    if "balancer" in fingerprint.get("stage", {}):
        info.balancer = fingerprint["stage"]["balancer"]
    info.policy = node.get("policy")
    best = result.get("best_epoch")
    info.best_epoch = int(best) if best is not None else None
    for name in ("best.ckpt", "last.ckpt"):
        path = stage_dir / "checkpoints" / name
        if path.is_file():
            info.checkpoint = path
            break
    return info


# ---------------------------------------------------------------------------------------- effective weights
def effective_weights(
    metrics: Mapping[str, Points],
    targets: Sequence[str],
    sources: Sequence[str] = (),
    task_weights: Mapping[str, float] | None = None,
    alpha: Callable[[int], float] | None = None,
    balancer_weights: bool = True,
) -> dict[str, Points]:
    """``{task: [(epoch, weight)]}``: the weight of each task's loss in the stage's objective.

    The module minimises ``sum_t b_t(e) * m_t(alpha(e)) * L_t`` at epoch ``e``, where ``b_t`` is the
    balancer's weight of the statically weighted loss (``train/weight/<t>``, the epoch's mean) and
    ``m_t`` the static weight of :func:`mtl.transfer.alpha.mixing_weights`: ``w_t`` (``Task.weight``)
    without sources; in a combined stage ``(1 - alpha) * w_t / |T|`` for a target and
    ``alpha * w_s / |S|`` for a source. The weight plotted is ``b_t(e) * m_t(alpha(e))``.

    Args:
        metrics: the stage's :func:`read_metrics`.
        targets, sources: the stage's task roles.
        task_weights: ``{task: w_t}`` (1.0 for a task not in it).
        alpha: ``epoch -> alpha`` for epochs without a logged ``train/alpha`` (combined stages).
        balancer_weights: False when the stage has no balancer (the static sum, ``b_t = 1``): the
            epochs are then those of ``train/alpha`` or ``train/loss``.

    Returns:
        one entry per task of the stage that has a weight at some epoch; {} when the balancer
        logged no weights and ``balancer_weights`` is True.

    Raises:
        ValueError: a combined stage's epoch has neither a logged ``train/alpha`` nor ``alpha``.
    """
    tasks = list(targets) + [s for s in sources if s not in targets]
    static = {t: float((task_weights or {}).get(t, 1.0)) for t in tasks}
    logged_alpha = dict(metrics.get("train/alpha", []))
    if balancer_weights:
        per_task = {t: dict(metrics.get(f"train/weight/{t}", [])) for t in tasks}
    else:
        epochs = [e for e, _ in metrics.get("train/alpha") or metrics.get("train/loss") or []]
        per_task = {t: {e: 1.0 for e in epochs} for t in tasks}
    out: dict[str, Points] = {}
    for t in tasks:
        for epoch, b in sorted(per_task[t].items()):
            a = 0.5
            if sources:
                if epoch in logged_alpha:
                    a = logged_alpha[epoch]
                elif alpha is not None:
                    a = alpha(int(epoch))
                else:
                    raise ValueError(
                        f"effective_weights: epoch {epoch:g} of a combined stage has no train/alpha and no alpha schedule was given."
                    )
            mix = mixing_weights(static, list(targets), list(sources), a)
            out.setdefault(t, []).append((epoch, b * mix[t]))
    return out


def stage_effective_weights(metrics: Mapping[str, Points], info: StageInfo) -> tuple[dict[str, Points], str]:
    """``(weights, what)`` for the weights plot of a stage: :func:`effective_weights` where the
    stage's roles are known, else the balancer's own weights; ``what`` names what is plotted."""
    logged = sorted(c for c in metrics if c.startswith("train/weight/"))
    tasks = info.targets + [s for s in info.sources if s not in info.targets]
    if not tasks or any(c.split("/", 2)[2] not in tasks for c in logged):
        # roles unknown (no fingerprint.json or result.json): only the balancer's own weights
        what = "balancer weight (alpha mix unknown)" if "train/alpha" in metrics else "balancer weight"
        return {c.split("/", 2)[2]: list(metrics[c]) for c in logged}, what
    static_sum = info.balancer is None or (isinstance(info.balancer, Mapping) and info.balancer.get("method") is None)
    if not logged and not (static_sum and info.sources):
        # an aggregator that exposes no weights (GradDrop, MoCo...), or a plain static sum whose
        # weights never change: nothing worth plotting
        return {}, ""
    alpha = None
    if info.alpha is not None:
        schedule, horizon = info.alpha, info.max_epochs
        alpha = lambda e: schedule.at(e, horizon)  # noqa: E731
    weights = effective_weights(metrics, info.targets, info.sources, info.task_weights, alpha, balancer_weights=bool(logged))
    if info.sources:
        return weights, "effective weight (balancer x alpha mix)"
    return weights, "effective weight (balancer x task weight)"


# ---------------------------------------------------------------------------------------- epoch markers
def unfreeze_epochs(policy: Any, num_epochs: int, num_blocks: int) -> list[int]:
    """The epochs at which ``policy`` unfreezes a backbone block: some block has a learning-rate
    multiplier of 0 at epoch ``e - 1`` and a positive one at ``e`` (``0 < e < num_epochs``).

    Asks the policy (:meth:`~mtl.transfer.policies.FineTunePolicy.frozen_blocks`) rather than
    re-deriving its rule. ``ProbeThenFull(probe_epochs=40)`` gives ``[40]`` (with 40 < num_epochs);
    ``GradualUnfreeze()`` with 3 blocks ``[1, 2]`` (the top block trains from epoch 0).
    """
    if policy is None or num_blocks < 1:
        return []
    epochs = []
    before = policy.frozen_blocks(0, num_blocks)
    for epoch in range(1, int(num_epochs)):
        now = policy.frozen_blocks(epoch, num_blocks)
        if any(was and not is_ for was, is_ in zip(before, now)):
            epochs.append(epoch)
        before = now
    return epochs


_BLOCK_KEY = re.compile(r"(?:^|\.)backbone\.stages\.(\d+)\.")


def count_backbone_blocks(keys: Sequence[str]) -> int | None:
    """The number of backbone blocks (``backbone.stages.<i>``) named by state-dict keys, or None."""
    found = [int(m.group(1)) for k in keys for m in [_BLOCK_KEY.search(k)] if m]
    return max(found) + 1 if found else None


def _checkpoint_keys(path: Path) -> list[str]:
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - a damaged or foreign checkpoint only loses the markers
        return []
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {}
    return [str(k) for k in state]


def stage_markers(info: StageInfo, num_epochs: int) -> dict[str, list[int]]:
    """``{"best": [epoch], "unfreeze": [epochs]}`` of a stage (empty lists when unknown).

    The best epoch is the stage's recorded ``best_epoch`` (the epoch of its best checkpoint, as
    logged in ``metrics.csv``). Unfreeze epochs come from :func:`unfreeze_epochs` on the stage's
    policy, rebuilt from its config node; the number of backbone blocks is read from the stage's
    checkpoint (one block when there is none: only the first unfreezing of a gradual policy shows).
    """
    markers: dict[str, list[int]] = {"best": [], "unfreeze": []}
    if info.best_epoch is not None:
        markers["best"].append(info.best_epoch)
    if isinstance(info.policy, Mapping) and "_target_" in info.policy:
        from mtl.schedule.parts import build_policy

        try:
            policy = build_policy(dict(info.policy), "schedule.stages.<stage>.policy")
        except (ValueError, TypeError, ImportError):
            policy = None
        if policy is not None:
            blocks = count_backbone_blocks(_checkpoint_keys(info.checkpoint)) if info.checkpoint else None
            markers["unfreeze"] = unfreeze_epochs(policy, num_epochs, blocks or 1)
    return markers


_MARKER_STYLE = {"best": ("tab:green", "--", "best epoch"), "unfreeze": ("tab:purple", ":", "unfreeze")}


def _draw_markers(ax: Any, markers: Mapping[str, Sequence[float]] | None) -> None:
    """Vertical lines at the marked epochs, one legend entry per kind."""
    for kind, epochs in (markers or {}).items():
        colour, style, name = _MARKER_STYLE.get(kind, ("gray", "-.", kind))
        for i, epoch in enumerate(epochs):
            label = f"{name} ({', '.join(f'{e:g}' for e in epochs)})" if i == 0 else None
            ax.axvline(epoch, color=colour, linestyle=style, linewidth=1.2, label=label)


# ---------------------------------------------------------------------------------------- per stage
def plot_learning_curves(
    metrics: dict[str, Points], out: Path, title: str = "", markers: Mapping[str, Sequence[float]] | None = None
) -> Path | None:
    """Per task: train/val loss (left) and val metrics (right) against the epoch; ``markers``
    (:func:`stage_markers`) are drawn as vertical lines."""
    tasks = _tasks_in(list(metrics))
    if not tasks:
        return None
    last = _last_train_epoch(metrics)
    metrics = {c: [(e, v) for e, v in pts if e <= last] for c, pts in metrics.items()}
    plt = _plt()
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 2.8 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        ax_loss, ax_metric = axes[row]
        for split in ("train", "val"):
            points = metrics.get(f"{split}/{task}/loss")
            if points:
                ax_loss.plot(*zip(*points), marker="o", ms=3, label=f"{split} loss")
        names = sorted({c.split("/")[2] for c in metrics if c.startswith(f"val/{task}/") and not c.endswith("/loss")})
        for name in names:
            if metrics[f"val/{task}/{name}"]:
                ax_metric.plot(*zip(*metrics[f"val/{task}/{name}"]), marker="o", ms=3, label=f"val {name}")
        ax_loss.set_title(f"{task}: loss")
        ax_metric.set_title(f"{task}: val metrics")
        for ax in (ax_loss, ax_metric):
            _draw_markers(ax, markers)
            ax.set_xlabel("epoch")
            if ax.lines:
                ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out)


def plot_task_weights(
    weights: Mapping[str, Points],
    out: Path,
    title: str = "",
    markers: Mapping[str, Sequence[float]] | None = None,
    ylabel: str = "effective weight",
    roles: Mapping[str, str] | None = None,
) -> Path | None:
    """Each task's weight (``{task: [(epoch, weight)]}``, :func:`stage_effective_weights`) against
    the epoch, with ``markers`` as vertical lines; ``roles`` (``{task: "source"}``) go in the legend.
    Line styles differ from task to task so that equal weights (two sources) stay visible."""
    weights = {t: pts for t, pts in weights.items() if pts}
    if not weights:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    styles = ("-", "--", "-.", ":")
    for i, (task, points) in enumerate(weights.items()):
        role = (roles or {}).get(task)
        ax.plot(*zip(*points), marker="o", ms=max(2.0, 4.0 - i), linestyle=styles[i % len(styles)],
                label=f"{task} ({role})" if role else task)
    _draw_markers(ax, markers)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "task weights")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)


def cosine_matrix(metrics: dict[str, Points]) -> tuple[list[str], list[list[float]]] | None:
    """``(tasks, matrix)`` of the last epoch's pairwise task-gradient cosines (1 on the diagonal)."""
    pairs = {}
    for c, points in metrics.items():
        parts = c.split("/")
        if len(parts) == 4 and parts[:2] == ["train", "cos"] and points:
            pairs[(parts[2], parts[3])] = points[-1][1]
    if not pairs:
        return None
    tasks: list[str] = []
    for a, b in pairs:
        for t in (a, b):
            if t not in tasks:
                tasks.append(t)
    index = {t: i for i, t in enumerate(tasks)}
    matrix = [[1.0 if i == j else math.nan for j in range(len(tasks))] for i in range(len(tasks))]
    for (a, b), v in pairs.items():
        matrix[index[a]][index[b]] = matrix[index[b]][index[a]] = v
    return tasks, matrix


def relative_luminance(rgb: Sequence[float]) -> float:
    """WCAG 2 relative luminance of an sRGB colour ``(r, g, b)`` in ``[0, 1]`` (alpha ignored):
    ``0.2126 R + 0.7152 G + 0.0722 B`` of the linearised channels; 0 for black, 1 for white."""
    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(float(c)) for c in rgb[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def text_colour(rgb: Sequence[float]) -> str:
    """``"black"`` on a light cell, ``"white"`` on a dark one: whichever contrasts more (WCAG
    contrast ratio), i.e. black when the cell's :func:`relative_luminance` exceeds ~0.179."""
    lum = relative_luminance(rgb)
    return "black" if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else "white"


def plot_cosine_heatmap(metrics: dict[str, Points], out: Path, title: str = "") -> Path | None:
    """Heatmap of the task-gradient cosines at the last epoch (``train/cos/<a>/<b>``); each value
    is written in the colour that reads best on its cell (:func:`text_colour`)."""
    found = cosine_matrix(metrics)
    if found is None:
        return None
    tasks, matrix = found
    plt = _plt()
    n = len(tasks)
    cell = 1.2 if n <= 6 else 0.9  # inches; 10 tasks stay under 12 inches wide
    fig, ax = plt.subplots(figsize=(cell * n + 2.5, cell * n + 1.5))
    cmap = plt.get_cmap("RdBu_r")
    image = ax.imshow(matrix, vmin=-1, vmax=1, cmap=cmap)
    ax.set_xticks(range(n), tasks, rotation=45, ha="right")
    ax.set_yticks(range(n), tasks)
    fontsize = 9 if n <= 6 else 8
    for i in range(n):
        for j in range(n):
            v = matrix[i][j]
            if not math.isnan(v):
                colour = text_colour(cmap((v + 1.0) / 2.0))
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=fontsize, color=colour)
    fig.colorbar(image, ax=ax, label="cosine")
    ax.set_title(title or "task-gradient cosine (last epoch)")
    fig.tight_layout()
    return _save(fig, out)


def plot_run(run_dir: str | Path, label: str | None = None) -> list[Path]:
    """Every per-stage plot of one run into ``<run>/plots/``; returns the files written.

    ``label`` names the run in the titles (default: its directory name).
    """
    run_dir = Path(run_dir)
    label = label or run_dir.name
    written: list[Path] = []
    for csv_path in sorted((run_dir / "stages").glob("*/metrics.csv")):
        stage = csv_path.parent.name
        metrics = read_metrics(csv_path)
        info = read_stage_info(run_dir, stage)
        last = _last_train_epoch(metrics)
        num_epochs = int(last) + 1 if math.isfinite(last) else 0
        markers = stage_markers(info, num_epochs)
        out = run_dir / "plots"
        title = f"{label} / {stage}"
        paths = [plot_learning_curves(metrics, out / f"{stage}_curves.png", title=title, markers=markers)]
        weights, what = stage_effective_weights(metrics, info)
        roles = {t: "source" for t in info.sources} | {t: "target" for t in info.targets} if info.sources else None
        paths.append(plot_task_weights(weights, out / f"{stage}_weights.png", title=title, markers=markers, ylabel=what, roles=roles))
        paths.append(plot_cosine_heatmap(metrics, out / f"{stage}_cosine.png", title=title))
        written += [p for p in paths if p is not None]
    return written


# ---------------------------------------------------------------------------------------- sweeps
def run_labels(runs: Sequence[Run]) -> list[str]:
    """A label per run: its overrides that not every run shares (``balancer=pcgrad seed=1``).

    A run without ``.hydra/overrides.yaml``, or whose overrides are those of every run, is labelled
    by its directory name; a label two runs would share gets the directory name appended.
    """
    with_overrides = [r.overrides for r in runs if r.overrides is not None]
    common = set.intersection(*(set(o) for o in with_overrides)) if with_overrides else set()
    labels = []
    for run in runs:
        varying = [o for o in run.overrides or [] if o not in common]
        labels.append(" ".join(varying) if varying else run.path.name)
    counts = {label: labels.count(label) for label in labels}
    return [
        f"{label} ({run.path.name})" if counts[label] > 1 and label != run.path.name else label
        for label, run in zip(labels, runs)
    ]


def pareto_front(points: Sequence[tuple[float, float]], maximize: tuple[bool, bool] = (True, True)) -> list[int]:
    """Indices of the points no other point dominates (at least as good on both, better on one)."""
    sign = [1.0 if m else -1.0 for m in maximize]
    p = [(sign[0] * x, sign[1] * y) for x, y in points]
    front = []
    for i, (x, y) in enumerate(p):
        dominated = any(
            (x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(p) if j != i
        )
        if not dominated:
            front.append(i)
    return front


@dataclass
class ParetoData:
    """The points of a Pareto plot: ``points[i]`` is run ``labels[i]``'s (task a, task b) metric."""

    tasks: tuple[str, str]
    metrics: tuple[str, str]
    maximize: tuple[bool, bool]
    points: list[tuple[float, float]]
    labels: list[str]
    split: str


def pareto_data(
    runs: Sequence[Run], tasks: Sequence[str] | None = None, metric: str | None = None, split: str = DEFAULT_SPLIT
) -> ParetoData | None:
    """Every successful run's final ``split`` metric of two tasks (default: the first two tasks
    found, each task's primary metric), labelled by :func:`run_labels`; None with fewer than two."""
    ok = [r for r in runs if r.ok]
    labels_of = dict(zip((r.path for r in ok), run_labels(ok)))
    per_run = [(r, task_metrics(r.results, split)) for r in ok]
    if tasks is None:
        seen: list[str] = []
        for _, tm in per_run:
            for t in tm:
                if t not in seen:
                    seen.append(t)
        tasks = seen[:2]
    if len(tasks) != 2:
        return None
    a, b = tasks
    points, labels, names = [], [], None
    for run, tm in per_run:
        ma = _pick_metric(tm.get(a, {}), metric)
        mb = _pick_metric(tm.get(b, {}), metric)
        if ma is None or mb is None:
            continue
        points.append((tm[a][ma], tm[b][mb]))
        labels.append(labels_of[run.path])
        names = (ma, mb)
    if len(points) < 2 or names is None:
        return None
    first = per_run[0][0].results
    maximize = (higher_is_better(first, a, names[0]), higher_is_better(first, b, names[1]))
    return ParetoData((a, b), names, maximize, points, labels, split)


def plot_pareto(
    sweep_dir: str | Path,
    tasks: Sequence[str] | None = None,
    metric: str | None = None,
    split: str = DEFAULT_SPLIT,
    out: Path | None = None,
) -> Path | None:
    """Scatter of two tasks' final metric over every run under ``sweep_dir``, Pareto front joined
    and its runs labelled by their overrides (:func:`pareto_data`)."""
    data = pareto_data(find_runs([sweep_dir]), tasks, metric, split)
    if data is None:
        return None
    (a, b), names, points = data.tasks, data.metrics, data.points
    front = pareto_front(points, data.maximize)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.scatter(*zip(*points), c="lightgray", edgecolors="gray", label="runs")
    fp = sorted((points[i] for i in front), key=lambda p: p[0])
    ax.plot(*zip(*fp), "o-", color="tab:red", label="Pareto front")
    middle = (min(p[0] for p in points) + max(p[0] for p in points)) / 2
    for i in front:  # labels point inwards, so that none leaves the axes
        right_half = points[i][0] > middle
        ax.annotate(data.labels[i], points[i], textcoords="offset points", xytext=(-4 if right_half else 4, 4),
                    ha="right" if right_half else "left", fontsize=8)
    ax.set_xlabel(f"{a} {split} {names[0]}")
    ax.set_ylabel(f"{b} {split} {names[1]}")
    ax.set_title(f"{Path(sweep_dir).name}: {len(points)} runs, {len(front)} on the front")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = out or Path(sweep_dir) / "plots" / f"pareto_{a}_{b}.png"
    return _save(fig, out)


def _pick_metric(metrics: dict[str, float], wanted: str | None) -> str | None:
    if wanted:
        return wanted if wanted in metrics else None
    for name in ("acc", "auroc", "mae", "rmse", "f1"):
        if name in metrics:
            return name
    rest = [m for m in metrics if m != "loss"]
    return rest[0] if rest else None


# ---------------------------------------------------------------------------------------- dense predictions
#: Colours of segmentation classes (tab10, then repeated); unlabelled pixels are black.
_UNLABELLED = (0.0, 0.0, 0.0)


def _class_colours(labels, num_classes: int, ignore_index: int):
    import numpy as np

    plt = _plt()
    palette = np.array([plt.get_cmap("tab20")(i % 20)[:3] for i in range(num_classes)])
    rgb = palette[np.clip(labels, 0, num_classes - 1)]
    rgb[labels == ignore_index] = _UNLABELLED
    return rgb


def _normal_colours(normals, mask=None):
    """``[3, H, W]`` unit vectors -> ``[H, W, 3]`` RGB ``(n + 1) / 2`` (black where unlabelled)."""
    import numpy as np

    n = np.asarray(normals, dtype=np.float64)
    norm = np.linalg.norm(n, axis=0, keepdims=True)
    rgb = np.moveaxis((n / np.maximum(norm, 1e-12) + 1.0) / 2.0, 0, -1)
    if mask is not None:
        rgb[~mask] = _UNLABELLED
    return np.clip(rgb, 0.0, 1.0)


def _image_colours(image):
    import numpy as np

    x = np.moveaxis(np.asarray(image, dtype=np.float64), 0, -1)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def plot_dense_predictions(
    images: Any,
    targets: dict[str, Any],
    outputs: dict[str, Any],
    tasks: dict[str, Any],
    out: Path,
    title: str = "",
) -> Path | None:
    """A grid: one row per image, its RGB input, then true and predicted maps of each dense task.

    Args:
        images: ``[N, C, H, W]`` inputs (shown min-max scaled).
        targets: ``{task: [N, H, W] classes | [N, 1, H, W] depth | [N, 3, H, W] normals}``.
        outputs: the model's outputs ``{task: [N, C, H, W]}`` (segmentation logits, depth, normals).
        tasks: ``{name: Task}``; tasks that are not segmentation, depth or normal are left out.
        out: the PNG to write.
    Returns:
        ``out``, or None when no task is dense.

    Unlabelled pixels are black in the true maps; depth rows share one colour scale (the true
    depth's range) between truth and prediction.
    """
    import numpy as np

    names = [t for t in outputs if tasks[t].kind in ("segmentation", "depth", "normal") and t in targets]
    if not names:
        return None
    images = images.detach().cpu().float().numpy()
    n = images.shape[0]
    plt = _plt()
    cols = 1 + 2 * len(names)
    fig, axes = plt.subplots(n, cols, figsize=(1.9 * cols, 1.9 * n + 0.4), squeeze=False)
    for i in range(n):
        axes[i][0].imshow(_image_colours(images[i]))
        col = 1
        for t in names:
            task = tasks[t]
            y = targets[t][i].detach().cpu()
            o = outputs[t][i].detach().cpu().float()
            if task.kind == "segmentation":
                true = _class_colours(y.numpy(), task.num_classes, task.ignore_index)
                pred = _class_colours(o.argmax(0).numpy(), task.num_classes, task.ignore_index)
                axes[i][col].imshow(true)
                axes[i][col + 1].imshow(pred)
            elif task.kind == "depth":
                d = (y[0] if y.dim() == 3 else y).float().numpy()
                mask = np.isfinite(d) & (d != 0)
                lo, hi = (float(d[mask].min()), float(d[mask].max())) if mask.any() else (0.0, 1.0)
                axes[i][col].imshow(np.ma.masked_where(~mask, d), cmap="viridis", vmin=lo, vmax=hi)
                axes[i][col + 1].imshow(o[0].numpy(), cmap="viridis", vmin=lo, vmax=hi)
            else:
                yn = y.float().numpy()
                mask = np.isfinite(yn).all(0) & (yn != 0).any(0)
                axes[i][col].imshow(_normal_colours(np.nan_to_num(yn), mask))
                axes[i][col + 1].imshow(_normal_colours(o.numpy()))
            if i == 0:
                axes[0][col].set_title(f"{t}: true", fontsize=8)
                axes[0][col + 1].set_title(f"{t}: predicted", fontsize=8)
            col += 2
    axes[0][0].set_title("input", fontsize=8)
    for row in axes:
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def plot_run_predictions(run_dir: str | Path, num_images: int = 4, split: str = "test") -> list[Path]:
    """``<run>/plots/<stage>_predictions.png`` for every stage of the run with dense tasks.

    The data and the model are rebuilt from the config in ``<run>/results.json`` and the stage's
    best checkpoint; ``num_images`` examples of ``split`` are predicted.
    """
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from mtl.results import read_json
    from mtl.train import build_model
    from mtl.transfer.loading import load_weights

    run_dir = Path(run_dir)
    path = run_dir / "results.json"
    if not path.is_file():
        return []
    results = read_json(path)
    config = results.get("config")
    if not config or not results.get("stages"):
        return []
    cfg = OmegaConf.create(config)
    datamodule = None
    written: list[Path] = []
    for stage, r in results["stages"].items():
        ckpt = r.get("best_checkpoint")
        if not ckpt:
            continue
        ckpt = Path(ckpt) if Path(ckpt).is_absolute() else run_dir / ckpt  # results keep it relative to the run
        if not ckpt.is_file():
            continue
        if datamodule is None:
            datamodule = instantiate(cfg.data, _convert_="all")
            datamodule.setup()
        used = [t for t in r.get("tasks", {}) if t in datamodule.tasks]
        dense = [t for t in used if datamodule.tasks[t].kind in ("segmentation", "depth", "normal")]
        if not dense:
            continue
        model = build_model(cfg, datamodule)({t: datamodule.tasks[t] for t in used})
        load_weights(model, ckpt)
        model.eval()
        datamodule.select_tasks(dense)
        loader = getattr(datamodule, f"{split}_dataloader")()
        xs, ys = [], {t: [] for t in dense}
        for x, y in loader:
            xs.append(x)
            for t in dense:
                ys[t].append(y[t])
            if sum(len(b) for b in xs) >= num_images:
                break
        x = torch.cat(xs)[:num_images]
        targets = {t: torch.cat(v)[:num_images] for t, v in ys.items()}
        with torch.no_grad():
            outputs = model(x, dense)
        out = plot_dense_predictions(
            x, targets, outputs, datamodule.tasks, run_dir / "plots" / f"{stage}_predictions.png",
            title=f"{run_dir.name} / {stage}: {split} images, best checkpoint",
        )
        if out is not None:
            written.append(out)
    return written


def _save(fig: Any, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    _plt().close(fig)
    return out


def plot_dir(
    path: str | Path,
    tasks: Sequence[str] | None = None,
    metric: str | None = None,
    split: str = DEFAULT_SPLIT,
    predictions: int = 0,
    predictions_split: str = "test",
) -> list[Path]:
    """Per-run plots of every run under ``path`` and, for several runs, the Pareto front; with
    ``predictions > 0`` also that many dense predictions per stage (:func:`plot_run_predictions`).
    Runs are titled by :func:`run_labels`."""
    path = Path(path)
    written: list[Path] = []
    runs = find_runs([path])
    labelled = list(zip((r.path for r in runs), run_labels(runs) if len(runs) > 1 else [r.path.name for r in runs]))
    if (path / "stages").is_dir() and path.resolve() not in [p for p, _ in labelled]:
        labelled.insert(0, (path, path.name))  # a run directory without results.json or .hydra/ (library use)
    for run_dir, label in labelled:
        written += plot_run(run_dir, label)
        if predictions > 0:
            written += plot_run_predictions(run_dir, predictions, predictions_split)
    if sum(r.ok for r in runs) > 1:
        pareto = plot_pareto(path, tasks, metric, split)
        if pareto is not None:
            written.append(pareto)
    return written


def build_parser() -> argparse.ArgumentParser:
    """The ``mtl-plot`` command line."""
    parser = argparse.ArgumentParser(prog="mtl-plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="a run directory or a sweep directory")
    parser.add_argument("--tasks", nargs=2, default=None, help="the two tasks of the Pareto plot (default: the first two)")
    parser.add_argument("--metric", default=None, help="metric of the Pareto plot (default: the task's primary)")
    parser.add_argument("--split", default=DEFAULT_SPLIT, choices=("val", "test"),
                        help=f"split of the Pareto plot's metrics (default: {DEFAULT_SPLIT}, as in mtl-report)")
    parser.add_argument("--predictions", type=int, default=0, metavar="N",
                        help="also plot N images with true and predicted dense maps per stage")
    parser.add_argument("--predictions-split", default="test", choices=("val", "test"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.path.exists():
        parser.error(f"{args.path} does not exist")
    written = plot_dir(args.path, args.tasks, args.metric, args.split, args.predictions, args.predictions_split)
    if not written:
        parser.error(f"nothing to plot under {args.path} (no stages/*/metrics.csv: was logger=csv used?)")
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
