"""Target accuracy against the number of labelled target examples, per transfer method.

Source: ``multidigits`` canvases (``mtl.data.MultiDigitsDataModule``: two 8x8 digits side by side
on a 10x14 canvas, boxes overlapping by 4 columns, each digit shifted by up to 2 pixels), tasks
``left`` and ``right`` with every label of 6,000 training canvases. Target: a shifted domain, the
same kind of canvas with the boxes overlapping by 6 columns and shifts of up to 3 pixels (11x13:
more clutter from the other digit, more jitter), task ``left`` with only 10, 20, 50, 100 or 300
labelled training canvases. Learning the target needs what the source teaches (what digits
look like, among clutter), which a few dozen target labels cannot teach. Both data modules split
scikit-learn's 1,797 digits the same way for a given seed, so no test canvas holds a digit seen
in pretraining. For each seed the CNN is pretrained once on the source, then every method
fine-tunes a new ``left`` head from it (``scratch`` starts from fresh weights) for the same number
of optimizer steps. The metric is the test accuracy on the target's ``left`` (1,000 canvases) at
the end of fine-tuning (higher is better; chance is 0.10).

Usage:
    python scripts/transfer_curve.py [--quick] [--out-dir docs/results] [--seeds 0 1 2] [--methods ...]

Prints JSON rows {"method", "labels", "seed", "metric"} (one line per row, then a summary table).
The full run writes transfer_curve.json and transfer_curve.png (mean ± std over seeds) to --out-dir
(default docs/results); ``--quick`` (2 budgets, 1 seed, short training) writes files only when
--out-dir is given, so it never overwrites the README's results.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
import warnings
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch

from mtl import MultiTaskModel, MultiTaskModule, Task
from mtl.backbones import CNN
from mtl.data import MultiDigitsDataModule
from mtl.transfer import BSS, DELTA, L2SP, Distillation, TransferTerms
from mtl.transfer.policies import (
    BackboneRamp,
    DiscriminativeLR,
    Full,
    GradualUnfreeze,
    LayerDecay,
    LinearProbe,
    ProbeThenFull,
)

DIGIT = {"kind": "multiclass", "num_classes": 10}
SOURCES = {"left": DIGIT, "right": DIGIT}
TARGET = "left"
#: the target domain: more overlap and more jitter than the source's 4 and 2 (the data's defaults)
TARGET_LAYOUT = {"overlap": 6, "max_shift": 3}
#: LwF distils the source head whose name the new target head does not take
DISTILLED = "right"
BATCH = 32
LR = 2e-3


def methods(epochs: int) -> dict[str, dict]:
    """Each method's module arguments; epoch-based options scale with the fine-tuning length."""
    third = max(1, epochs // 3)
    return {
        "scratch": {"init": False},
        "linear_probe": {"policy": LinearProbe()},
        "full": {"policy": Full()},
        "probe_then_full": {"policy": ProbeThenFull(probe_epochs=third, backbone_lr_scale=0.1)},
        "gradual_unfreeze": {"policy": GradualUnfreeze(epochs_per_block=third)},
        "discriminative_lr": {"policy": DiscriminativeLR(factor=2.6)},
        "layer_decay": {"policy": LayerDecay(decay=0.65)},
        "backbone_ramp": {"policy": BackboneRamp(unfreeze_at_epoch=third)},
        "l2sp": {"policy": Full(), "terms": lambda: {"l2sp": L2SP(alpha=0.01)}},
        "bss": {"policy": Full(), "terms": lambda: {"bss": BSS(weight=0.001)}},
        "delta": {"policy": Full(), "terms": lambda: {"delta": DELTA(weight=0.01)}},
        "lwf": {"policy": Full(), "lwf": 1.0},
    }


def trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, **kwargs,
    )


def backbone(input_shape) -> CNN:
    # the default experiment's CNN; pooling to a 1x2 grid keeps where (left or right) a digit is
    return CNN(input_shape=input_shape, channels=[32, 64], pool_size=[1, 2])


def source_data(seed: int, n_train: int = 6000) -> MultiDigitsDataModule:
    dm = MultiDigitsDataModule(tasks=SOURCES, seed=seed, batch_size=BATCH, n_train=n_train, n_val=64, n_test=64)
    dm.setup()
    return dm


def target_data(seed: int, labels: int | None, n_train: int) -> MultiDigitsDataModule:
    dm = MultiDigitsDataModule(
        tasks={TARGET: DIGIT}, seed=seed, batch_size=BATCH, n_train=n_train, n_val=64, n_test=1000,
        label_budget={TARGET: labels} if labels else None, **TARGET_LAYOUT,
    )
    dm.setup()
    return dm


def pretrain(seed: int, epochs: int, n_train: int) -> dict:
    """The source model: the CNN and the ``left`` and ``right`` heads, on every source label."""
    pl.seed_everything(seed, workers=True)
    dm = source_data(seed, n_train)
    model = MultiTaskModel(backbone(dm.input_shape), dm.tasks)
    module = MultiTaskModule(model, optimizer=partial(torch.optim.AdamW, lr=LR))
    trainer(max_epochs=epochs).fit(module, datamodule=dm)
    return {k: v.clone() for k, v in model.state_dict().items()}


