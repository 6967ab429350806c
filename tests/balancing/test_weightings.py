"""Loss weightings: hand-checkable cases per method, plus shared contracts (shape, dtype, state)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from mtl.balancing.weightings.base import LossWeighting
from mtl.balancing.weightings import DWA, EW, FAMO, GLS, IMTLL, RLW, STCH, UW, GradNorm, Static

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "balancer"


def _leaf(values: list[float], dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.tensor(values, dtype=dtype, requires_grad=True)


def _grad(objective: Tensor, wrt: Tensor) -> Tensor:
    return torch.autograd.grad(objective, wrt)[0]


# ----------------------------------------------------------------------------------------------
# Per-method, hand-checkable cases
# ----------------------------------------------------------------------------------------------


def test_ew_gives_ones() -> None:
    w = EW(3)(torch.tensor([0.3, 2.0, 7.0]))
    assert torch.equal(w, torch.ones(3))


def test_static_weights_and_default() -> None:
    assert torch.equal(Static(2, weights=[0.5, 2.0])(torch.ones(2)), torch.tensor([0.5, 2.0]))
    assert torch.equal(Static(2)(torch.ones(2)), torch.ones(2))


def test_static_wrong_length_names_the_config_key() -> None:
    with pytest.raises(ValueError, match=r"balancer\.method\.weights.*3 tasks"):
        Static(3, weights=[1.0, 2.0])


def test_uw_total_loss_on_known_log_variances() -> None:
    uw = UW(2).double()
    with torch.no_grad():
        uw.log_variances.copy_(torch.tensor([0.0, math.log(2.0)]))
    losses = torch.tensor([1.0, 4.0], dtype=torch.float64)
    total, weights = uw.weighted_loss(losses)
    # exp(-s) L + s = 1*1 + 0.5*4 + 0 + log 2
    assert torch.allclose(weights, torch.tensor([1.0, 0.5], dtype=torch.float64))
    assert total.item() == pytest.approx(3.0 + math.log(2.0))
    total.backward()
    # d/ds (exp(-s) L + s) = 1 - exp(-s) L
    assert torch.allclose(uw.log_variances.grad, torch.tensor([0.0, -1.0], dtype=torch.float64))


def test_imtll_total_loss_on_known_log_scales() -> None:
    imtl = IMTLL(2).double()
    with torch.no_grad():
        imtl.log_scales.copy_(torch.tensor([0.0, math.log(2.0)]))
    total, _ = imtl.weighted_loss(torch.tensor([1.0, 4.0], dtype=torch.float64))
    # exp(s) L - s = 1 + 8 - log 2
    assert total.item() == pytest.approx(9.0 - math.log(2.0))
    total.backward()
    # d/ds (exp(s) L - s) = exp(s) L - 1
    assert torch.allclose(imtl.log_scales.grad, torch.tensor([0.0, 7.0], dtype=torch.float64))


def test_dwa_follows_the_formula_after_two_epochs() -> None:
    dwa = DWA(2, temperature=2.0)
    # Epoch 0: batches [1, 3] and [3, 5] -> average [2, 4]. Weights are 1 while there is no history.
    for batch in ([1.0, 3.0], [3.0, 5.0]):
        assert torch.equal(dwa(torch.tensor(batch)), torch.ones(2))
    dwa.on_train_epoch_end()
    # Epoch 1: average [1, 4]; still ones (only one epoch of history).
    assert torch.equal(dwa(torch.tensor([1.0, 4.0])), torch.ones(2))
    dwa.eval()
    dwa(torch.tensor([100.0, 100.0]))  # validation: must not enter the average
    dwa.train()
    dwa.on_train_epoch_end()
    # Epoch 2: r = [1/2, 4/4]; w = 2 * softmax(r / 2).
    e1, e2 = math.exp(0.25), math.exp(0.5)
    expected = torch.tensor([2 * e1 / (e1 + e2), 2 * e2 / (e1 + e2)])
    w = dwa(torch.tensor([0.5, 0.5]))
    assert torch.allclose(w, expected)
    assert w[1] > w[0]  # the task whose loss fell less gets more weight
    assert w.sum().item() == pytest.approx(2.0)


def test_rlw_is_on_the_simplex_and_seeded() -> None:
    a, b = RLW(4, seed=3), RLW(4, seed=3)
    losses = torch.ones(4)
    wa1, wa2 = a(losses), a(losses)
    assert torch.equal(wa1, b(losses)) and torch.equal(wa2, b(losses))
    assert not torch.equal(wa1, wa2)  # fresh draw every step
    assert (wa1 > 0).all() and wa1.sum().item() == pytest.approx(1.0)


def test_gls_gradient_equals_geometric_mean_gradient() -> None:
    losses = _leaf([0.5, 2.0, 3.0])
    w = GLS(3)(losses)
    assert not w.requires_grad
    geometric_mean = losses.prod() ** (1.0 / 3.0)
    assert torch.allclose(_grad((w * losses).sum(), losses), _grad(geometric_mean, losses))
    assert (w * losses).sum().item() == pytest.approx(geometric_mean.item())


def test_stch_raw_gradient_equals_smooth_tchebycheff_gradient() -> None:
    mu, ideal = 0.5, torch.tensor([0.1, 0.0, 0.2], dtype=torch.float64)
    stch = STCH(3, mu=mu, normalize=False, ideal_point=ideal.tolist())
    losses = _leaf([0.5, 2.0, 1.0])
    w = stch(losses)
    assert not w.requires_grad
    objective = 3 * mu * torch.logsumexp((losses - ideal) / mu, dim=0)
    assert torch.allclose(_grad((w * losses).sum(), losses), _grad(objective, losses))
    assert w.sum().item() == pytest.approx(3.0)


def test_stch_normalized_warmup_nadir_then_stch() -> None:
    stch = STCH(2, mu=1.0, warmup_epochs=1, normalize=True)
    losses = _leaf([0.5, 2.0])
    # Epoch 0 (warm-up): objective sum log L.
    assert torch.allclose(
        _grad((stch(losses) * losses).sum(), losses), _grad(torch.log(losses).sum(), losses)
    )
    stch.on_train_epoch_end()
    # Epoch 1 (nadir epoch): still sum log L, and the losses are averaged: n = [1, 4].
    for batch in ([0.5, 2.0], [1.5, 6.0]):
        l = _leaf(batch)
        assert torch.allclose(_grad((stch(l) * l).sum(), l), _grad(torch.log(l).sum(), l))
    stch.on_train_epoch_end()
    assert torch.allclose(stch.nadir, torch.tensor([1.0, 4.0]))
    # Epoch 2: T * mu * logsumexp(log(L / n) / mu).
    nadir = torch.tensor([1.0, 4.0], dtype=torch.float64)
    objective = 2 * torch.logsumexp(torch.log(losses / nadir + 1e-20), dim=0)
    assert torch.allclose(_grad((stch(losses) * losses).sum(), losses), _grad(objective, losses))


def test_famo_gradient_equals_famo_objective_gradient() -> None:
    famo = FAMO(3, min_losses=[0.0, 0.1, 0.0])
    famo.logits.copy_(torch.tensor([0.2, -0.3, 0.5]))
    losses = _leaf([0.5, 2.0, 1.0])
    w = famo(losses)
    z = torch.softmax(famo.logits.double(), dim=0)
    gap = losses - torch.tensor([0.0, 0.1, 0.0], dtype=torch.float64) + 1e-8
    c = (z / gap).sum().detach()
    objective = (z * torch.log(gap)).sum() / c
    assert torch.allclose(_grad((w * losses).sum(), losses), _grad(objective, losses))
    assert w.sum().item() == pytest.approx(1.0)


def test_famo_moves_weight_to_the_task_that_improved_less() -> None:
    famo = FAMO(2)
    famo(torch.tensor([1.0, 1.0]))
    famo.after_optimizer_step(torch.tensor([0.5, 0.9]))  # task 0 improved much more
    # First Adam step from zero logits moves each logit by lr against the sign of its gradient.
    assert torch.allclose(famo.logits, torch.tensor([-0.025, 0.025]), atol=1e-6)
    w = famo(torch.tensor([1.0, 1.0]))
    assert w[1] > w[0]


def test_famo_update_without_forward_explains_the_contract() -> None:
    with pytest.raises(RuntimeError, match="same batch"):
        FAMO(2).after_optimizer_step(torch.ones(2))


class _TwoHeads(nn.Module):
    """x -> shared (1 -> 1) -> two fixed heads of different scale: task 0's gradient is larger."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(1, 1, bias=False)
        nn.init.constant_(self.shared.weight, 1.0)
        self.register_buffer("scales", torch.tensor([3.0, 1.0]))

    def losses(self, x: Tensor, y: Tensor) -> Tensor:
        h = self.shared(x)  # [B, 1]
        return ((h * self.scales - y) ** 2).mean(0)  # [2]


