"""scripts/repro_mmoe_synthetic.py runs (tiny settings, in a subprocess) and prints JSON rows."""

from __future__ import annotations

import json
import math
import subprocess

from conftest import PYTHON, ROOT, cli_env

SCRIPT = ROOT / "scripts" / "repro_mmoe_synthetic.py"


def test_repro_quick_prints_one_json_row_per_correlation_and_model():
    args = ["--quick", "--seeds", "2", "--steps", "15", "--n-train", "256", "--n-test", "64",
            "--correlations", "1.0", "0.0"]
    out = subprocess.run([PYTHON, str(SCRIPT), *args], cwd=ROOT, env=cli_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    assert [(r["correlation"], r["model"]) for r in rows] == [
        (c, m) for c in (1.0, 0.0) for m in ("shared_bottom", "omoe", "mmoe")
    ]
    for row in rows:
        assert set(row) == {"correlation", "model", "loss", "std", "seeds", "steps"}
        assert row["seeds"] == 2 and row["steps"] == 15
        assert math.isfinite(row["loss"]) and row["loss"] > 0 and row["std"] >= 0
