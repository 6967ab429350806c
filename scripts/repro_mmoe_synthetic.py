"""Reproduce the synthetic experiment of the MMoE paper with the library's models.

Ma, Zhao, Yi, Chen, Hong & Chi, "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts", KDD 2018, section 5 (Fig. 4): two regression tasks whose weight vectors have
cosine ``p`` (``mtl.data.make_synthetic``); shared-bottom, one-gate MoE (OMoE) and MMoE are trained
for each ``p``; the paper finds MMoE best, and its advantage largest when the tasks are less related.

Models (the paper's sizes scaled down for a CPU; parameters below the heads are comparable):

* ``shared_bottom``: ``MLP(100 -> 128, ReLU)`` + ``HardSharing``  (12,928 shared parameters)
* ``omoe``: ``OMoE`` with 8 experts ``Linear(100 -> 16) + ReLU`` and one softmax gate (13,736)
* ``mmoe``: ``MMoE`` with the same experts and one softmax gate per task (13,736 shared + 808 per task)

each with a tower per task: ``Linear(d -> 8) + ReLU + Linear(8 -> 1)`` (``MultiTaskModel(head_hidden=[8])``).
Training: Adam (lr 1e-3), MSE summed over the two tasks, batches of 128, a fixed number of steps;
the score is the mean test MSE over the two tasks, averaged over seeds (each seed draws new data and
a new initialization).

Usage::

    python scripts/repro_mmoe_synthetic.py            # full run (5 seeds, 5000 steps)
    python scripts/repro_mmoe_synthetic.py --quick    # 2 seeds, 400 steps, < 1 minute

Prints one JSON object per (correlation, model) on stdout:
``{"correlation", "model", "loss", "std", "seeds", "steps"}`` (``std`` over seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable

import torch
from torch import Tensor, nn

from mtl import MultiTaskModel, Task
from mtl.backbones import MLP, Backbone
from mtl.data.synthetic import make_synthetic
from mtl.sharing import MMoE, OMoE

MODELS = ("shared_bottom", "omoe", "mmoe")


class InputLayer(Backbone):
    """The identity as a backbone: the experts of OMoE / MMoE read the raw input, as in the paper."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList([nn.Flatten(1)])
        self.stage_channels = [int(in_features)]
        self.out_features = int(in_features)


def build_model(name: str, dim: int, tasks: list[Task], args: argparse.Namespace) -> MultiTaskModel:
    """One of ``MODELS`` for ``dim`` inputs and the given tasks."""
    if name == "shared_bottom":
        return MultiTaskModel(MLP((dim,), hidden=[args.bottom]), tasks, head_hidden=[args.tower])
    moe: Callable = OMoE if name == "omoe" else MMoE
    sharing = lambda backbone, tasks: moe(  # noqa: E731
        backbone, tasks, num_experts=args.experts, expert_hidden=[], expert_out=args.expert_units
    )
    return MultiTaskModel(InputLayer(dim), tasks, sharing=sharing, head_hidden=[args.tower])


def run_one(name: str, correlation: float, seed: int, args: argparse.Namespace) -> float:
    """Train one model on one draw of the data; mean test MSE over the tasks."""
    n_test = args.n_test
    x, y = make_synthetic(args.n_train + n_test, 2, correlation, dim=args.dim, seed=seed)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    x_train, y_train, x_test, y_test = x[: args.n_train], y[: args.n_train], x[args.n_train :], y[args.n_train :]
    tasks = [Task("t0", kind="regression"), Task("t1", kind="regression")]
    torch.manual_seed(seed)
    model = build_model(name, args.dim, tasks, args)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(args.n_train, generator=generator)
    pos = 0
    model.train()
    for _ in range(args.steps):
        if pos + args.batch_size > args.n_train:
            order, pos = torch.randperm(args.n_train, generator=generator), 0
        idx = order[pos : pos + args.batch_size]
        pos += args.batch_size
        out = model(x_train[idx])
        loss = sum(nn.functional.mse_loss(out[t].squeeze(-1), y_train[idx, i]) for i, t in enumerate(("t0", "t1")))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model(x_test)
        losses: list[Tensor] = [nn.functional.mse_loss(out[t].squeeze(-1), y_test[:, i]) for i, t in enumerate(("t0", "t1"))]
    return float(torch.stack(losses).mean())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 seeds and 400 steps (< 1 minute)")
    p.add_argument("--correlations", type=float, nargs="+", default=[1.0, 0.9, 0.5, 0.0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5, quick 2)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 5000, quick 400)")
    p.add_argument("--n-train", type=int, default=8000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--dim", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--bottom", type=int, default=128, help="shared-bottom hidden units")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--expert-units", type=int, default=16)
    p.add_argument("--tower", type=int, default=8, help="hidden units of each task tower")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these sizes)")
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = 2 if args.quick else 5
    if args.steps is None:
        args.steps = 400 if args.quick else 5000
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, start = [], time.perf_counter()
    for correlation in args.correlations:
        for name in args.models:
            losses = [run_one(name, correlation, seed, args) for seed in range(args.seeds)]
            row = {
                "correlation": correlation,
                "model": name,
                "loss": round(statistics.fmean(losses), 4),
                "std": round(statistics.stdev(losses), 4) if len(losses) > 1 else 0.0,
                "seeds": args.seeds,
                "steps": args.steps,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"# {len(rows)} rows in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
