"""mtl-plot on hand-made metrics.csv / results.json: files written and non-empty, the math checked."""

import math

import pytest

pytest.importorskip("matplotlib")

from tooling_helpers import write_run

from mtl.plots import cosine_matrix, main, pareto_front, plot_dir, read_metrics

def same(points, expected, rel=1e-9):
    """Whether two ``[(epoch, value)]`` lists hold the same points (values up to ``rel``)."""
    return len(points) == len(expected) and all(
        e == e2 and math.isclose(v, v2, rel_tol=rel, abs_tol=1e-12) for (e, v), (e2, v2) in zip(points, expected)
    )


HEADER = "epoch,step,train/loss,train/a/loss,train/b/loss,train/weight/a,train/weight/b,train/cos/a/b,val/a/loss,val/a/acc,val/b/loss,val/b/mae\n"


def write_metrics(run, cos_last=0.25):
    stage = run / "stages" / "train"
    stage.mkdir(parents=True)
    (stage / "metrics.csv").write_text(
        HEADER
        + "0,1,,,,,,,0.9,0.5,1.5,0.9\n"
        + "0,1,2.0,1.0,1.0,1.0,1.0,-0.5,,,,\n"
        + "1,3,,,,,,,0.7,0.6,1.2,0.8\n"
        + f"1,3,1.6,0.8,0.8,0.8,1.2,{cos_last},,,,\n"
    )


def test_read_metrics_and_cosine_matrix(tmp_path):
    write_metrics(tmp_path)
    m = read_metrics(tmp_path / "stages/train/metrics.csv")
    assert m["val/a/acc"] == [(0.0, 0.5), (1.0, 0.6)]
    assert m["train/weight/b"] == [(0.0, 1.0), (1.0, 1.2)]
    tasks, matrix = cosine_matrix(m)
    assert tasks == ["a", "b"] and matrix == [[1.0, 0.25], [0.25, 1.0]]   # the last epoch


def test_pareto_front_by_hand():
    points = [(0.9, 0.1), (0.5, 0.5), (0.4, 0.4), (0.1, 0.9), (0.5, 0.2)]
    assert pareto_front(points) == [0, 1, 3]
    # b an error (lower is better): (0.9, 0.1) is best on both, it dominates every other point
    assert pareto_front(points, maximize=(True, False)) == [0]


def test_plots_of_a_sweep_are_written_and_non_empty(tmp_path, capsys):
    for i, (acc, mae) in enumerate([(0.6, 0.8), (0.7, 0.9), (0.5, 0.95)]):
        run = write_run(tmp_path / "sweep" / str(i), {"train": {"a": {"acc": acc}, "b": {"mae": mae}}}, [f"x={i}"])
        write_metrics(run)
    assert main([str(tmp_path / "sweep")]) == 0
    printed = capsys.readouterr().out.split()
    expected = [tmp_path / "sweep" / str(i) / "plots" / f"train_{k}.png" for i in range(3) for k in ("curves", "weights", "cosine")]
    expected.append(tmp_path / "sweep" / "plots" / "pareto_a_b.png")
    for path in expected:
        assert str(path) in printed
        assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


def test_a_run_without_gradient_logs_has_no_cosine_plot(tmp_path):
    run = tmp_path / "run"
    stage = run / "stages" / "train"
    stage.mkdir(parents=True)
    (stage / "metrics.csv").write_text("epoch,step,train/a/loss,val/a/loss,val/a/acc\n0,1,1.0,,\n0,1,,0.9,0.5\n")
    names = sorted(p.name for p in plot_dir(run))
    assert names == ["train_curves.png"]


def test_nothing_to_plot_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        main([str(tmp_path)])


def test_dense_predictions_grid_is_a_png(tmp_path):
    import torch

    from mtl.plots import plot_dense_predictions
    from mtl.tasks import Task

    tasks = {"seg": Task("seg", kind="segmentation", num_classes=4), "depth": Task("depth", kind="depth"),
             "normal": Task("normal", kind="normal"), "cls": Task("cls", num_classes=2)}
    targets = {"seg": torch.randint(-1, 4, (2, 8, 8)), "depth": torch.rand(2, 1, 8, 8), "normal": torch.randn(2, 3, 8, 8),
               "cls": torch.tensor([0, 1])}
    targets["depth"][0, 0, 0] = 0.0
    outputs = {"seg": torch.randn(2, 4, 8, 8), "depth": torch.rand(2, 1, 8, 8), "normal": torch.randn(2, 3, 8, 8),
               "cls": torch.randn(2, 2)}
    out = plot_dense_predictions(torch.rand(2, 3, 8, 8), targets, outputs, tasks, tmp_path / "p.png", title="t")
    assert out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"
    assert plot_dense_predictions(torch.rand(2, 3, 8, 8), {"cls": targets["cls"]}, {"cls": outputs["cls"]}, tasks, tmp_path / "q.png") is None


