"""mtl-report on hand-made results: grouping by overrides, mean ± std, Δm, failed jobs."""

import csv
import json
import math

import pytest
from tooling_helpers import write_run

from mtl.report import build_report, delta_m, main, report_markdown
from mtl.results import task_metrics

DATA = {"_target_": "x.Data", "seed": 0, "n_train": 10}
BACKBONE = {"_target_": "x.MLP", "hidden": [4]}


def config(seed, schedule="multitask"):
    return {"seed": seed, "data": {**DATA, "seed": seed}, "backbone": BACKBONE, "schedule": {"name": schedule},
            "paths": {"output_dir": f"/somewhere/{seed}"}}


@pytest.fixture
def sweep(tmp_path):
    """Two seeds of a method, two seeds of its single-task baseline, two failed jobs."""
    base = ["data.n_train=10"]
    # method: a acc 0.8, 0.9 (mean 0.85); b mae 1.0, 1.2 (mean 1.1)
    for seed, (acc, mae) in enumerate([(0.8, 1.0), (0.9, 1.2)]):
        write_run(tmp_path / "sweep" / str(seed), {"train": {"a": {"acc": acc, "loss": 9.0}, "b": {"mae": mae}}},
                  base + ["balancer=pcgrad", f"seed={seed}"], config(seed))
    # baseline: one stage per task; a's earlier stage must be ignored (last stage containing a wins)
    for seed, acc in enumerate([0.75, 0.85]):
        write_run(tmp_path / "base" / str(seed),
                  {"warmup-a": {"a": {"acc": 0.1}}, "train-a": {"a": {"acc": acc, "loss": 1.0}},
                   "train-b": {"b": {"mae": 1.0}}},
                  base + ["baseline=single_task", f"seed={seed}"], config(seed), baseline="single_task")
    crashed = tmp_path / "sweep" / "2"
    (crashed / ".hydra").mkdir(parents=True)
    (crashed / ".hydra" / "overrides.yaml").write_text("- data.n_train=10\n- balancer=mgda\n- seed=0\n")
    (crashed / "train.log").write_text("[INFO] start\nTraceback (most recent call last):\n  x\nRuntimeError: boom in mgda\n")
    failed = tmp_path / "sweep" / "3"
    write_run(failed, {}, base + ["balancer=mgda", "seed=1"], status="failed", error="ValueError: bad value")
    return tmp_path


def test_delta_m_by_hand():
    method = {"a": {"acc": 0.85}, "b": {"mae": 1.1}}
    baseline = {"a": {"acc": 0.8}, "b": {"mae": 1.0}}
    # 100/2 * ((0.85 - 0.8)/0.8 - (1.1 - 1.0)/1.0) = 50 * (0.0625 - 0.1) = -1.875
    assert delta_m(method, baseline) == pytest.approx(-1.875)
    assert delta_m(baseline, baseline) == 0.0
    with pytest.raises(KeyError):
        delta_m({"c": {"acc": 1.0}}, baseline)


def test_last_stage_containing_the_task_wins():
    results = {"stages": {"s1": {"tasks": {"a": {"test": {"acc": 0.1}}}},
                          "s2": {"tasks": {"a": {"test": {"acc": 0.7}}, "b": {"test": {"mae": 2.0}}}}}}
    assert task_metrics(results) == {"a": {"acc": 0.7}, "b": {"mae": 2.0}}


def test_report_groups_seeds_and_computes_delta_m(sweep):
    report = build_report([sweep / "sweep", sweep / "base"])
    ok = {r["run"]: r for r in report.rows if r["status"] == "ok"}
    assert set(ok) == {"balancer=pcgrad", "baseline=single_task"}
    method = ok["balancer=pcgrad"]
    assert method["seeds"] == 2
    mean, std, n = method["cells"][("a", "acc")]
    assert (mean, n) == (pytest.approx(0.85), 2) and std == pytest.approx(math.sqrt(0.005))
    assert ("a", "loss") not in method["cells"]  # loss is left out unless asked for
    assert method["delta_m"] == pytest.approx(-1.875)
    assert method["baseline"] == "baseline=single_task"
    assert ok["baseline=single_task"]["cells"][("a", "acc")][0] == pytest.approx(0.8)
    failed = sorted(r["error"] for r in report.rows if r["status"] == "failed")
    assert failed == ["RuntimeError: boom in mgda", "ValueError: bad value"]
    assert all(r["run"] == "balancer=mgda" for r in report.rows if r["status"] == "failed")


