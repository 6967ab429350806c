"""The benchmark and baseline scripts the README quotes run in their small forms and print JSON.

(scripts/repro_mmoe_synthetic.py and scripts/transfer_curve.py: tests/backbones/test_repro_script.py.)
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import PYTHON, ROOT, cli_env

SCRIPTS = ROOT / "scripts"


def run_script(name: str, *args: str, cwd, timeout: int = 300) -> list[dict]:
    out = subprocess.run([PYTHON, str(SCRIPTS / name), *args], cwd=cwd, env=cli_env(), capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    try:  # one JSON document (an object or a list of rows)
        doc = json.loads(out.stdout)
        return doc if isinstance(doc, list) else [doc]
    except json.JSONDecodeError:  # or JSON rows among other lines
        rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return rows


@pytest.mark.slow
def test_bench_overhead_quick(tmp_path):
    rows = run_script("bench_overhead.py", "--quick", "--epochs", "2", cwd=tmp_path)
    row = rows[-1]
    assert row["ratio"] > 0 and row["framework_ms"] > 0 and row["loop_ms"] > 0
    assert row["alternation"] == "step" and row["lightning"]["ratio"] > 0 and row["steps_per_epoch"] == 20


@pytest.mark.slow
def test_bench_balancers_small(tmp_path):
    out = tmp_path / "rows.json"
    rows = run_script("bench_balancers.py", "--quick", "--tasks", "2", "--steps", "1", "--rounds", "1",
                      "--warmup", "0", "--out", str(out), cwd=tmp_path)
    assert rows and out.is_file()


def test_bench_solvers_quick(tmp_path):
    rows = run_script("bench_solvers.py", "--quick", cwd=tmp_path)
    assert rows


def test_dense_baselines_small(tmp_path):
    rows = run_script("dense_baselines.py", "--n-train", "16", "--n-test", "8", "--size", "16", cwd=tmp_path)
    assert rows


def test_bench_gpu_runs_its_checks_on_a_cpu(tmp_path):
    out = run_script("bench_gpu.py", "--device", "cpu", "--quick", cwd=tmp_path)
    assert [r.get("precision") for r in out if r["check"] == "throughput"] == ["32-true", "bf16-mixed"]
    rows = {r["check"]: r for r in out}
    assert set(rows) == {"throughput", "mixed_precision", "compile", "host_syncs", "deterministic_metrics"}
    assert rows["host_syncs"]["ew"]["dispatcher_syncs_per_step"] == 1  # a plain DataLoader: one read checks every label
    assert all(r["status"] == "ok" for k, r in rows["deterministic_metrics"].items() if k != "check")
    assert rows["mixed_precision"]["upgrad_representation"]["finite"]
    assert rows["compile"]["ew"]["status"] in ("ok", "error")