def test_mtl_plot_predictions_of_a_scenes_run(make_cfg, tmp_path, capsys):
    from mtl.train import train

    cfg = make_cfg(
        "experiment=scenes_multitask", "data=scenes", "data.n_train=8", "data.n_val=4", "data.n_test=4",
        "data.size=16", "data.batch_size=4", "backbone=resnet", "backbone.width=4",
        "model.dense_head.hidden=4", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
    )
    train(cfg, tmp_path / "run")
    assert main([str(tmp_path / "run"), "--predictions", "3"]) == 0
    png = tmp_path / "run" / "plots" / "train_predictions.png"
    assert str(png) in capsys.readouterr().out.split()
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------- effective weights
def test_effective_weights_of_a_combined_stage_are_the_alpha_mix_by_hand():
    from mtl.plots import effective_weights

    metrics = {  # balancer weights (epoch means) and the logged alpha of two epochs
        "train/weight/t": [(0.0, 1.0), (1.0, 1.5)],
        "train/weight/s1": [(0.0, 1.0), (1.0, 0.5)],
        "train/weight/s2": [(0.0, 1.0), (1.0, 1.0)],
        "train/alpha": [(0.0, 0.8), (1.0, 0.2)],
    }
    w = effective_weights(metrics, ["t"], ["s1", "s2"], task_weights={"s1": 2.0})
    # target: b * (1 - alpha) * w_t / |T|; source: b * alpha * w_s / |S|
    assert same(w["t"], [(0.0, 1.0 * 0.2), (1.0, 1.5 * 0.8)])
    assert same(w["s1"], [(0.0, 1.0 * 0.8 * 2.0 / 2), (1.0, 0.5 * 0.2 * 2.0 / 2)])
    assert same(w["s2"], [(0.0, 0.8 / 2), (1.0, 1.0 * 0.2 / 2)])
    # without sources: the balancer's weight times the task's own weight
    w = effective_weights({"train/weight/a": [(0.0, 0.5)], "train/weight/b": [(0.0, 1.5)]}, ["a", "b"], task_weights={"b": 2.0})
    assert w == {"a": [(0.0, 0.5)], "b": [(0.0, 3.0)]}


def test_effective_weights_fall_back_to_the_alpha_schedule_and_say_when_they_cannot():
    from mtl.plots import effective_weights
    from mtl.transfer.alpha import AlphaSchedule

    schedule = AlphaSchedule(0.9, 0.1, "linear")  # 5 epochs: alpha 0.9, 0.7, 0.5, 0.3, 0.1
    metrics = {"train/loss": [(0.0, 1.0), (2.0, 1.0)]}  # a static sum (no balancer weights), no train/alpha
    w = effective_weights(metrics, ["t"], ["s"], alpha=lambda e: schedule.at(e, 5), balancer_weights=False)
    assert same(w["t"], [(0.0, 0.1), (2.0, 0.5)])
    assert same(w["s"], [(0.0, 0.9), (2.0, 0.5)])
    with pytest.raises(ValueError, match="train/alpha"):
        effective_weights({"train/weight/t": [(0.0, 1.0)], "train/weight/s": [(0.0, 1.0)]}, ["t"], ["s"])


