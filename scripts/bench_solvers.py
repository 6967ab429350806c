"""UPGrad's solver alone: the T dual-cone quadratic programs of one step, with each backend of
:func:`mtl.balancing.solvers.dual_cone_weights_batched`, at T = 2 .. 100.

    python scripts/bench_solvers.py [--quick] [--out FILE]

Backends: ``pivoting`` (block principal pivoting on all T problems at once, what ``auto`` uses),
``active_set`` (the batched primal active set) and ``quadprog`` (Goldfarb-Idnani, compiled; the
solver TorchJD's UPGrad uses; skipped if not installed). Each round draws a Gramian (``J [T, 2000]``
Gaussian, with a third of the rows made to conflict with the first, normalised by its trace plus
UPGrad's ridge 1e-4) and solves it with every backend in turn (the order alternates), each
repeated enough times to take about 2 ms; times are this process's CPU time with one thread.
``*_ms`` is the median over rounds, ``pivoting_vs_quadprog`` the median of the per-round ratios
with its min-max. Also reports the largest difference between the backends' weights.

Prints a JSON list of rows ``{"tasks", "pivoting_ms", "active_set_ms", "quadprog_ms",
"pivoting_vs_quadprog", "pivoting_vs_quadprog_range", "max_abs_diff"}``.
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

from mtl.balancing import solvers  # noqa: E402
from mtl.balancing.aggregators.upgrad import normalize_and_regularize  # noqa: E402
from mtl.balancing.solvers import dual_cone_weights_batched  # noqa: E402


def timed(fn, repeats: int) -> float:
    t0 = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - t0) / repeats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T = 2, 10 and 3 rounds")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    backends = ["pivoting", "active_set"] + (["quadprog"] if solvers._quadprog is not None else [])
    rows = []
    for T in [2, 10] if args.quick else [2, 10, 40, 100]:
        gen = torch.Generator().manual_seed(T)
        times: dict[str, list[float]] = {b: [] for b in backends}
        ratios: list[float] = []
        diff = 0.0
        for r in range(3 if args.quick else 9):
            J = torch.randn(T, 2000, generator=gen, dtype=torch.float64)
            J[1 : max(2, T // 3)] -= J[0]
            G = normalize_and_regularize(J @ J.T, 1e-4)
            U = torch.eye(T, dtype=G.dtype) / T
            out = {b: dual_cone_weights_batched(U, G, backend=b) for b in backends}  # also a warm-up
            once = {b: timed(lambda b=b: dual_cone_weights_batched(U, G, backend=b), 1) for b in backends}
            order = backends if r % 2 == 0 else backends[::-1]
            this = {}
            for b in order:
                this[b] = timed(lambda b=b: dual_cone_weights_batched(U, G, backend=b), max(1, int(2e-3 / max(once[b], 1e-6))))
                times[b].append(this[b])
            if "quadprog" in this:
                ratios.append(this["pivoting"] / this["quadprog"])
            for b in backends[1:]:
                diff = max(diff, float((out[b] - out["pivoting"]).abs().max()))
        row = {"tasks": T}
        for b in backends:
            row[f"{b}_ms"] = round(1000 * statistics.median(times[b]), 4)
        if ratios:
            row["pivoting_vs_quadprog"] = round(statistics.median(ratios), 3)
            row["pivoting_vs_quadprog_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
        row["max_abs_diff"] = diff
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    text = json.dumps(rows, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
