"""Target accuracy against the number of labelled target examples, per transfer method.

Source task: digits 0-4 (`low`, every label); target task: digits 5-9 (`high`) with 20, 50, 100,
300 or all (about 540) labelled training images. For each seed the CNN is pretrained once on the
source, then every method fine-tunes a new `high` head from it (`scratch` starts from fresh
weights), for the same number of optimizer steps. The metric is the test accuracy on `high` at the
end of fine-tuning (higher is better).

Usage:
    python scripts/transfer_curve.py [--quick] [--out-dir docs/results]

Prints JSON rows {"method", "labels", "seed", "metric"} (one line per row, then a summary table),
writes transfer_curve.json and transfer_curve.png (mean ± std over seeds) to --out-dir.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch

from mtl import MultiTaskModel, MultiTaskModule
from mtl.backbones import CNN
from mtl.data import DigitsDataModule
from functools import partial

from mtl.transfer import L2SP, Distillation, TransferTerms
from mtl.transfer.policies import (
    BackboneRamp,
    DiscriminativeLR,
    Full,
    GradualUnfreeze,
    LayerDecay,
    LinearProbe,
    ProbeThenFull,
)

TASKS = {"low": {"kind": "multiclass", "num_classes": 5}, "high": {"kind": "multiclass", "num_classes": 5}}


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
        "l2sp": {"policy": Full(), "l2sp": 0.01},
        "lwf": {"policy": Full(), "lwf": 1.0},
    }


def trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, **kwargs,
    )


def backbone() -> CNN:
    return CNN(input_shape=(1, 8, 8), channels=[32, 64])


def pretrain(seed: int, epochs: int) -> dict:
    pl.seed_everything(seed, workers=True)
    dm = DigitsDataModule(tasks=TASKS, seed=seed, batch_size=32)
    dm.setup()
    dm.select_tasks(["low"])
    model = MultiTaskModel(backbone(), {"low": dm.tasks["low"]}, head_hidden=[64])
    trainer(max_epochs=epochs).fit(MultiTaskModule(model), datamodule=dm)
    return {k: v.clone() for k, v in model.state_dict().items()}


def finetune(method: str, labels: int | None, seed: int, source: dict, steps: int) -> float:
    pl.seed_everything(seed, workers=True)
    dm = DigitsDataModule(tasks=TASKS, seed=seed, batch_size=32, label_budget={"high": labels} if labels else None)
    dm.setup()
    dm.select_tasks(["high"])
    n = len(dm.dataset("train"))
    epochs = max(3, math.ceil(steps / math.ceil(n / 32)))
    spec = methods(epochs)[method]
    heads = ["high", "low"] if "lwf" in spec else ["high"]
    model = MultiTaskModel(backbone(), {t: dm.tasks[t] for t in heads}, head_hidden=[64])
    if spec.get("init", True):
        own = model.state_dict()
        model.load_state_dict({k: v for k, v in source.items() if k in own and not k.startswith("heads.high.")}, strict=False)
    terms = {}
    if "l2sp" in spec:
        terms["l2sp"] = L2SP(alpha=spec["l2sp"])
    if "lwf" in spec:
        teacher = MultiTaskModel(backbone(), {"low": dm.tasks["low"]}, head_hidden=[64])
        teacher.load_state_dict(source)
        terms["distill"] = Distillation(teacher, ["low"], {"low": "multiclass"}, weight=spec["lwf"])
    module = MultiTaskModule(
        model, tasks=["high"], optimizer=partial(torch.optim.AdamW, lr=2e-3), policy=spec.get("policy"),
        transfer=TransferTerms(terms) if terms else None,
    )
    trainer(max_epochs=epochs).fit(module, datamodule=dm)
    out = trainer().test(module, datamodule=dm, verbose=False)
    return float(out[0]["test/high/acc"])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    names = list(dict.fromkeys(r["method"] for r in rows))
    budgets = sorted({r["labels"] for r in rows}, key=lambda b: math.inf if b == "all" else b)
    xs = list(range(len(budgets)))
    for name in names:
        means, stds = [], []
        for b in budgets:
            v = [r["metric"] for r in rows if r["method"] == name and r["labels"] == b]
            means.append(statistics.fmean(v))
            stds.append(statistics.stdev(v) if len(v) > 1 else 0.0)
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=name)
    ax.set_xticks(xs, [str(b) for b in budgets])
    ax.set_xlabel("labelled target images (digits 5-9)")
    ax.set_ylabel("test accuracy on the target task")
    ax.set_title("Transfer from digits 0-4 to digits 5-9")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 budgets, 1 seed, fewer steps")
    parser.add_argument("--out-dir", type=Path, default=Path("docs/results"))
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", default=None)
    args = parser.parse_args()
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    budgets: list[int | None] = [20, 100] if args.quick else [20, 50, 100, 300, None]
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    steps, pre_epochs = (60, 3) if args.quick else (150, 8)
    names = args.methods or list(methods(1))
    rows = []
    start = time.perf_counter()
    for seed in seeds:
        source = pretrain(seed, pre_epochs)
        for labels in budgets:
            for name in names:
                metric = finetune(name, labels, seed, source, steps)
                row = {"method": name, "labels": labels or "all", "seed": seed, "metric": round(metric, 4)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "transfer_curve.json").write_text(json.dumps(rows, indent=1))
    plot(rows, args.out_dir / "transfer_curve.png")
    labels = list(dict.fromkeys(r["labels"] for r in rows))
    print(f"\n| method | " + " | ".join(str(b) for b in labels) + " |")
    print("|---|" + "---|" * len(labels))
    for name in names:
        cells = []
        for b in labels:
            v = [r["metric"] for r in rows if r["method"] == name and r["labels"] == b]
            cells.append(f"{statistics.fmean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\n{len(rows)} runs in {time.perf_counter() - start:.0f} s; wrote {args.out_dir}/transfer_curve.json and .png")


if __name__ == "__main__":
    main()