def write_stage(run, stage="finetune", policy=None, best_epoch=None, blocks=None, balancer=None):
    """A stage directory as the runner leaves it: fingerprint.json, result.json, a checkpoint."""
    import json

    import torch

    d = run / "stages" / stage
    d.mkdir(parents=True, exist_ok=True)
    node = {"name": stage, "tasks": ["t"], "source_tasks": ["s1", "s2"], "alpha": 0.9, "alpha_end": 0.1,
            "alpha_schedule": "linear", "max_epochs": 5, "policy": policy,
            "balancer": balancer or {"method": {"_target_": "mtl.balancing.EW"}}}
    data = {"tasks": {"t": {"kind": "multiclass"}, "s1": {"kind": "multiclass", "weight": 2.0}, "s2": {"kind": "multiclass"}}}
    (d / "fingerprint.json").write_text(json.dumps({"stage": node, "data": data}))
    if best_epoch is not None:
        (d / "result.json").write_text(json.dumps({"stage": stage, "target_tasks": ["t"], "source_tasks": ["s1", "s2"],
                                                   "best_epoch": best_epoch}))
    if blocks is not None:
        (d / "checkpoints").mkdir()
        state = {f"model.sharing.backbone.stages.{i}.conv.weight": torch.zeros(1) for i in range(blocks)}
        torch.save({"state_dict": {**state, "model.heads.t.0.weight": torch.zeros(1)}}, d / "checkpoints" / "best.ckpt")
    return d


def test_stage_effective_weights_read_roles_alpha_and_task_weights_from_the_stage_dir(tmp_path):
    from mtl.plots import read_stage_info, stage_effective_weights

    d = write_stage(tmp_path)
    (d / "metrics.csv").write_text(  # EW (weights 1) for epochs 0 and 2; alpha logged at epoch 0 only
        "epoch,step,train/alpha,train/weight/t,train/weight/s1,train/weight/s2\n"
        "0,1,0.9,1.0,1.0,1.0\n2,3,,1.0,1.0,1.0\n"
    )
    info = read_stage_info(tmp_path, "finetune")
    assert (info.targets, info.sources, info.task_weights) == (["t"], ["s1", "s2"], {"s1": 2.0})
    weights, what = stage_effective_weights(read_metrics(d / "metrics.csv"), info)
    assert "alpha mix" in what
    # epoch 2 of 5 on the linear schedule 0.9 -> 0.1: alpha 0.5
    assert same(weights["t"], [(0.0, 0.1), (2.0, 0.5)])
    assert same(weights["s1"], [(0.0, 0.9 * 2.0 / 2), (2.0, 0.5 * 2.0 / 2)])
    assert same(weights["s2"], [(0.0, 0.9 / 2), (2.0, 0.5 / 2)])


def test_effective_weights_of_a_real_combined_run(make_cfg, tmp_path):
    """The module's objective is sum_t (effective weight_t) * L_t: the logged train/loss checks it."""
    from mtl.plots import read_stage_info, stage_effective_weights, stage_markers
    from mtl.train import train

    cfg = make_cfg(
        "schedule=combined", "trainer.max_epochs=3", "data.label_budget=null",
        "schedule.stages.finetune.alpha=0.9", "schedule.stages.finetune.alpha_end=0.1",
        "schedule.stages.finetune.alpha_schedule=linear", "schedule.stages.finetune.max_epochs=3",
        "schedule.stages.finetune.policy.probe_epochs=1",
    )
    run = tmp_path / "run"
    train(cfg, run)
    metrics = read_metrics(run / "stages/finetune/metrics.csv")
    info = read_stage_info(run, "finetune")
    weights, _ = stage_effective_weights(metrics, info)
    assert same(weights["sum"], [(0.0, 0.1), (1.0, 0.5), (2.0, 0.9)], rel=1e-6)  # (1 - alpha) / 1; alpha logged in float32
    assert same(weights["left"], [(0.0, 0.45), (1.0, 0.25), (2.0, 0.05)], rel=1e-6)  # alpha / 2
    losses = {t: dict(metrics[f"train/{t}/loss"]) for t in weights}
    for epoch, total in metrics["train/loss"]:
        mixed = sum(dict(weights[t])[epoch] * losses[t][epoch] for t in weights)
        assert mixed == pytest.approx(total, rel=1e-4)
    markers = stage_markers(info, 3)
    assert markers["unfreeze"] == [1]  # ProbeThenFull(probe_epochs=1)
    assert markers["best"] == [info.best_epoch] and 0 <= info.best_epoch <= 2


