"""UPGrad's solver alone: the T dual-cone quadratic programs of one step, built-in active set against
quadprog (Goldfarb-Idnani, compiled; the solver TorchJD's UPGrad uses), at T = 2 .. 100.

    python scripts/bench_solvers.py [--quick]

Each round draws a Gramian (``J [T, 2000]`` Gaussian, normalised by its trace plus UPGrad's ridge
1e-4) and solves it with both backends in turn; times are CPU time with one thread; ``ms`` is the
median over rounds. Also reports the largest difference between the two backends' weights.
Prints a JSON list of rows ``{"tasks", "active_set_ms", "quadprog_ms", "max_abs_diff"}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mtl.balancing.aggregators.upgrad import normalize_and_regularize  # noqa: E402
from mtl.balancing.solvers import dual_cone_weights_batched  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T = 2, 10 and 3 rounds")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for T in [2, 10] if args.quick else [2, 10, 40, 100]:
        gen = torch.Generator().manual_seed(T)
        times: dict[str, list[float]] = {"active_set": [], "quadprog": []}
        diff = 0.0
        for _ in range(3 if args.quick else 9):
            J = torch.randn(T, 2000, generator=gen, dtype=torch.float64)
            G = normalize_and_regularize(J @ J.T, 1e-4)
            U = torch.eye(T, dtype=G.dtype) / T
            out = {}
            for backend in times:
                t0 = time.process_time()
                out[backend] = dual_cone_weights_batched(U, G, backend=backend)
                times[backend].append(time.process_time() - t0)
            diff = max(diff, float((out["active_set"] - out["quadprog"]).abs().max()))
        rows.append({
            "tasks": T,
            "active_set_ms": round(1000 * statistics.median(times["active_set"]), 3),
            "quadprog_ms": round(1000 * statistics.median(times["quadprog"]), 3),
            "max_abs_diff": diff,
        })
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
