"""A newcomer's path with their own CSV file: the README command, label coding, target scaling,
and predictions for new rows with ``mtl-predict``."""

from __future__ import annotations

import csv
import json
import subprocess

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import CONF, PYTHON, cli_env
from mtl.data import CSVDataModule
from mtl.predict import predict_csv, write_table

FAST = [
    "trainer.limit_train_batches=4", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "logger=none",
]
COLOURS = ("red", "green", "blue")


def write_rows(path, header, rows):
    path.write_text("\n".join(",".join(map(str, r)) for r in [header, *rows]) + "\n")
    return path


def shop_rows(n: int, seed: int = 0, shift: float = 0.0, scale: float = 1.0):
    """Features a, b, c and three targets: price (mean about 1000, std about 50), churn (no/yes),
    colour (red/green/blue)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        a, b, c = rng.normal(size=3) * scale + shift
        price = 1000 + 35 * a + 35 * b
        rows.append([a, b, c, price, "yes" if a > 0 else "no", COLOURS[int(b > 0) + int(c > 0)]])
    return rows


HEADER = ["a", "b", "c", "price", "churn", "colour"]


def compose_train(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def run_cli(*args, cwd, ok=True):
    proc = subprocess.run([PYTHON, *args], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == ok, out[-3000:]
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model trained in-process on the three shop tasks: ``(checkpoint, results, directory)``."""
    from mtl.train import train

    root = tmp_path_factory.mktemp("shop")
    data = write_rows(root / "shop.csv", HEADER, shop_rows(400))
    cfg = compose_train(
        "data=csv", f"data.path={data}", "+data.tasks.price={kind: regression}", "+data.tasks.churn={kind: binary}",
        "+data.tasks.colour={kind: multiclass}", "data.batch_size=32", "trainer.max_epochs=4",
        f"paths.output_dir={root / 'run'}", *FAST,
    )
    _, results = train(cfg, root / "run", log=lambda m: None)
    GlobalHydra.instance().clear()
    return root / "run/stages/train/checkpoints/best.ckpt", results, root


# ------------------------------------------------------------------------------ the README command
def test_the_readme_command_trains_on_a_csv_file(tmp_path):
    write_rows(tmp_path / "my.csv", HEADER[:5], [r[:5] for r in shop_rows(120)])
    out = run_cli(
        "-m", "mtl.train", "data=csv", "data.path=my.csv", "+data.tasks.price={kind: regression}",
        "+data.tasks.churn={kind: binary}", f"hydra.run.dir={tmp_path}/run", "trainer.max_epochs=1", *FAST,
        cwd=tmp_path,
    )
    results = json.loads((tmp_path / "run/results.json").read_text())
    assert "Final metrics" in out and list(results["stages"]) == ["train"]
    assert set(results["stages"]["train"]["tasks"]) == {"price", "churn"}
    assert results["config"]["backbone"]["_target_"] == "mtl.backbones.MLP"


def test_data_csv_selects_an_mlp_and_one_stage_and_the_command_line_wins():
    cfg = compose_train("data=csv", "data.path=x.csv")
    assert cfg.backbone._target_ == "mtl.backbones.MLP" and cfg.schedule.name == "multitask"
    cfg = compose_train("data=csv", "data.path=x.csv", "backbone=cnn", "schedule=transfer")
    assert cfg.backbone._target_ == "mtl.backbones.CNN" and cfg.schedule.name == "transfer"
    cfg = compose_train()  # other data keep the defaults
    assert cfg.backbone._target_ == "mtl.backbones.CNN" and cfg.schedule.name == "combined"
    GlobalHydra.instance().clear()