# ---------------------------------------------------------------------------------------- markers
def test_unfreeze_epochs_are_asked_from_the_policy():
    from mtl.plots import unfreeze_epochs
    from mtl.transfer.policies import Full, GradualUnfreeze, LinearProbe, ProbeThenFull

    assert unfreeze_epochs(ProbeThenFull(probe_epochs=3), num_epochs=10, num_blocks=4) == [3]
    assert unfreeze_epochs(ProbeThenFull(probe_epochs=20), num_epochs=10, num_blocks=4) == []  # after the stage
    # top block at epoch 1, the next every 2 epochs: 3 blocks -> 1, 3, 5
    assert unfreeze_epochs(GradualUnfreeze(start_epoch=1, epochs_per_block=2), 10, 3) == [1, 3, 5]
    assert unfreeze_epochs(GradualUnfreeze(), 10, 3) == [1, 2]  # the top block trains from epoch 0
    assert unfreeze_epochs(Full(), 10, 3) == [] and unfreeze_epochs(LinearProbe(), 10, 3) == []
    assert unfreeze_epochs(None, 10, 3) == []


def test_backbone_blocks_are_counted_from_checkpoint_keys():
    from mtl.plots import count_backbone_blocks

    keys = ["model.sharing.backbone.stages.0.conv.weight", "model.sharing.backbone.stages.2.bn.bias",
            "model.backbone.stages.1.conv.weight", "model.heads.a.0.weight"]
    assert count_backbone_blocks(keys) == 3
    assert count_backbone_blocks(["model.heads.a.0.weight"]) is None


def test_stage_markers_best_and_unfreeze_epochs(tmp_path):
    from mtl.plots import read_stage_info, stage_markers

    policy = {"_target_": "mtl.transfer.policies.GradualUnfreeze", "start_epoch": 1, "epochs_per_block": 2}
    write_stage(tmp_path / "a", policy=policy, best_epoch=4, blocks=2)
    assert stage_markers(read_stage_info(tmp_path / "a", "finetune"), 10) == {"best": [4], "unfreeze": [1, 3]}
    write_stage(tmp_path / "b", policy=policy)  # still training (no result.json), no checkpoint: one block
    assert stage_markers(read_stage_info(tmp_path / "b", "finetune"), 10) == {"best": [], "unfreeze": [1]}
    write_stage(tmp_path / "c", best_epoch=0)  # no policy
    assert stage_markers(read_stage_info(tmp_path / "c", "finetune"), 10) == {"best": [0], "unfreeze": []}


def test_curves_and_weights_with_markers_are_written(tmp_path):
    policy = {"_target_": "mtl.transfer.policies.ProbeThenFull", "probe_epochs": 1}
    d = write_stage(tmp_path / "run", policy=policy, best_epoch=1, blocks=2)
    (d / "metrics.csv").write_text(
        "epoch,step,train/alpha,train/weight/t,train/weight/s1,train/weight/s2,train/t/loss,val/t/loss,val/t/acc\n"
        "0,1,0.9,1.0,1.0,1.0,1.0,,\n0,1,,,,,,0.9,0.5\n1,3,0.5,1.0,1.0,1.0,0.8,,\n1,3,,,,,,0.8,0.6\n"
    )
    names = sorted(p.name for p in plot_dir(tmp_path / "run"))
    assert names == ["finetune_curves.png", "finetune_weights.png"]
    for name in names:
        path = tmp_path / "run" / "plots" / name
        assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------- labels and split
def fake_sweep(root, val_test=None):
    """Jobs of `-m balancer=ew,pcgrad seed=0,1` (plus a shared override) and a job without overrides."""
    jobs = []
    for i, (balancer, seed) in enumerate([("ew", 0), ("ew", 1), ("pcgrad", 0), ("pcgrad", 1)]):
        job = write_run(root / str(i), {"train": {"a": {"acc": 0.5 + i / 10}, "b": {"mae": 1.0 - i / 10}}},
                        ["debug=limit", f"balancer={balancer}", f"seed={seed}"])
        jobs.append(job)
    write_run(root / "manual", {"train": {"a": {"acc": 0.1}, "b": {"mae": 2.0}}}, None)
    return jobs


