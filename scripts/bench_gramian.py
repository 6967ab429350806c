"""Memory and time of one UPGrad step in the params space: Jacobian engine, Gramian engine, and
TorchJD's autogram where it is installed, at P = 50k .. 5M shared parameters and T = 10 tasks.

    python scripts/bench_gramian.py             # P = 50k, 500k, 5M
    python scripts/bench_gramian.py --quick     # P = 50k, 500k

Model: an MLP trunk of two hidden layers (input 64, width chosen for P), ``T`` linear heads,
batch 64, squared-error losses on random targets, SGD. Each contender at each P runs in its own
subprocess, so that its peak memory is its own: ``peak_mb`` is the growth of the process's maximum
resident set size (``ru_maxrss``) from after building the model to the end of the timed steps.
``ms_per_step`` is the median CPU time of the timed steps (one torch thread). One step = forward,
task gradients (or their Gramian), UPGrad's weights, backward, SGD step; TorchJD's step is
``Engine(trunk, batch_dim=None).compute_gramian(losses)``, ``UPGradWeighting``, ``losses.backward(w)``.
Prints a JSON list of rows ``{"contender", "params", "tasks", "ms_per_step", "peak_mb"}``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH, IN, T = 64, 64, 10
#: parameter elements per chunk of the Gramian engine in this benchmark
CHUNK = 100_000


def width_for(params: int) -> int:
    """Hidden width ``h`` of ``Linear(IN, h) -> Linear(h, h)`` with about ``params`` parameters."""
    # h^2 + (IN + 2) h - params = 0
    b = IN + 2
    return max(4, int((-b + (b * b + 4 * params) ** 0.5) / 2))


def one(contender: str, params: int, steps: int) -> dict:
    import torch
    from torch import nn

    sys.path.insert(0, str(ROOT))
    from mtl.balancing import GramianEngine, JacobianEngine, UPGrad, balanced_backward

    torch.set_num_threads(1)
    torch.manual_seed(0)
    h = width_for(params)
    trunk = nn.Sequential(nn.Linear(IN, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU())
    heads = nn.ModuleList(nn.Linear(h, 1) for _ in range(T))
    shared, own = list(trunk.parameters()), list(heads.parameters())
    opt = torch.optim.SGD(list(trunk.parameters()) + own, lr=1e-3)
    x, y = torch.randn(BATCH, IN), torch.randn(T, BATCH)
    agg = UPGrad(T)
    if contender == "torchjd_autogram":
        from torchjd.aggregation import UPGradWeighting
        from torchjd.autogram import Engine

        engine, weighting = Engine(trunk, batch_dim=None), UPGradWeighting()
    else:
        engine = JacobianEngine() if contender == "mtl_jacobian" else GramianEngine(chunk_size=CHUNK)
        if contender == "mtl_gramian":
            engine.attach(trunk)  # the linear layers take the per-layer route

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        hid = trunk(x)
        losses = torch.stack([((head(hid).squeeze(1) - y[t]) ** 2).mean() for t, head in enumerate(heads)])
        if contender == "torchjd_autogram":
            w = weighting(engine.compute_gramian(losses))
            losses.backward(w)
        else:
            balanced_backward(losses, agg, shared, own, engine=engine)
        opt.step()

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.process_time()
        step()
        times.append(time.process_time() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "contender": contender,
        "params": sum(p.numel() for p in shared),
        "tasks": T,
        "ms_per_step": round(1000 * statistics.median(times), 2),
        "peak_mb": round((peak - base) / 1024, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--one", nargs=3, metavar=("CONTENDER", "PARAMS", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), int(args.one[2]))))
        return
    try:
        import torchjd.autogram  # noqa: F401

        contenders = ["mtl_jacobian", "mtl_gramian", "torchjd_autogram"]
    except ImportError:
        contenders = ["mtl_jacobian", "mtl_gramian"]
    sizes = [50_000, 500_000] if args.quick else [50_000, 500_000, 5_000_000]
    rows = []
    for params in sizes:
        steps = 3 if params >= 5_000_000 else 5
        for contender in contenders:
            out = subprocess.run(
                [sys.executable, __file__, "--one", contender, str(params), str(steps)],
                capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": ""},
            )
            row = json.loads(out.stdout) if out.returncode == 0 else {
                "contender": contender, "params": params, "error": out.stderr.strip().splitlines()[-1:]
            }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