def test_a_transfer_schedule_without_roles_says_to_name_the_sources(tmp_path):
    from mtl.train import build_runner

    data = write_rows(tmp_path / "my.csv", HEADER[:5], [r[:5] for r in shop_rows(60)])
    base = ["data=csv", f"data.path={data}", "+data.tasks.price={kind: regression}", "+data.tasks.churn={kind: binary}",
            f"paths.output_dir={tmp_path / 'run'}"]
    with pytest.raises(ValueError, match=r"data\.source_tasks.*schedule=multitask"):
        build_runner(compose_train(*base, "schedule=combined", *FAST), tmp_path / "run")
    # with the roles named, the same schedule is accepted
    cfg = compose_train(*base, "schedule=transfer", "data.source_tasks=[price]", "data.target_tasks=[churn]", *FAST)
    runner = build_runner(cfg, tmp_path / "run2")
    assert [st.tasks for st in runner.stages] == [["price"], ["churn"]]
    GlobalHydra.instance().clear()


# ------------------------------------------------------------------------------ label coding
def test_num_classes_and_class_names_are_inferred_from_the_columns(tmp_path):
    rows = [[i * 0.1, i % 4, COLOURS[i % 3], ["no", "yes"][i % 2], [3, 7][i % 2]] for i in range(40)]
    path = write_rows(tmp_path / "d.csv", ["f", "code", "colour", "churn", "odd"], rows)
    dm = CSVDataModule(path=str(path), tasks={
        "code": {"kind": "multiclass"}, "colour": {"kind": "multiclass"},
        "churn": {"kind": "binary"}, "odd": {"kind": "binary"},
    })
    t = dm.tasks
    assert (t["code"].num_classes, t["code"].class_names) == (4, None)  # integer codes stay codes
    assert (t["colour"].num_classes, t["colour"].class_names) == (3, ["blue", "green", "red"])
    assert t["churn"].class_names == ["no", "yes"] and t["odd"].class_names == ["3", "7"]
    dm.setup()
    full = {name: torch.cat([dm.splits[s].labels[name] for s in ("train", "val", "test")]) for name in t}
    assert set(full["colour"].tolist()) == {0, 1, 2} and set(full["churn"].tolist()) == {0.0, 1.0}
    # the checkpoint's task spec keeps the names
    assert t["colour"].to_dict()["class_names"] == ["blue", "green", "red"]


def test_label_columns_that_cannot_be_coded_are_refused(tmp_path):
    rows = [[i, COLOURS[i % 3]] for i in range(20)]
    path = write_rows(tmp_path / "d.csv", ["f", "colour"], rows)
    with pytest.raises(ValueError, match=r"data.tasks.colour: column 'colour' .* has 3 distinct label\(s\).*binary target needs two.*multiclass"):
        CSVDataModule(path=str(path), tasks={"colour": {"kind": "binary"}})
    with pytest.raises(ValueError, match=r"has 3 distinct labels .* but num_classes is 4. Drop num_classes"):
        CSVDataModule(path=str(path), tasks={"colour": {"kind": "multiclass", "num_classes": 4}})


def test_regression_targets_are_standardised_with_the_training_split(tmp_path):
    path = write_rows(tmp_path / "d.csv", HEADER[:4], [r[:4] for r in shop_rows(200)])
    dm = CSVDataModule(path=str(path), tasks={"price": {"kind": "regression"}})
    dm.setup()
    y = dm.splits["train"].labels["price"]
    task = dm.tasks["price"]
    assert task.target_mean == pytest.approx(float(y.double().mean()))
    assert task.target_std == pytest.approx(float(y.double().std(unbiased=False)))
    assert float(y.mean()) > 900  # the data keeps the raw targets; the task's loss standardises them


