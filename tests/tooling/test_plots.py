"""mtl-plot on hand-made metrics.csv / results.json: files written and non-empty, the math checked."""

import math

import pytest

pytest.importorskip("matplotlib")

from tooling_helpers import write_run

from mtl.plots import cosine_matrix, main, pareto_front, plot_dir, read_metrics

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