def test_runs_are_labelled_by_the_overrides_that_differ(tmp_path):
    from mtl.plots import run_labels
    from mtl.report import find_runs

    fake_sweep(tmp_path / "sweep")
    runs = find_runs([tmp_path / "sweep"])
    labels = dict(zip((r.path.name for r in runs), run_labels(runs)))
    assert labels == {"0": "balancer=ew seed=0", "1": "balancer=ew seed=1", "2": "balancer=pcgrad seed=0",
                      "3": "balancer=pcgrad seed=1", "manual": "manual"}  # debug=limit is shared: left out
    # identical overrides in two jobs: the directory names keep the labels apart
    write_run(tmp_path / "twice" / "0", {"train": {"a": {"acc": 0.5}}}, ["x=1"])
    write_run(tmp_path / "twice" / "1", {"train": {"a": {"acc": 0.6}}}, ["x=1"])
    write_run(tmp_path / "twice" / "2", {"train": {"a": {"acc": 0.7}}}, ["x=2"])
    assert run_labels(find_runs([tmp_path / "twice"])) == ["x=1 (0)", "x=1 (1)", "x=2"]


def test_pareto_points_carry_the_override_labels(tmp_path):
    from mtl.plots import pareto_data
    from mtl.report import find_runs

    fake_sweep(tmp_path / "sweep")
    data = pareto_data(find_runs([tmp_path / "sweep"]))
    assert data.tasks == ("a", "b") and data.metrics == ("acc", "mae") and data.maximize == (True, False)
    by_label = dict(zip(data.labels, data.points))
    assert by_label["balancer=pcgrad seed=1"] == pytest.approx((0.8, 0.7))
    assert by_label["manual"] == pytest.approx((0.1, 2.0))


def test_report_and_plots_default_to_the_same_split(tmp_path):
    import inspect
    import json

    from mtl.plots import build_parser, pareto_data, plot_dir, plot_pareto
    from mtl.report import DEFAULT_SPLIT, build_report, find_runs

    assert DEFAULT_SPLIT == "test"
    assert build_parser().parse_args(["x"]).split == DEFAULT_SPLIT
    for fn in (plot_pareto, plot_dir, pareto_data, build_report):
        assert inspect.signature(fn).parameters["split"].default == DEFAULT_SPLIT
    # runs whose val and test metrics differ: both tools read test by default
    for i, (val, test) in enumerate([(0.1, 0.7), (0.2, 0.8)]):
        job = write_run(tmp_path / "sweep" / str(i), {"train": {"a": {"acc": 0.0}, "b": {"acc": 0.0}}}, [f"seed={i}"])
        results = json.loads((job / "results.json").read_text())
        for t in ("a", "b"):
            results["stages"]["train"]["tasks"][t] = {"val": {"acc": val}, "test": {"acc": test}}
        (job / "results.json").write_text(json.dumps(results))
    data = pareto_data(find_runs([tmp_path / "sweep"]))
    assert same(sorted(data.points), [(0.7, 0.7), (0.8, 0.8)])
    row = next(r for r in build_report([tmp_path / "sweep"]).rows if r["status"] == "ok")
    assert row["cells"][("a", "acc")][0] == pytest.approx(0.75)


# ---------------------------------------------------------------------------------------- heatmap
def test_heatmap_text_colour_contrasts_with_the_cell():
    import matplotlib

    from mtl.plots import relative_luminance, text_colour

    assert relative_luminance((1.0, 1.0, 1.0)) == pytest.approx(1.0)
    assert relative_luminance((0.0, 1.0, 0.0)) == pytest.approx(0.7152)
    assert text_colour((1.0, 1.0, 1.0)) == "black" and text_colour((0.0, 0.0, 0.0)) == "white"
    cmap = matplotlib.colormaps["RdBu_r"]
    assert text_colour(cmap(0.5)) == "black"   # cosine 0: a near-white cell
    assert text_colour(cmap(1.0)) == "white"   # cosine 1: dark red
    assert text_colour(cmap(0.0)) == "white"   # cosine -1: dark blue
    assert text_colour((0.9, 0.6, 0.5, 1.0)) == "black"  # a light salmon (alpha ignored)


def test_a_ten_task_heatmap_is_written(tmp_path):
    from mtl.plots import plot_cosine_heatmap

    tasks = [f"task{i}" for i in range(10)]
    metrics = {f"train/cos/{a}/{b}": [(0.0, (i - j) / 10)] for i, a in enumerate(tasks) for j, b in enumerate(tasks) if i < j}
    out = plot_cosine_heatmap(metrics, tmp_path / "cos.png")
    assert out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"