def test_a_checkpoints_preprocessing_is_pinned_and_a_changed_file_is_refused(tmp_path):
    a = write_rows(tmp_path / "a.csv", HEADER[:4], [r[:4] for r in shop_rows(60)])
    b = write_rows(tmp_path / "b.csv", HEADER[:4], [r[:4] for r in shop_rows(60, seed=1, shift=5)])
    dm = CSVDataModule(path=str(a), tasks={"price": {"kind": "regression"}})
    dm.setup()
    state = dm.state_dict()
    assert state["features"] == ["a", "b", "c"] and len(state["feature_mean"]) == 3
    pinned = CSVDataModule(path=str(b), tasks={"price": {"kind": "regression"}})
    pinned.load_state_dict(state)  # before setup: b is read with a's statistics
    pinned.setup()
    assert pinned.feature_mean == state["feature_mean"]
    changed = CSVDataModule(path=str(b), tasks={"price": {"kind": "regression"}})
    changed.setup()
    with pytest.raises(ValueError, match=r"data.path: the features of .*b.csv.* do not match the checkpoint"):
        changed.load_state_dict(state)


# ------------------------------------------------------------------------------ training and predicting
def test_regression_is_reported_and_predicted_in_the_targets_units(trained):
    ckpt, results, root = trained
    test = results["stages"]["train"]["tasks"]["price"]["test"]
    # the targets are about 1000 +- 50: an unstandardised head starting near 0 would be ~1000 off
    assert test["mae"] < 150 and test["rmse"] < 200
    new = write_rows(root / "new.csv", ["a", "b", "c"], [r[:3] for r in shop_rows(50, seed=3)])
    header, rows = predict_csv(ckpt, new)
    prices = np.array([r[header.index("price")] for r in rows], dtype=float)
    assert abs(prices.mean() - 1000) < 150 and prices.std() > 5


def test_string_labels_come_back_by_name_through_mtl_predict(trained, tmp_path):
    ckpt, _, root = trained
    new = write_rows(tmp_path / "new.csv", ["id", "c", "b", "a"], [[f"r{i}", *r[:3][::-1]] for i, r in enumerate(shop_rows(30, seed=4))])
    out = run_cli("-m", "mtl.predict", f"ckpt_path={ckpt}", "data.path=new.csv", "out=preds.csv", "prob=true",
                  "keep=[id]", cwd=tmp_path)
    assert "Predictions: preds.csv" in out and "GPU available" not in out and "Tip" not in out
    with (tmp_path / "preds.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(30)]  # the input's order
    assert {r["churn"] for r in rows} <= {"no", "yes"} and {r["colour"] for r in rows} <= set(COLOURS)
    assert len({r["churn"] for r in rows}) == 2  # a trained model, not a constant
    probs = np.array([[float(r[f"colour_prob_{c}"]) for c in ("blue", "green", "red")] for r in rows])
    assert np.allclose(probs.sum(1), 1, atol=1e-5) and all(0 <= float(r["churn_prob"]) <= 1 for r in rows)
    assert sorted(tmp_path.iterdir()) == [tmp_path / "new.csv", tmp_path / "preds.csv"]  # nothing else written


def test_new_rows_are_standardised_with_the_training_statistics(trained, tmp_path):
    ckpt, _, _ = trained
    few = [r[:3] for r in shop_rows(3, seed=5)]
    far = [r[:3] for r in shop_rows(40, seed=6, shift=50, scale=10)]  # other statistics entirely
    alone = predict_csv(ckpt, write_rows(tmp_path / "few.csv", ["a", "b", "c"], few))
    mixed = predict_csv(ckpt, write_rows(tmp_path / "mixed.csv", ["a", "b", "c"], far + few))
    assert alone[0] == mixed[0]
    price = alone[0].index("price")
    for one, other in zip(alone[1], mixed[1][len(far):]):  # the same rows, the same predictions
        assert one[price] == pytest.approx(other[price], rel=1e-5)
        assert one[:price] + one[price + 1:] == other[:price] + other[price + 1:]


def test_a_missing_feature_column_is_named_and_nothing_is_written(trained, tmp_path):
    ckpt, _, _ = trained
    write_rows(tmp_path / "new.csv", ["a", "c", "price"], [[1, 2, 3]])
    out = run_cli("-m", "mtl.predict", f"ckpt_path={ckpt}", "data.path=new.csv", "out=preds.csv", cwd=tmp_path, ok=False)
    assert "data.path: 'new.csv' has no column(s) ['b']" in out and "Traceback" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.csv"]  # no output, no Hydra directory, no log


def test_a_failed_prediction_leaves_an_existing_output_untouched(trained, tmp_path):
    ckpt, _, _ = trained
    rows = [r[:3] for r in shop_rows(10, seed=7)]
    rows[6][1] = "oops"
    bad = write_rows(tmp_path / "bad.csv", ["a", "b", "c"], rows)
    (tmp_path / "preds.csv").write_text("previous\n")
    from mtl.predict import predict
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"ckpt_path": str(ckpt), "data": {"path": str(bad)}, "out": str(tmp_path / "preds.csv")})
    with pytest.raises(ValueError, match=r"column 'b' of .*bad.csv is not numeric \(row 8: 'oops'\)"):
        predict(cfg)
    assert (tmp_path / "preds.csv").read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "preds.csv"]