def test_gradnorm_lowers_the_weight_of_the_task_with_too_large_gradient() -> None:
    torch.manual_seed(0)
    model, gradnorm = _TwoHeads(), GradNorm(2, alpha=1.5)
    x = torch.randn(16, 1)
    y = torch.zeros(16, 2)
    losses = model.losses(x, y)
    weights = gradnorm(losses, shared_parameters=[model.shared.weight])
    assert not weights.requires_grad and torch.equal(weights, torch.ones(2))
    reg = gradnorm.regularization(losses)
    # First step: L(0) = L so r = 1 and the target is the mean norm: L_grad = |n0 - n1|.
    n = [
        torch.autograd.grad(losses[t], model.shared.weight, retain_graph=True)[0].norm()
        for t in range(2)
    ]
    assert reg.item() == pytest.approx(abs(n[0] - n[1]).item(), rel=1e-5)
    assert n[0] > n[1]

    (weights * losses).sum().add(reg).backward()
    assert gradnorm.weights.grad[0] > 0 > gradnorm.weights.grad[1]
    # The model's gradient is that of the weighted sum only: L_grad does not reach the model.
    expected = torch.autograd.grad((weights * model.losses(x, y)).sum(), model.shared.weight)[0]
    assert torch.allclose(model.shared.weight.grad, expected)

    torch.optim.SGD(gradnorm.parameters(), lr=0.01).step()
    new_weights = gradnorm(model.losses(x, y).detach())  # no graph: just the renormalised weights
    assert new_weights[0] < 1.0 < new_weights[1]
    assert new_weights.sum().item() == pytest.approx(2.0)


