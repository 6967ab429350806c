from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from mtl import MultiTaskModel, MultiTaskModule, Task
from mtl.backbones import CNN, MLP
from mtl.transfer.alpha import mixing_weights
from mtl.transfer.policies import ProbeThenFull


class TwoTaskData(Dataset):
    """x [N, 8]; a: 3 classes from the signs of x0, x1; b: regression on x2, x3."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.a = (self.x[:, 0] > 0).long() + (self.x[:, 1] > 0).long()
        self.b = 2 * self.x[:, 2] + self.x[:, 3]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], {"a": self.a[i], "b": self.b[i]}


class Batches:
    """A fixed list of batches as one iterable (a plain list would read as several dataloaders)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def trainer(**kw):
    opts = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False)
    opts.update(kw)
    return pl.Trainer(**opts)


def test_readme_library_snippet_runs_and_learns():
    torch.manual_seed(0)  # the loader shuffles and the model draws its weights
    train_loader = DataLoader(TwoTaskData(512), batch_size=32, shuffle=True)
    val_loader = DataLoader(TwoTaskData(256, seed=1), batch_size=64)
    # --- the README's snippet, as written ---
    import pytorch_lightning as pl
    from mtl import Task, MultiTaskModel, MultiTaskModule
    from mtl.backbones import MLP

    tasks = [Task("a", kind="multiclass", num_classes=3), Task("b", kind="regression")]
    model = MultiTaskModel(backbone=MLP(input_shape=(8,), hidden=[32]), tasks=tasks)
    module = MultiTaskModule(model, tasks=tasks)          # sensible default optimizer
    trainer = pl.Trainer(max_epochs=15, accelerator="cpu")
    trainer.fit(module, train_loader, val_loader)       # batches are (x, {"a": y_a, "b": y_b})
    # ---
    m = trainer.callback_metrics
    assert m["val/a/acc"] > 0.6  # chance is ~0.4 (the middle class holds half the data)
    assert m["val/b/mae"] < 1.0  # predicting the mean gives ~1.8
    for key in ("train/a/loss", "train/b/loss", "val/loss", "val/a/f1", "val/b/rmse"):
        assert key in m


def test_mixing_weights_alpha():
    weights = {n: 1.0 for n in "abc"}
    assert mixing_weights(weights, ["a", "b"]) == {"a": 1.0, "b": 1.0}
    w = mixing_weights(weights, ["c"], ["a", "b"], alpha=0.2)
    assert w == pytest.approx({"c": 0.8, "a": 0.1, "b": 0.1})
    # a task's own weight scales its share
    assert mixing_weights({"a": 2.0, "b": 1.0, "c": 1.0}, ["c"], ["a", "b"], alpha=0.5) == pytest.approx({"c": 0.5, "a": 0.5, "b": 0.25})


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9])
def test_combined_loss_is_alpha_mix(alpha):
    tasks = {n: Task(n, num_classes=2) for n in "abc"}
    model = MultiTaskModel(MLP(input_shape=(4,), hidden=[8]), tasks)
    module = MultiTaskModule(model, tasks=["c"], source_tasks=["a", "b"], alpha=alpha)
    # the sources' mean loss (3) differs from the target's (2), so the mix depends on alpha
    losses = {"a": torch.tensor(1.0), "b": torch.tensor(5.0), "c": torch.tensor(2.0)}
    assert module.loss_vector(losses).sum().item() == pytest.approx(alpha * 3.0 + (1 - alpha) * 2.0)


def test_frozen_backbone_stays_bit_identical_then_trains():
    tasks = [Task("a", num_classes=3), Task("b", kind="regression")]
    model = MultiTaskModel(CNN(input_shape=(1, 8, 8), channels=[4, 8]), tasks)
    x = torch.randn(64, 1, 6, 6)
    data = Batches([(x[i : i + 16], {"a": torch.randint(0, 3, (16,)), "b": torch.randn(16)}) for i in range(0, 64, 16)])
    module = MultiTaskModule(model, policy=ProbeThenFull(probe_epochs=2, backbone_lr_scale=1.0))
    backbone0 = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head0 = model.heads["a"].weight.clone()
    trainer(max_epochs=2).fit(module, data)
    # parameters and BatchNorm running statistics untouched while frozen; heads trained
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, backbone0[k]), k
    assert not torch.equal(model.heads["a"].weight, head0)
    # probe then full: a fresh module, frozen for 1 epoch of 2, must change the backbone
    module2 = MultiTaskModule(model, policy=ProbeThenFull(probe_epochs=1, backbone_lr_scale=1.0))
    trainer(max_epochs=2).fit(module2, data)
    assert not torch.equal(model.backbone.stages[0].conv.weight, backbone0["stages.0.conv.weight"])


