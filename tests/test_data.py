import numpy as np
import pytest
import torch

from mtl.data import (
    CombinedDataModule,
    CSVDataModule,
    DigitsDataModule,
    MultiDigitsDataModule,
    SyntheticDataModule,
    make_synthetic,
)
from mtl.data.base import stratified_split


def test_stratified_split_is_deterministic_disjoint_and_stratified():
    y = np.repeat(np.arange(4), 50)
    a = stratified_split(y, (0.6, 0.2, 0.2), seed=3)
    b = stratified_split(y, (0.6, 0.2, 0.2), seed=3)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert sum(len(p) for p in a) == 200 and len(np.unique(np.concatenate(a))) == 200
    assert [int((y[a[0]] == c).sum()) for c in range(4)] == [30, 30, 30, 30]
    assert not np.array_equal(a[0], stratified_split(y, (0.6, 0.2, 0.2), seed=4)[0])


def test_digits_tasks_and_transfer_pair():
    dm = DigitsDataModule(tasks={"low": {"num_classes": 5}, "high": {"num_classes": 5}, "parity": {"num_classes": 2}})
    dm.setup()
    train = dm.splits["train"]
    low, high = train.labels["low"], train.labels["high"]
    assert ((low == -100) ^ (high == -100)).all()  # every image is in exactly one of the two
    dm.select_tasks(["high"])
    assert (dm.dataset("train").labels["high"] != -100).all()  # only high-labelled images train
    x, ys = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (1, 8, 8) and list(ys) == ["high"]


def test_unknown_data_task_lists_available():
    with pytest.raises(ValueError, match=r"no task\(s\) \['colour'\]; available"):
        DigitsDataModule(tasks={"colour": {"num_classes": 3}})


def test_multidigits_labels_and_no_test_digit_in_training():
    dm = MultiDigitsDataModule(n_train=300, n_val=50, n_test=50, seed=1)
    dm.setup()
    train = dm.splits["train"]
    assert train.x.shape == (300, 1, 10, 14)
    assert torch.equal(train.labels["sum"], train.labels["left"] + train.labels["right"])
    assert set(dm.source_index["test"].ravel()).isdisjoint(dm.source_index["train"].ravel())
    again = MultiDigitsDataModule(n_train=300, n_val=50, n_test=50, seed=1)
    again.setup()
    assert torch.equal(again.splits["train"].x, train.x)


def test_label_budget_and_source_target_batches():
    dm = MultiDigitsDataModule(n_train=400, n_val=50, n_test=50, label_budget={"sum": 30}, batch_size=16)
    dm.setup()
    assert int((dm.splits["train"].labels["sum"] != -100).sum()) == 30
    dm.select_tasks(["sum"])
    assert len(dm.dataset("train")) == 30
    dm.select_tasks(["sum"], ["left", "right"])
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == 2  # one pass over the 30 target-labelled images in batches of 16
    batch = batches[0][0] if isinstance(batches[0], tuple) else batches[0]
    assert set(batch) == {"target", "source"}
    assert list(batch["target"][1]) == ["sum"] and list(batch["source"][1]) == ["left", "right"]
    with pytest.raises(ValueError, match="label_budget names task 'nope'"):
        MultiDigitsDataModule(label_budget={"nope": 3})


def test_synthetic_correlation_controls_label_correlation():
    def corr(p):
        _, y = make_synthetic(4000, 2, p, seed=0)
        return np.corrcoef(y[:, 0], y[:, 1])[0, 1]

    assert corr(1.0) > 0.99
    assert corr(0.9) > corr(0.5) > corr(0.0)
    dm = SyntheticDataModule(num_tasks=3, correlation=0.5, n_train=100, n_val=20, n_test=20)
    dm.setup()
    assert list(dm.tasks) == ["t0", "t1", "t2"] and dm.splits["train"].x.shape == (100, 100)


def _write_csv(path, rows):
    path.write_text("\n".join(",".join(map(str, r)) for r in rows) + "\n")