def test_gradnorm_requires_shared_parameters() -> None:
    losses = _leaf([1.0, 2.0])
    with pytest.raises(ValueError, match="shared_parameters"):
        GradNorm(2).weighted_loss(losses * 2)


# ----------------------------------------------------------------------------------------------
# Contracts shared by every method
# ----------------------------------------------------------------------------------------------

T = 3

FACTORIES = {
    "ew": lambda: EW(T),
    "static": lambda: Static(T, weights=[1.0, 0.5, 2.0]),
    "uw": lambda: UW(T),
    "dwa": lambda: DWA(T),
    "rlw": lambda: RLW(T, seed=0),
    "gls": lambda: GLS(T),
    "imtll": lambda: IMTLL(T),
    "famo": lambda: FAMO(T),
    "stch": lambda: STCH(T, warmup_epochs=1),
    "gradnorm": lambda: GradNorm(T),
}


class _Toy(nn.Module):
    """Shared vector theta, fixed per-task heads: losses [T] depend on theta."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([0.5, -0.2]))
        self.register_buffer("heads", torch.tensor([[1.0, 0.0], [0.5, 2.0], [-1.0, 1.0]]))
        self.register_buffer("targets", torch.tensor([1.0, -1.0, 0.5]))

    def forward(self) -> Tensor:
        return (self.heads @ self.theta - self.targets) ** 2 + 0.1


def _train(weighting: LossWeighting, model: _Toy, epochs: int = 3, steps: int = 2) -> None:
    """Drive a weighting through the full hook contract, as the training module would."""
    params = list(model.parameters()) + list(weighting.parameters())
    opt = torch.optim.SGD(params, lr=0.05)
    for _ in range(epochs):
        for _ in range(steps):
            opt.zero_grad()
            total, _ = weighting.weighted_loss(model(), shared_parameters=[model.theta])
            total.backward()
            opt.step()
            if weighting.needs_losses_after_step:
                with torch.no_grad():
                    weighting.after_optimizer_step(model())
        weighting.on_train_epoch_end()


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_state_dict_round_trips(name: str) -> None:
    torch.manual_seed(0)
    model = _Toy()
    trained = FACTORIES[name]()
    _train(trained, model)
    fresh = FACTORIES[name]()
    fresh.load_state_dict(trained.state_dict())
    for a, b in zip(trained.state_dict().values(), fresh.state_dict().values()):
        if isinstance(a, Tensor):
            assert torch.equal(a, b)
    losses = model()
    shared = {"shared_parameters": [model.theta]} if trained.needs_shared_parameters else {}
    assert torch.equal(trained(losses, **shared), fresh(model(), **shared))


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weights_shape_dtype_finite(name: str, dtype: torch.dtype) -> None:
    model = _Toy().to(dtype)
    weighting = FACTORIES[name]()
    _train(weighting.to(dtype) if dtype == torch.float64 else weighting, model, epochs=3, steps=1)
    losses = model()
    shared = {"shared_parameters": [model.theta]} if weighting.needs_shared_parameters else {}
    w = weighting(losses, **shared)
    assert w.shape == (T,) and w.dtype == dtype and w.device == losses.device
    assert torch.isfinite(w).all()
    assert torch.isfinite(weighting.regularization(losses))


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_wrong_number_of_losses_is_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="num_tasks=3"):
        FACTORIES[name]()(torch.ones(T + 1))


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_config_instantiates_with_num_tasks(name: str) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF_DIR / f"{name}.yaml")
    target = cfg.method._target_
    assert target.startswith("mtl.balancing.")
    # The lead re-exports the classes from mtl.balancing; instantiate from their home module here.
    cfg.method._target_ = target.replace("mtl.balancing.", "mtl.balancing.weightings.")
    if name == "static":
        cfg.method.weights = [1.0, 2.0, 3.0]
    weighting = instantiate(cfg.method, num_tasks=T)
    assert isinstance(weighting, LossWeighting)
    assert type(weighting).__name__ == target.split(".")[-1]
    assert weighting.num_tasks == T


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_runs_on_cuda(name: str) -> None:
    model, weighting = _Toy().cuda(), FACTORIES[name]().cuda()
    _train(weighting, model)
    losses = model()
    shared = {"shared_parameters": [model.theta]} if weighting.needs_shared_parameters else {}
    w = weighting(losses, **shared)
    assert w.device == losses.device and torch.isfinite(w).all()