def finetune(method: str, labels: int, seed: int, source: dict, steps: int, n_train: int) -> float:
    """Test accuracy on ``left`` after ``steps`` optimizer steps on ``labels`` labelled canvases."""
    pl.seed_everything(seed, workers=True)
    dm = target_data(seed, labels, n_train)
    n = len(dm.dataset("train"))
    epochs = max(3, math.ceil(steps / math.ceil(n / BATCH)))
    spec = methods(epochs)[method]
    tasks = dict(dm.tasks)
    if "lwf" in spec:  # the student keeps a source head, distilled from the frozen source model
        tasks[DISTILLED] = Task(DISTILLED, num_classes=10)
    model = MultiTaskModel(backbone(dm.input_shape), tasks)
    if spec.get("init", True):  # the pretrained backbone (and the distilled head); a new target head
        own = model.state_dict()
        keep = {k: v for k, v in source.items() if k in own and not k.startswith(f"heads.{TARGET}.")}
        model.load_state_dict(keep, strict=False)
    terms = spec["terms"]() if "terms" in spec else {}
    if "lwf" in spec:
        teacher = MultiTaskModel(backbone(dm.input_shape), {t: Task(t, num_classes=10) for t in SOURCES})
        teacher.load_state_dict(source)
        terms["distill"] = Distillation(teacher, [DISTILLED], {DISTILLED: "multiclass"}, weight=spec["lwf"])
    module = MultiTaskModule(
        model, tasks=[TARGET], optimizer=partial(torch.optim.AdamW, lr=LR), policy=spec.get("policy"),
        transfer=TransferTerms(terms) if terms else None,
    )
    trainer(max_epochs=epochs, max_steps=steps).fit(module, datamodule=dm)
    out = trainer().test(module, datamodule=dm, verbose=False)
    return float(out[0][f"test/{TARGET}/acc"])


def summary(rows: list[dict], names: list[str]) -> str:
    labels = list(dict.fromkeys(r["labels"] for r in rows))
    lines = ["| method | " + " | ".join(str(b) for b in labels) + " |", "|---|" + "---|" * len(labels)]
    for name in names:
        cells = []
        for b in labels:
            v = [r["metric"] for r in rows if r["method"] == name and r["labels"] == b]
            cells.append(f"{statistics.fmean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    names = list(dict.fromkeys(r["method"] for r in rows))
    budgets = sorted({r["labels"] for r in rows})
    colors = plt.get_cmap("tab20").colors
    for i, name in enumerate(names):
        means, stds = [], []
        for b in budgets:
            v = [r["metric"] for r in rows if r["method"] == name and r["labels"] == b]
            means.append(statistics.fmean(v))
            stds.append(statistics.stdev(v) if len(v) > 1 else 0.0)
        style = {"color": "black", "linewidth": 2.5} if name == "scratch" else {"color": colors[(2 * i) % 20 + (2 * i) // 20]}
        ax.errorbar(budgets, means, yerr=stds, marker="osD^v<>"[i % 7], capsize=3, label=name, **style)
    ax.set_xscale("log")
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.axhline(0.1, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("labelled target canvases (overlap 6, shift 3)")
    ax.set_ylabel("test accuracy on the target's left digit")
    ax.set_title("Transfer from left/right digits (overlap 4, shift 2) to a shifted layout")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 budgets, 1 seed, short training; no files unless --out-dir")
    parser.add_argument("--out-dir", type=Path, default=None, help="where to write the results (default docs/results; quick: none)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", default=None, choices=list(methods(3)))
    parser.add_argument("--budgets", type=int, nargs="+", default=None, help="labelled target images")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning optimizer steps (default 150; quick 10)")
    args = parser.parse_args(argv)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    budgets = args.budgets or ([10, 100] if args.quick else [10, 20, 50, 100, 300])
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    steps = args.steps or (10 if args.quick else 150)
    pre_epochs, pre_train = (1, 500) if args.quick else (6, 6000)
    n_train = max(2000, max(budgets))
    out_dir = args.out_dir if args.out_dir is not None else (None if args.quick else Path("docs/results"))
    names = args.methods or list(methods(3))
    rows = []
    start = time.perf_counter()
    for seed in seeds:
        source = pretrain(seed, pre_epochs, pre_train)
        for labels in budgets:
            for name in names:
                metric = finetune(name, labels, seed, source, steps, n_train)
                row = {"method": name, "labels": labels, "seed": seed, "metric": round(metric, 4)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n" + summary(rows, names))
    took = f"{len(rows)} runs in {time.perf_counter() - start:.0f} s"
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "transfer_curve.json").write_text(json.dumps(rows, indent=1))
        plot(rows, out_dir / "transfer_curve.png")
        print(f"\n{took}; wrote {out_dir}/transfer_curve.json and .png")
    else:
        print(f"\n{took}; no files written (--quick without --out-dir)")
    return rows


if __name__ == "__main__":
    main()
