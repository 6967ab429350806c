"""Table of a balancer sweep: per task, mean ± std over seeds of a test metric.

Usage (the README's comparison):
    mtl-train -m experiment=multidigits_multitask balancer=ew,uw,pcgrad,... seed=0,1,2 \
        trainer.max_epochs=3 data.n_train=3000 logger=none hydra.sweep.dir=outputs/balancers
    python scripts/compare_balancers.py outputs/balancers [--metric acc] [--split test]

Prints a Markdown table, then the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--metric", default="acc")
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    files = sorted(args.sweep_dir.glob("*/results.json"))
    if not files:
        raise SystemExit(f"No */results.json under {args.sweep_dir}.")
    tasks: list[str] = []
    for f in files:
        res = json.loads(f.read_text())
        method = res["config"]["balancer"]["method"]["_target_"].rsplit(".", 1)[-1]
        space = (res["config"]["balancer"].get("engine") or {}).get("space", "params")
        key = f"{method} ({space})" if space != "params" else method
        stage = list(res["stages"].values())[-1]
        for task, splits in stage["tasks"].items():
            if task not in tasks:
                tasks.append(task)
            values[key][task].append(splits[args.split][args.metric])
    rows = []
    print(f"| balancer | " + " | ".join(f"{t} {args.split} {args.metric}" for t in tasks) + " | seeds |")
    print("|---|" + "---|" * (len(tasks) + 1))
    for key in sorted(values):
        cells, row = [], {"method": key}
        for t in tasks:
            v = values[key][t]
            mean, std = statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)
            cells.append(f"{mean:.3f} ± {std:.3f}")
            row[t] = {"mean": mean, "std": std, "n": len(v)}
        n = len(values[key][tasks[0]])
        print(f"| {key} | " + " | ".join(cells) + f" | {n} |")
        rows.append(row)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