def test_parameter_groups_learning_rates():
    model = MultiTaskModel(MLP(input_shape=(4,), hidden=[8, 8]), [Task("a", num_classes=2)])
    optimizer = partial(torch.optim.AdamW, lr=0.01)
    module = MultiTaskModule(model, optimizer=optimizer, policy=ProbeThenFull(probe_epochs=1, backbone_lr_scale=0.1))
    opt = module.configure_optimizers()
    assert [g["name"] for g in opt.param_groups] == ["backbone.0", "backbone.1", "heads"]
    assert all(g["lr"] == pytest.approx(0.01) for g in opt.param_groups)
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())
    # probe then full: frozen in epoch 0, a tenth of the rate afterwards; heads at the base rate
    frozen = {"backbone.0": 0.0, "backbone.1": 0.0, "sharing": 0.0, "task_parts": 1.0, "heads": 1.0}
    assert module.finetuning.multipliers(0) == frozen
    assert module.finetuning.multipliers(1) == pytest.approx({**frozen, "backbone.0": 0.1, "backbone.1": 0.1, "sharing": 0.1})


def test_label_out_of_range_in_training_names_task():
    model = MultiTaskModel(MLP(input_shape=(4,), hidden=[8]), [Task("a", num_classes=2)])
    data = Batches([(torch.randn(4, 4), {"a": torch.tensor([0, 1, 5, 1])})])
    with pytest.raises(ValueError, match="Task 'a': label 5 is out of range"):
        trainer(max_epochs=1).fit(MultiTaskModule(model), data)


def test_module_rejects_unknown_task():
    model = MultiTaskModel(MLP(input_shape=(4,), hidden=[8]), [Task("a", num_classes=2)])
    with pytest.raises(ValueError, match=r"no head for task\(s\) \['zz'\]"):
        MultiTaskModule(model, tasks=["zz"])


def test_dselect_k_regularization_enters_the_loss():
    from functools import partial

    from mtl.sharing import DSelectK

    torch.manual_seed(0)
    tasks = [Task("a", num_classes=3), Task("b", kind="regression")]
    model = MultiTaskModel(MLP(input_shape=(8,), hidden=[16]), tasks, sharing=partial(DSelectK, num_experts=3, k=2, entropy_reg=1.0))
    module = MultiTaskModule(model)
    batch = next(iter(DataLoader(TwoTaskData(16), batch_size=16)))
    module.train()
    plain = module.loss_vector(module.task_losses(batch, None)).sum()
    reg = model.sharing.regularization()
    assert reg.item() > 0  # 3 experts is not a power of 2: the unreachable-expert term is positive
    module.log = lambda *a, **k: None
    assert module.training_step(batch, 0).item() == pytest.approx((plain + reg).item(), rel=1e-5)


def test_epoch_means_accumulate_scalars_and_vectors_without_logging_per_step():
    from mtl.module import EpochMeans

    means = EpochMeans()
    for v in (1.0, 2.0, 6.0):
        means.add("loss", torch.tensor(v))
        means.add("weights", torch.tensor([v, 2 * v]))
    out = means.pop()
    assert out["loss"].item() == pytest.approx(3.0)
    assert out["weights"].tolist() == pytest.approx([3.0, 6.0])
    assert means.pop() == {}  # reset


def test_step_statistics_are_logged_once_per_epoch():
    torch.manual_seed(0)
    tasks = [Task("a", kind="multiclass", num_classes=3), Task("b", kind="regression")]
    model = MultiTaskModel(MLP(input_shape=(8,), hidden=[16]), tasks)
    module = MultiTaskModule(model)
    calls = []
    original = module.log
    module.log = lambda name, *a, **k: (calls.append(name), original(name, *a, **k))
    trainer(max_epochs=2).fit(module, DataLoader(TwoTaskData(128), batch_size=16))  # 8 steps per epoch
    assert calls.count("train/loss") == 2  # per epoch, not per step
    assert {"train/loss", "train/a/acc", "train/b/mae"} <= set(module.trainer.callback_metrics)
