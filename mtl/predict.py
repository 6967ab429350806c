"""``mtl-predict ckpt_path=<best.ckpt> data.path=new.csv out=preds.csv``: predictions for new rows.

The model and everything it learned about the data come from the checkpoint of a run on CSV data
(``data=csv``): the tasks with their label names and target scales (the task spec), and the feature
columns with the training split's means and standard deviations (the data's state, which Lightning
saves with every checkpoint). New rows are standardised with those, never with their own
statistics. The new file needs every feature column; target columns may be absent, and other
columns are ignored (``keep=[id]`` copies some into the output).

The output has one row per input row, in the input's order, and per task: ``<task>`` with the
class in its original name (or code), the binary label (its original names, or 0/1), or the
regression value in the target's units (``<task>_<i>`` for several outputs). With ``prob=true``
also ``<task>_prob_<class>`` (multiclass) or ``<task>_prob`` (binary: the probability of the second
class, in sorted order, or of 1). Nothing is written unless every row was predicted.
"""

from __future__ import annotations

import csv
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import hydra
import torch
from omegaconf import DictConfig

from mtl.data.csv import feature_matrix, read_csv, standardise
from mtl.tasks import Task
from mtl.transfer.loading import load_checkpoint

CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")


def csv_preprocessing(checkpoint: Mapping[str, Any], ckpt: Path) -> dict[str, Any]:
    """The feature preprocessing saved in a checkpoint of a CSV run (see
    :meth:`CSVDataModule.state_dict`); errors say when the checkpoint is of other data."""
    spec = checkpoint.get("mtl_run") if isinstance(checkpoint, Mapping) else None
    if not isinstance(spec, Mapping) or "mtl" not in checkpoint:
        raise ValueError(f"ckpt_path: '{ckpt}' was not written by mtl-train (no task and model information).")
    target = str((spec.get("data") or {}).get("_target_", ""))
    state = checkpoint.get(target.rsplit(".", 1)[-1]) if target else None
    if isinstance(state, Mapping) and "features" in state:
        return dict(state)
    if target not in ("mtl.data.CSVDataModule", "mtl.data.csv.CSVDataModule"):
        raise ValueError(
            f"ckpt_path: '{ckpt}' was trained on {target or 'data of unknown type'}, not on a CSV file: "
            f"mtl-predict reads new rows of a CSV file for a model trained with data=csv. For this data, "
            f"use mtl-eval ckpt_path=... (test split metrics) or mtl.load(path) in Python."
        )
    raise ValueError(
        f"ckpt_path: '{ckpt}' holds no feature preprocessing (it was written before mtl-train saved it with "
        f"CSV runs); train it again to predict with mtl-predict."
    )


def task_columns(task: Task, output: torch.Tensor, prob: bool = False) -> dict[str, list]:
    """The output columns of one task for a batch of head outputs ``[B, output_size]``.

    Returns:
        ``{column: values}`` with ``B`` values each (see the module docstring for the names).
    """
    names = task.class_names
    pred = task.predict(output)
    if task.kind in ("multiclass", "binary"):
        codes = pred.tolist()
        cols: dict[str, list] = {task.name: [names[c] for c in codes] if names else codes}
        if prob:
            p = task.probabilities(output)
            if task.kind == "binary":
                cols[f"{task.name}_prob"] = p.tolist()
            else:
                for k in range(p.shape[1]):
                    cols[f"{task.name}_prob_{names[k] if names else k}"] = p[:, k].tolist()
        return cols
    if task.kind == "multilabel":
        labels = names or [str(k) for k in range(pred.shape[1])]
        cols = {f"{task.name}_{labels[k]}": pred[:, k].tolist() for k in range(pred.shape[1])}
        if prob:
            p = task.probabilities(output)
            cols.update({f"{task.name}_prob_{labels[k]}": p[:, k].tolist() for k in range(p.shape[1])})
        return cols
    if task.kind == "regression":
        if pred.shape[1] == 1:
            return {task.name: pred[:, 0].tolist()}
        return {f"{task.name}_{k}": pred[:, k].tolist() for k in range(pred.shape[1])}
    raise ValueError(
        f"Task '{task.name}' is of kind '{task.kind}': mtl-predict writes per-row predictions of multiclass, "
        f"binary, multilabel and regression tasks."
    )