def test_cli_writes_csv_and_markdown(sweep, capsys):
    assert main([str(sweep / "sweep"), str(sweep / "base"), "--out", str(sweep / "out" / "table")]) == 0
    printed = capsys.readouterr().out
    assert "0.8500 ± 0.0707" in printed and "-1.88" in printed and "boom in mgda" in printed
    md = (sweep / "out" / "table.md").read_text()
    assert "| balancer=pcgrad | ok | 2 | 0.8500 ± 0.0707 | 1.1000 ± 0.1414 | -1.88 |" in md
    rows = list(csv.DictReader((sweep / "out" / "table.csv").open()))
    method = next(r for r in rows if r["run"] == "balancer=pcgrad")
    assert float(method["delta_m_pct"]) == pytest.approx(-1.875)
    assert float(method["test/b/mae/mean"]) == pytest.approx(1.1)
    assert sum(r["status"] == "failed" for r in rows) == 2


def test_no_baseline_leaves_delta_m_blank_with_a_note(sweep):
    report = build_report([sweep / "sweep"])
    row = next(r for r in report.rows if r["status"] == "ok")
    assert row["delta_m"] is None and row["delta_m_text"] == ""
    assert any("no single-task baseline" in n for n in report.notes)
    assert "no single-task baseline" in report_markdown(report)


def test_baseline_must_match_data_backbone_and_schedule(tmp_path):
    write_run(tmp_path / "m" / "0", {"train": {"a": {"acc": 0.9}}}, ["seed=0"], config(0))
    write_run(tmp_path / "b" / "0", {"train-a": {"a": {"acc": 0.8}}}, ["baseline=single_task", "seed=0"],
              config(0, schedule="transfer"), baseline="single_task")
    report = build_report([tmp_path])
    row = next(r for r in report.rows if r["run"] != "baseline=single_task")
    assert row["delta_m"] is None
    assert any("same data, backbone and schedule" in n for n in report.notes)


def test_runs_without_overrides_group_by_config_minus_seed(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path / f"run{seed}", {"train": {"a": {"acc": 0.5 + seed / 10}}}, None, config(seed))
    write_run(tmp_path / "other", {"train": {"a": {"acc": 0.1}}}, None, {**config(0), "backbone": {"hidden": [9]}})
    report = build_report([tmp_path])
    seeds = sorted(r["seeds"] for r in report.rows)
    assert seeds == [1, 2]
    assert all(r["run"].startswith("config ") for r in report.rows)


def test_missing_dir_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nope")])


def test_cli_defaults_to_the_test_split_like_mtl_plot(tmp_path, capsys):
    from mtl.report import DEFAULT_SPLIT

    assert DEFAULT_SPLIT == "test"
    for seed, (val, test) in enumerate([(0.1, 0.7), (0.3, 0.9)]):
        job = write_run(tmp_path / "sweep" / str(seed), {"train": {"a": {"acc": 0.0}}}, [f"seed={seed}"])
        results = json.loads((job / "results.json").read_text())
        results["stages"]["train"]["tasks"]["a"] = {"val": {"acc": val}, "test": {"acc": test}}
        (job / "results.json").write_text(json.dumps(results))
    assert main([str(tmp_path / "sweep")]) == 0
    printed = capsys.readouterr().out
    assert "test split" in printed and "0.8000 ± 0.1414" in printed  # the test values, not val's 0.2000
    assert main([str(tmp_path / "sweep"), "--split", "val"]) == 0
    assert "0.2000 ± 0.1414" in capsys.readouterr().out
