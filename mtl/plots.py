"""Plots of runs and sweeps as PNG files (matplotlib, imported lazily, Agg backend).

``mtl-plot <run_or_sweep_dir> [--tasks a b] [--metric acc] [--split val]`` writes, for every run
under the directory, into ``<run>/plots/``:

* ``<stage>_curves.png``: per task, train and val loss and the val metrics over epochs;
* ``<stage>_weights.png``: the balancer's task weights over epochs (``train/weight/<task>``);
* ``<stage>_cosine.png``: the task-gradient cosine matrix of the last epoch (``train/cos/<a>/<b>``,
  logged by gradient aggregators);

and, for a directory holding several runs, ``<dir>/plots/pareto_<a>_<b>.png``: every run's final
metric of two tasks, with the Pareto front (the runs no other run beats on both) highlighted.
Everything is read from ``<run>/stages/<stage>/metrics.csv`` and ``<run>/results.json``.

``--predictions N`` also writes, for every stage with dense tasks (segmentation, depth, normal),
``<run>/plots/<stage>_predictions.png``: ``N`` images of ``--predictions-split`` (``test``) with the
true and the predicted segmentation, depth and normals of the stage's best checkpoint. It rebuilds
the data and the model from the config stored in ``results.json``.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path
from typing import Any, Sequence

from mtl.report import find_runs
from mtl.results import higher_is_better, task_metrics


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------- reading
def read_metrics(path: str | Path) -> dict[str, list[tuple[float, float]]]:
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


# ---------------------------------------------------------------------------------------- per stage
def plot_learning_curves(metrics: dict[str, list[tuple[float, float]]], out: Path, title: str = "") -> Path | None:
    """Per task: train/val loss (left) and val metrics (right) against the epoch."""
    tasks = _tasks_in(list(metrics))
    if not tasks:
        return None
    # the runner re-validates the best checkpoint after fit, logged one epoch past the last one
    train_epochs = [e for c, pts in metrics.items() if c.startswith("train/") for e, _ in pts]
    last = max(train_epochs) if train_epochs else math.inf
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
            ax_metric.plot(*zip(*metrics[f"val/{task}/{name}"]), marker="o", ms=3, label=f"val {name}")
        ax_loss.set_title(f"{task}: loss")
        ax_metric.set_title(f"{task}: val metrics")
        for ax in (ax_loss, ax_metric):
            ax.set_xlabel("epoch")
            if ax.lines:
                ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out)


def plot_task_weights(metrics: dict[str, list[tuple[float, float]]], out: Path, title: str = "") -> Path | None:
    """The balancer's weight of each task (``train/weight/<task>``) against the epoch."""
    columns = sorted(c for c in metrics if c.startswith("train/weight/"))
    if not columns:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for c in columns:
        ax.plot(*zip(*metrics[c]), marker="o", ms=3, label=c.split("/", 2)[2])
    ax.set_xlabel("epoch")
    ax.set_ylabel("task weight")
    ax.set_title(title or "task weights")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)


def cosine_matrix(metrics: dict[str, list[tuple[float, float]]]) -> tuple[list[str], list[list[float]]] | None:
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


def plot_cosine_heatmap(metrics: dict[str, list[tuple[float, float]]], out: Path, title: str = "") -> Path | None:
    """Heatmap of the task-gradient cosines at the last epoch (``train/cos/<a>/<b>``)."""
    found = cosine_matrix(metrics)
    if found is None:
        return None
    tasks, matrix = found
    plt = _plt()
    n = len(tasks)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.2 * n + 1.5))
    image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(n), tasks, rotation=45, ha="right")
    ax.set_yticks(range(n), tasks)
    for i in range(n):
        for j in range(n):
            if not math.isnan(matrix[i][j]):
                ax.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", fontsize=9)
    fig.colorbar(image, ax=ax, label="cosine")
    ax.set_title(title or "task-gradient cosine (last epoch)")
    fig.tight_layout()
    return _save(fig, out)


def plot_run(run_dir: str | Path) -> list[Path]:
    """Every per-stage plot of one run into ``<run>/plots/``; returns the files written."""
    run_dir = Path(run_dir)
    written: list[Path] = []
    for csv_path in sorted((run_dir / "stages").glob("*/metrics.csv")):
        stage = csv_path.parent.name
        metrics = read_metrics(csv_path)
        out = run_dir / "plots"
        for fn, suffix in ((plot_learning_curves, "curves"), (plot_task_weights, "weights"), (plot_cosine_heatmap, "cosine")):
            path = fn(metrics, out / f"{stage}_{suffix}.png", title=f"{run_dir.name} / {stage}")
            if path is not None:
                written.append(path)
    return written


# ---------------------------------------------------------------------------------------- sweeps
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


def plot_pareto(
    sweep_dir: str | Path,
    tasks: Sequence[str] | None = None,
    metric: str | None = None,
    split: str = "val",
    out: Path | None = None,
) -> Path | None:
    """Scatter of two tasks' final metric over every run under ``sweep_dir``, Pareto front joined."""
    runs = [r for r in find_runs([sweep_dir]) if r.ok]
    per_run = [(r, task_metrics(r.results, split)) for r in runs]
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
    points, labels = [], []
    for run, tm in per_run:
        ma = _pick_metric(tm.get(a, {}), metric)
        mb = _pick_metric(tm.get(b, {}), metric)
        if ma is None or mb is None:
            continue
        points.append((tm[a][ma], tm[b][mb]))
        labels.append(run.path.name)
        names = (ma, mb)
    if len(points) < 2:
        return None
    first = per_run[0][0].results
    maximize = (higher_is_better(first, a, names[0]), higher_is_better(first, b, names[1]))
    front = pareto_front(points, maximize)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.scatter(*zip(*points), c="lightgray", edgecolors="gray", label="runs")
    fp = sorted((points[i] for i in front), key=lambda p: p[0])
    ax.plot(*zip(*fp), "o-", color="tab:red", label="Pareto front")
    for i in front:
        ax.annotate(labels[i], points[i], textcoords="offset points", xytext=(4, 4), fontsize=8)
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
    split: str = "val",
    predictions: int = 0,
    predictions_split: str = "test",
) -> list[Path]:
    """Per-run plots of every run under ``path`` and, for several runs, the Pareto front; with
    ``predictions > 0`` also that many dense predictions per stage (:func:`plot_run_predictions`)."""
    path = Path(path)
    written: list[Path] = []
    runs = find_runs([path])
    dirs = [r.path for r in runs]
    if (path / "stages").is_dir() and path.resolve() not in dirs:
        dirs.insert(0, path)  # a run directory without results.json or .hydra/ (library use)
    for run_dir in dirs:
        written += plot_run(run_dir)
        if predictions > 0:
            written += plot_run_predictions(run_dir, predictions, predictions_split)
    if sum(r.ok for r in runs) > 1:
        pareto = plot_pareto(path, tasks, metric, split)
        if pareto is not None:
            written.append(pareto)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mtl-plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="a run directory or a sweep directory")
    parser.add_argument("--tasks", nargs=2, default=None, help="the two tasks of the Pareto plot (default: the first two)")
    parser.add_argument("--metric", default=None, help="metric of the Pareto plot (default: the task's primary)")
    parser.add_argument("--split", default="val", choices=("val", "test"))
    parser.add_argument("--predictions", type=int, default=0, metavar="N",
                        help="also plot N images with true and predicted dense maps per stage")
    parser.add_argument("--predictions-split", default="test", choices=("val", "test"))
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