def test_csv_data(tmp_path):
    rows = [["f1", "f2", "colour", "price"]]
    rng = np.random.default_rng(0)
    for i in range(60):
        rows.append([rng.normal(), rng.normal() * 10 + 5, ["red", "blue"][i % 2], "" if i % 3 == 0 else i * 0.5])
    _write_csv(tmp_path / "d.csv", rows)
    dm = CSVDataModule(
        path=str(tmp_path / "d.csv"),
        tasks={"colour": {"kind": "multiclass", "num_classes": 2}, "price": {"kind": "regression"}},
    )
    dm.setup()
    train = dm.splits["train"]
    assert dm.feature_columns == ["f1", "f2"]
    assert abs(float(train.x[:, 1].mean())) < 1e-5  # standardised on the training split
    assert set(train.labels["colour"].tolist()) <= {0, 1}
    assert torch.isnan(train.labels["price"]).any()  # missing targets stay missing


def test_csv_errors_name_the_column(tmp_path):
    _write_csv(tmp_path / "d.csv", [["f1", "f2", "y"], [1, "abc", 0], [2, 3, 1]])
    with pytest.raises(ValueError, match="column 'nope'"):
        CSVDataModule(path=str(tmp_path / "d.csv"), tasks={"y": {"num_classes": 2}}, features=["f1", "nope"])
    dm = CSVDataModule(path=str(tmp_path / "d.csv"), tasks={"y": {"num_classes": 2}})
    with pytest.raises(ValueError, match="column 'f2' .* is not numeric"):
        dm.setup()
    with pytest.raises(ValueError, match=r"'zzz'"):
        CSVDataModule(path=str(tmp_path / "d.csv"), tasks={"zzz": {"num_classes": 2}})
    with pytest.raises(FileNotFoundError, match="data.path"):
        CSVDataModule(path=str(tmp_path / "missing.csv"), tasks={"y": {"num_classes": 2}})


def test_csv_bad_inputs_name_the_file_and_what_to_do(tmp_path):
    _write_csv(tmp_path / "one.csv", [["f1", "y"], [1.0, 0]])
    dm = CSVDataModule(path=str(tmp_path / "one.csv"), tasks={"y": {"num_classes": 2}})
    with pytest.raises(ValueError, match=r"one.csv' has 1 data row\(s\); data.split=\[0.7, 0.15, 0.15\] leaves the \['val', 'test'\] split\(s\) empty. It needs at least 6 rows"):
        dm.setup()
    _write_csv(tmp_path / "dup.csv", [["f1", "f2", "f1", "y"], [1, 2, 3, 0]])
    with pytest.raises(ValueError, match=r"dup.csv' has duplicate column name\(s\) \['f1'\].*Rename them"):
        CSVDataModule(path=str(tmp_path / "dup.csv"), tasks={"y": {"num_classes": 2}})


def test_label_budgets_are_checked():
    with pytest.raises(ValueError, match=r"data.label_budget.sum=-5: a label budget is the number of labelled training examples"):
        MultiDigitsDataModule(n_train=64, n_val=16, n_test=16, label_budget={"sum": -5})
    dm = MultiDigitsDataModule(n_train=64, n_val=16, n_test=16, label_budget={"sum": 65})
    with pytest.raises(ValueError, match=r"data.label_budget.sum=65 is more than the 64 training examples labelled for 'sum'.*=null"):
        dm.setup()
    dm = MultiDigitsDataModule(n_train=64, n_val=16, n_test=16, label_budget={"sum": None})  # null: keep all
    dm.setup()
    assert int((dm.splits["train"].labels["sum"] != -100).sum()) == 64


def test_combined_datasets_one_batch_each():
    dm = CombinedDataModule(
        {
            "digits": DigitsDataModule(tasks={"digit": {"num_classes": 10}}, batch_size=8),
            "pairs": MultiDigitsDataModule(n_train=64, n_val=16, n_test=16, batch_size=8),
        }
    )
    dm.setup()
    dm.select_tasks(["digit", "sum"])
    batch = next(iter(dm.train_dataloader()))
    batch = batch[0] if isinstance(batch, tuple) else batch
    assert set(batch) == {"digits/target", "pairs/target"}
    assert list(batch["digits/target"][1]) == ["digit"] and list(batch["pairs/target"][1]) == ["sum"]
    assert dm.input_shape == (1, -1, -1)
    with pytest.raises(ValueError, match="declared by datasets"):
        CombinedDataModule({"a": DigitsDataModule(), "b": DigitsDataModule()})