def predict_csv(
    ckpt_path: str | Path,
    data_path: str | Path,
    prob: bool = False,
    keep: Sequence[str] = (),
    batch_size: int = 1024,
    device: str = "cpu",
) -> tuple[list[str], list[list[Any]]]:
    """Predictions of a CSV run's checkpoint for the rows of another CSV file.

    Args:
        ckpt_path: a checkpoint written by ``mtl-train`` with ``data=csv``.
        data_path: the new rows (a header row, every feature column; target columns optional).
        prob: also write class probabilities.
        keep: input columns copied into the output first (e.g. an id).
        batch_size: rows per forward pass.
        device: where the model runs.
    Returns:
        ``(header, rows)`` of the output table, one row per input row, in order.
    """
    from mtl.eval import load_module

    ckpt, path = Path(ckpt_path), Path(data_path)
    if not ckpt.is_file():
        raise FileNotFoundError(f"ckpt_path: checkpoint '{ckpt}' does not exist; name a run's <run>/stages/<stage>/checkpoints/best.ckpt.")
    state = csv_preprocessing(load_checkpoint(ckpt, "ckpt_path: checkpoint"), ckpt)
    header, rows = read_csv(path)
    features = list(state["features"])
    missing = [c for c in features if c not in header]
    if missing:
        raise ValueError(
            f"data.path: '{path}' has no column(s) {missing}; the model of '{ckpt}' reads the features "
            f"{features}. Add them (target columns may be absent)."
        )
    absent = [c for c in keep if c not in header]
    if absent:
        raise ValueError(f"keep: column(s) {absent} are not in '{path}'; its columns are {header}.")
    if not rows:
        raise ValueError(f"data.path: '{path}' has no data rows.")
    x = standardise(feature_matrix(rows, features, path, training=False), state["feature_mean"], state["feature_std"])
    module = load_module(ckpt, device)
    tasks = [module.tasks[t] for t in module.task_names]
    columns: dict[str, list] = {c: [r.get(c, "") for r in rows] for c in keep}
    with torch.inference_mode():
        for start in range(0, len(rows), int(batch_size)):
            batch = torch.from_numpy(x[start : start + int(batch_size)]).to(device)
            outputs = module(batch, module.task_names)
            for task in tasks:
                for name, values in task_columns(task, outputs[task.name].float().cpu(), prob).items():
                    if start == 0 and name in columns:
                        raise ValueError(
                            f"keep: column '{name}' has the name of a prediction column; keep it under another "
                            f"name (rename it in '{path}') or leave it out of keep."
                        )
                    columns.setdefault(name, []).extend(values)
    names = list(columns)
    return names, [list(r) for r in zip(*(columns[n] for n in names))]


def _cell(value: Any) -> Any:
    return format(value, ".8g") if isinstance(value, float) else value


def write_table(path: str | Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Write a CSV file all at once: a temporary file beside ``path``, renamed onto it when complete
    (an interrupted write leaves no partial file)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows([_cell(v) for v in r] for r in rows)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def predict(cfg: DictConfig) -> Path:
    """Run ``mtl-predict`` for a composed ``conf/predict.yaml``; returns the written file."""
    data_path, out = Path(str(cfg.data.path)), Path(str(cfg.out))
    if out.resolve() == data_path.resolve():
        raise ValueError(f"out: '{out}' is the input file data.path; write the predictions to another file.")
    keep = [str(c) for c in (cfg.get("keep") or [])]
    header, rows = predict_csv(cfg.ckpt_path, data_path, prob=bool(cfg.get("prob")), keep=keep,
                               batch_size=int(cfg.get("batch_size") or 1024), device=str(cfg.get("device") or "cpu"))
    write_table(out, header, rows)
    return out


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
def main(cfg: DictConfig) -> None:
    try:
        out = predict(cfg)
    except (ValueError, FileNotFoundError) as err:
        # the message names the key, the file and what to do: a traceback would only bury it
        print(f"mtl-predict: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"Predictions: {out}")


if __name__ == "__main__":
    main()
