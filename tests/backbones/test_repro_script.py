"""scripts/repro_mmoe_synthetic.py and scripts/transfer_curve.py run (tiny settings, in a
subprocess), print their JSON rows, and leave the README's result files alone under --quick."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from conftest import PYTHON, ROOT, cli_env

SCRIPT = ROOT / "scripts" / "repro_mmoe_synthetic.py"
TRANSFER = ROOT / "scripts" / "transfer_curve.py"


def json_rows(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_repro_quick_prints_one_json_row_per_correlation_and_model(tmp_path):
    args = ["--quick", "--seeds", "2", "--steps", "15", "--n-train", "256", "--n-test", "64",
            "--correlations", "1.0", "0.0"]
    out = subprocess.run([PYTHON, str(SCRIPT), *args], cwd=tmp_path, env=cli_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json_rows(out.stdout)
    assert [(r["correlation"], r["model"]) for r in rows] == [
        (c, m) for c in (1.0, 0.0) for m in ("shared_bottom", "omoe", "mmoe")
    ]
    for row in rows:
        assert set(row) == {"correlation", "model", "loss", "std", "sem", "failed", "seeds", "steps", "curve"}
        assert row["seeds"] == 2 and row["steps"] == 15
        assert math.isfinite(row["loss"]) and row["loss"] > 0 and row["std"] >= 0 and row["sem"] >= 0
        assert 0 <= row["failed"] <= 2
        assert row["curve"][-1] == [15, row["loss"]]
    assert not (tmp_path / "docs").exists()  # --quick writes no result file


def test_runs_trained_side_by_side_match_one_at_a_time():
    """vmap over the stacked runs trains each run exactly as if it were trained alone."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import repro_mmoe_synthetic as repro
    finally:
        sys.path.pop(0)
    args = repro.parse_args(["--quick", "--steps", "5", "--n-train", "64", "--n-test", "32"])
    x, y = repro.make_data(0.5, range(2), args)
    for name in repro.MODELS:
        together = repro.train_runs(name, x, y, args)[5]  # runs 0 and 1
        alone = repro.train_runs(name, x[:1], y[:1], args)[5]  # run 0 only
        assert together.shape == (2, 2) and alone.shape == (1, 2)
        for t in range(2):
            assert math.isclose(float(together[0, t]), float(alone[0, t]), rel_tol=1e-4), name


def test_transfer_curve_quick_prints_rows_and_writes_nothing(tmp_path):
    args = ["--quick", "--methods", "scratch", "linear_probe", "lwf", "--budgets", "10", "--steps", "3"]
    out = subprocess.run([PYTHON, str(TRANSFER), *args], cwd=tmp_path, env=cli_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json_rows(out.stdout)
    assert [(r["method"], r["labels"], r["seed"]) for r in rows] == [
        ("scratch", 10, 0), ("linear_probe", 10, 0), ("lwf", 10, 0)
    ]
    assert all(set(r) == {"method", "labels", "seed", "metric"} and 0 <= r["metric"] <= 1 for r in rows)
    assert not (tmp_path / "docs").exists()