def test_the_table_is_written_whole_or_not_at_all(tmp_path):
    write_table(tmp_path / "t.csv", ["x", "y"], [[1, 0.5], [2, "a"]])
    assert (tmp_path / "t.csv").read_text().splitlines() == ["x,y", "1,0.5", "2,a"]

    class Boom:
        def __format__(self, spec):  # noqa: D105
            raise RuntimeError("boom")

        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_table(tmp_path / "t.csv", ["x"], [[1], [Boom()]])
    assert (tmp_path / "t.csv").read_text().splitlines()[0] == "x,y" and len(list(tmp_path.iterdir())) == 1


def test_a_checkpoint_of_other_data_is_refused(tmp_path):
    ckpt = tmp_path / "digits.ckpt"
    torch.save({"mtl": {"tasks": {}}, "mtl_run": {"data": {"_target_": "mtl.data.MultiDigitsDataModule"}}}, ckpt)
    new = write_rows(tmp_path / "new.csv", ["a"], [[1]])
    with pytest.raises(ValueError, match=r"trained on mtl.data.MultiDigitsDataModule, not on a CSV file.*mtl-eval"):
        predict_csv(ckpt, new)


def test_mtl_eval_on_another_csv_codes_and_scales_it_as_training_did(trained, tmp_path):
    """config_from=command data.path=<another labelled file>: the checkpoint's feature scaling, label
    coding and target scale are used, not estimated again from that file."""
    from mtl.eval import evaluate
    from mtl.transfer.loading import load_checkpoint

    ckpt, results, _ = trained
    # other statistics, and only two of the three colours (a fresh coding would renumber them)
    rows = [r for r in shop_rows(200, seed=3, shift=2.0, scale=1.5) if r[5] != "red"]
    other = write_rows(tmp_path / "other.csv", HEADER, rows)
    saved = load_checkpoint(ckpt, "ckpt")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("eval", overrides=[
            f"ckpt_path={ckpt}", "config_from=command", "data=csv", f"data.path={other}",
            "+data.tasks.price={kind: regression}", "+data.tasks.churn={kind: binary}",
            "+data.tasks.colour={kind: multiclass}", "out_dir=" + str(tmp_path / "eval"),
        ])
    GlobalHydra.instance().clear()
    import mtl.eval as mtl_eval

    built = []
    original = mtl_eval.instantiate_data
    mtl_eval.instantiate_data = lambda node: built.append(original(node)) or built[-1]
    try:
        out = evaluate(cfg)
    finally:
        mtl_eval.instantiate_data = original
    dm = built[0]
    assert dm.state_dict()["feature_mean"] == saved["CSVDataModule"]["feature_mean"]
    spec = saved["mtl"]["tasks"]
    assert dm.tasks["colour"].class_names == spec["colour"]["class_names"] == ["blue", "green", "red"]
    assert dm.tasks["price"].target_mean == spec["price"]["target_mean"]
    assert 0 < out["stages"]["eval"]["tasks"]["price"]["test"]["mae"] < 500  # in the column's units
