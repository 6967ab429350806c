"""Gradient aggregators and their solvers, on Jacobians small enough to check by hand."""

from __future__ import annotations

import importlib
import inspect
import itertools
import math
from pathlib import Path

import pytest
import torch
import yaml

import mtl.balancing.aggregators as aggregators
from mtl.balancing.aggregators.base import GradientAggregator
from mtl.balancing.aggregators import (
    DBMTL,
    IMTLG,
    MGDA,
    AlignedMTL,
    CAGrad,
    ConFIG,
    DualProj,
    ExcessMTL,
    FairGrad,
    GradDrop,
    GradVac,
    MoCo,
    MoDo,
    NashMTL,
    PCGrad,
    SDMGrad,
    UPGrad,
)
from mtl.balancing.aggregators.cagrad import cagrad_dual
from mtl.balancing.solvers import (
    bargaining_weights,
    dual_cone_weights,
    min_norm_simplex,
    nonnegative_qp,
    power_balance,
    project_simplex,
    simplex_qp,
)

CONF = Path(__file__).resolve().parents[2] / "conf" / "balancer"
ALL = [getattr(aggregators, name) for name in aggregators.__all__]
SEEDED = {PCGrad, GradVac, GradDrop}


def make(cls: type[GradientAggregator], T: int) -> GradientAggregator:
    return cls(T, seed=0) if cls in SEEDED else cls(T)


def rand_J(T: int, P: int, seed: int) -> torch.Tensor:
    return torch.randn(T, P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def simplex_grid(T: int, n: int) -> torch.Tensor:
    """All points of the simplex with coordinates in multiples of 1/n, ``[K, T]``."""
    pts = [c for c in itertools.product(range(n + 1), repeat=T - 1) if sum(c) <= n]
    w = torch.tensor([[*c, n - sum(c)] for c in pts], dtype=torch.float64)
    return w / n


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ----------------------------------------------------------------------------------------- solvers


@pytest.mark.parametrize("T", [2, 3])
def test_min_norm_simplex_matches_brute_force(T: int) -> None:
    for seed in range(5):
        J = rand_J(T, 4, seed)
        G = J @ J.T
        w = min_norm_simplex(G)
        assert torch.all(w >= 0) and w.sum() == pytest.approx(1.0)
        grid = simplex_grid(T, 200)
        best = torch.einsum("kt,ts,ks->k", grid, G, grid).min()
        assert w @ G @ w <= best + 1e-9


def test_simplex_qp_with_linear_term_matches_brute_force() -> None:
    J = rand_J(3, 5, 1)
    G = J @ J.T
    q = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    w = simplex_qp(G, q)
    grid = simplex_grid(3, 200)
    values = 0.5 * torch.einsum("kt,ts,ks->k", grid, G, grid) + grid @ q
    assert 0.5 * w @ G @ w + q @ w <= values.min() + 1e-9


@pytest.mark.parametrize("seed", range(10))
def test_nonnegative_qp_kkt(seed: int) -> None:
    T = 2 + seed % 5
    J = rand_J(T, 3, seed)  # P < T for some seeds: singular Gramians
    G = J @ J.T
    # q in the range of G (as in every use here), so the problem is bounded below.
    q = J @ torch.randn(3, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
    x = nonnegative_qp(G, q)
    mult = G @ x + q
    assert torch.all(x >= 0)
    assert torch.all(mult >= -1e-8)  # dual feasibility
    assert torch.all((x * mult).abs() <= 1e-8)  # complementary slackness


def test_dual_cone_weights_project_onto_dual_cone() -> None:
    # Rows (1, 0) and (-1, 1); the dual cone is {x1 >= 0, x2 >= x1}. Projections by hand:
    # (1, 0) -> (1/2, 1/2) and (-1, 1) -> (0, 1), i.e. weights (1, 1/2) and (1, 1).
    J = t([[1, 0], [-1, 1]])
    V = dual_cone_weights(torch.eye(2, dtype=torch.float64), J @ J.T)
    torch.testing.assert_close(V @ J, t([[0.5, 0.5], [0.0, 1.0]]))


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0])
def test_power_balance_solves_equation(p: float) -> None:
    for seed in range(5):
        J = rand_J(4, 10, seed) * 10.0 ** (seed - 2)
        G = J @ J.T
        w = power_balance(G, p)
        assert torch.all(w > 0)
        torch.testing.assert_close(G @ w, w.pow(-p), rtol=1e-7, atol=0.0)  # ridge 1e-10


def test_project_simplex_hand_cases_and_optimality() -> None:
    def vec(*v: float) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.float64)

    torch.testing.assert_close(project_simplex(vec(0.2, 0.3, 0.5)), vec(0.2, 0.3, 0.5))
    # (0.45, 0.3): sum 0.75, both shifted up by 0.125.
    torch.testing.assert_close(project_simplex(vec(0.45, 0.3)), vec(0.575, 0.425))
    # (-5, -1): shifting both up by 2 leaves (-3, 1): only the larger survives, at 1.
    torch.testing.assert_close(project_simplex(vec(-5.0, -1.0)), vec(0.0, 1.0))
    gen = torch.Generator().manual_seed(0)
    grid = simplex_grid(3, 100)
    for _ in range(5):
        v = 2 * torch.randn(3, generator=gen, dtype=torch.float64)
        x = project_simplex(v)
        assert torch.all(x >= 0) and x.sum().item() == pytest.approx(1.0)
        assert (x - v).norm() <= (grid - v).norm(dim=1).min() + 1e-12


def test_bargaining_weights_bounded_where_no_solution_exists() -> None:
    # Opposite rows: no direction improves both; power_balance alone returns weights ~1e5.
    G = t([[1, -1], [-1, 1]])
    assert power_balance(G).max() > 1e4
    torch.testing.assert_close(bargaining_weights(G), torch.zeros(2, dtype=torch.float64))
    # A zero row is left out; the others are solved alone (orthogonal: 1 / |g_t|).
    G = t([[9, 0, 0], [0, 0.25, 0], [0, 0, 0]])
    torch.testing.assert_close(bargaining_weights(G), t([[1 / 3, 2, 0]])[0])
    zero = torch.zeros(3, 3, dtype=torch.float64)
    torch.testing.assert_close(bargaining_weights(zero), zero[0])
    # Well-posed: exactly power_balance.
    J = rand_J(4, 10, 0)
    torch.testing.assert_close(bargaining_weights(J @ J.T, 0.5), power_balance(J @ J.T, 0.5))


def test_cagrad_dual_matches_brute_force() -> None:
    for seed in range(4):
        J = rand_J(3, 4, seed)
        G = J @ J.T
        c = 0.4
        b = torch.full((3,), 1 / 3, dtype=torch.float64)
        r = c * math.sqrt(b @ G @ b)

        def objective(W: torch.Tensor) -> torch.Tensor:
            quad = torch.einsum("kt,ts,ks->k", W, G, W).clamp_min(0)
            return W @ G @ b + r * quad.sqrt()

        w = cagrad_dual(G, c)
        assert objective(w[None])[0] <= objective(simplex_grid(3, 200)).min() + 1e-9


# ------------------------------------------------------------------------------- every aggregator


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
@pytest.mark.parametrize("T", [1, 2, 5])
def test_shape_dtype_finite(cls: type[GradientAggregator], T: int) -> None:
    losses = torch.rand(T, generator=torch.Generator().manual_seed(T)) + 0.5
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        agg = make(cls, T)
        J = rand_J(T, 7, T).to(dtype)
        g = agg(J, losses)
        assert g.shape == (7,) and g.dtype == dtype
        assert torch.isfinite(g).all()
        if agg.last_weights is not None:
            assert agg.last_weights.shape == (T,)
            torch.testing.assert_close(
                agg.last_weights @ J.float(), g.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-4, atol=1e-4
            )


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_zero_and_duplicate_rows_are_finite(cls: type[GradientAggregator]) -> None:
    losses = torch.ones(3)
    for J in (torch.zeros(3, 4), t([[1, 2, 0, 0], [1, 2, 0, 0], [0, 0, 0, 0]]).float()):
        assert torch.isfinite(make(cls, 3)(J, losses)).all()


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_state_dict_round_trip(cls: type[GradientAggregator]) -> None:
    T = 3
    losses = torch.tensor([0.5, 1.0, 2.0])
    a = make(cls, T)
    for step in range(3):
        a(rand_J(T, 6, step).float(), losses)
    b = make(cls, T)
    b.load_state_dict(a.state_dict())
    J = rand_J(T, 6, 99).float()
    torch.testing.assert_close(a(J, losses), b(J, losses))


def test_wrong_shape_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="num_tasks=3"):
        UPGrad(3)(torch.zeros(2, 4))


def test_configs_match_constructors() -> None:
    for cls in ALL:
        matches = [
            p for p in CONF.glob("*.yaml") if yaml.safe_load(p.read_text())["method"]["_target_"].endswith(
                "." + cls.__name__
            )
        ]
        assert len(matches) == 1, cls.__name__
        cfg = yaml.safe_load(matches[0].read_text())
        target = cfg["method"].pop("_target_")
        assert target == f"mtl.balancing.{cls.__name__}"
        assert cfg["defaults"] == [{"engine": "jacobian"}], cls.__name__
        params = inspect.signature(cls).parameters
        assert list(params)[0] == "num_tasks"
        for key, value in cfg["method"].items():
            assert key in params, (cls.__name__, key)
            assert value == params[key].default, (cls.__name__, key)  # yaml states the defaults
        module = importlib.import_module(cls.__module__)
        assert module.__doc__ and cls.__doc__


# ------------------------------------------------------------------------------------ per method


def test_pcgrad_hand_case() -> None:
    # g1 = (1, 0), g2 = (-1, 1): g1.g2 = -1 < 0.
    # g1' = g1 - (-1)/|g2|^2 g2 = (1, 0) + (-1, 1)/2 = (1/2, 1/2)
    # g2' = g2 - (-1)/|g1|^2 g1 = (-1, 1) + (1, 0) = (0, 1)
    # sum = (1/2, 3/2) = 2 g1 + 3/2 g2.
    J = t([[1, 0], [-1, 1]])
    agg = PCGrad(2)
    torch.testing.assert_close(agg(J), t([0.5, 1.5]))
    torch.testing.assert_close(agg.last_weights, torch.tensor([2.0, 1.5]))
    # Each projected gradient has a non-negative dot with the other row.
    assert (t([0.5, 0.5]) @ J[1]).item() >= 0 and (t([0.0, 1.0]) @ J[0]).item() >= 0


def test_pcgrad_without_conflict_is_sum() -> None:
    J = t([[1, 0, 1], [1, 1, 0], [0, 2, 1]])
    torch.testing.assert_close(PCGrad(3, seed=1)(J), J.sum(0))


def test_gradvac_hand_case_and_targets() -> None:
    # With targets 0 the vaccine is PCGrad: same hand result as above.
    J = t([[1, 0], [-1, 1]])
    agg = GradVac(2, beta=0.5)
    torch.testing.assert_close(agg(J), t([0.5, 1.5]))
    # Targets move to beta * cos(g1, g2) = 0.5 * (-1/sqrt 2).
    expected = torch.tensor([[0.0, -0.5 / math.sqrt(2)], [-0.5 / math.sqrt(2), 0.0]])
    torch.testing.assert_close(agg.target, expected)


def test_gradvac_reaches_target_cosine() -> None:
    # cos(g1, g2) = 0.2 < target 0.5: the vaccinated g1 has cosine exactly 0.5 with g2.
    g1, g2 = t([1, 0]), t([0.2, math.sqrt(1 - 0.04)])
    agg = GradVac(2, beta=0.0)
    agg.target[0, 1] = 0.5
    agg.target[1, 0] = -1.0  # never active: g2 is left alone and has weight 1 on itself
    agg(torch.stack([g1, g2]))
    w = agg.last_weights.double()
    g1_new = g1 + (w[1] - 1.0) * g2
    assert torch.nn.functional.cosine_similarity(g1_new, g2, dim=0).item() == pytest.approx(0.5)


def test_graddrop_hand_cases() -> None:
    # Column 0: both positive, purity 1: kept. Column 1: both negative, purity 0: kept.
    # Column 2: +1 and -3, purity 1/4: either the positive or the negative parts survive.
    J = t([[1, -2, 1], [2, -1, -3]])
    agg = GradDrop(2, seed=0)
    draws = torch.stack([agg(J) for _ in range(200)])
    torch.testing.assert_close(draws[:, :2], t([3, -3]).expand(200, 2))
    assert set(draws[:, 2].tolist()) <= {1.0, -3.0}
    assert 0.1 < (draws[:, 2] == 1.0).double().mean() < 0.4  # P(keep positive) = 1/4
    torch.testing.assert_close(GradDrop(2, leak=1.0)(J), J.sum(0))


def test_mgda_hand_cases() -> None:
    agg = MGDA(2)
    torch.testing.assert_close(agg(t([[1, 0], [0, 1]])), t([0.5, 0.5]))
    # The hull of (1, 0) and (1, 1) is closest to the origin at (1, 0).
    torch.testing.assert_close(agg(t([[1, 0], [1, 1]])), t([1, 0]))
    torch.testing.assert_close(agg.last_weights, torch.tensor([1.0, 0.0]))
    # l2 normalisation: weights from unit gradients (1/2, 1/2), applied to the raw gradients.
    torch.testing.assert_close(MGDA(2, normalization="l2")(t([[4, 0], [0, 1]])), t([2, 0.5]))
    with pytest.raises(ValueError, match="losses"):
        MGDA(2, normalization="loss")(t([[1, 0], [0, 1]]))


def test_mgda_brute_force_t3() -> None:
    for seed in range(3):
        J = rand_J(3, 5, seed)
        g = MGDA(3)(J)
        grid = simplex_grid(3, 200) @ J
        assert g.norm() <= grid.norm(dim=1).min() + 1e-6


@pytest.mark.parametrize("cls", [UPGrad, DualProj], ids=lambda c: c.__name__)
def test_dual_cone_methods_do_not_conflict(cls: type[GradientAggregator]) -> None:
    for T in range(2, 7):
        for seed in range(8):
            J = rand_J(T, 5, 10 * T + seed)
            agg = cls(T)
            g = agg(J)
            scale = (J @ J.T).diagonal().sum() * agg.last_weights.max()
            assert torch.all(J @ g >= -2e-4 * scale), (T, seed, J @ g)


def test_upgrad_and_dualproj_hand_cases() -> None:
    J = t([[1, 0], [1, 1]])  # no conflict: the mean
    torch.testing.assert_close(UPGrad(2)(J), J.mean(0))
    torch.testing.assert_close(DualProj(2)(J), J.mean(0))
    # Conflict: projections (1/2, 1/2) and (0, 1) (see test_dual_cone_weights...), mean (1/4, 3/4);
    # the mean gradient (0, 1/2) is already in the dual cone. reg_eps=0 gives the exact answer.
    J = t([[1, 0], [-1, 1]])
    torch.testing.assert_close(UPGrad(2, reg_eps=0.0)(J), t([0.25, 0.75]))
    torch.testing.assert_close(DualProj(2, reg_eps=0.0)(J), t([0.0, 0.5]))
    torch.testing.assert_close(UPGrad(2)(J), t([0.25, 0.75]), atol=1e-3, rtol=0)


def test_cagrad_c0_is_mean_and_hand_case() -> None:
    J = rand_J(3, 4, 0)
    torch.testing.assert_close(CAGrad(3, c=0.0)(J), J.mean(0))
    # Orthogonal unit rows e1, e2: by symmetry w = (1/2, 1/2), g_w = g0 = (1/2, 1/2), so
    # d = g0 + c g0 = (1 + c) g0, rescaled by 1 / (1 + c^2).
    c = 0.4
    expected = (1 + c) / (1 + c**2) * t([0.5, 0.5])
    torch.testing.assert_close(CAGrad(2, c=c)(t([[1, 0], [0, 1]])), expected)
    torch.testing.assert_close(CAGrad(2, c=c, rescale=0)(t([[1, 0], [0, 1]])), (1 + c) * t([0.5, 0.5]))


def test_cagrad_improves_worst_task_within_ball() -> None:
    J = t([[1, 0], [-0.8, 0.3]])
    c = 0.5
    d = CAGrad(2, c=c, rescale=0)(J)
    g0 = J.mean(0)
    assert (d - g0).norm() <= c * g0.norm() * (1 + 1e-6)  # on the sphere, float32
    assert (J @ d).min() > (J @ g0).min()  # better worst-case improvement than the mean


def test_imtlg_equal_projections() -> None:
    # g1 = (2, 0), g2 = (0, 1): a1 + a2 = 1 and 2 a1 = a2 give a = (1/3, 2/3), g = (2/3, 2/3).
    torch.testing.assert_close(IMTLG(2)(t([[2, 0], [0, 1]])), t([2 / 3, 2 / 3]))
    for T in (2, 3, 5):
        J = rand_J(T, 8, T)
        agg = IMTLG(T)
        g = agg(J)
        proj = (J / J.norm(dim=1, keepdim=True)) @ g
        torch.testing.assert_close(proj, proj[0].expand(T), rtol=1e-5, atol=1e-6)
        assert agg.last_weights.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_imtlg_full_rank_is_the_papers_closed_form() -> None:
    # alpha_{2:T} = g_1 U^T (D U^T)^{-1}, alpha_1 = 1 - sum, in float64 from the rows.
    for T, P in ((2, 2), (3, 3), (3, 7), (5, 9)):
        J = rand_J(T, P, 10 + T + P)
        U = J / J.norm(dim=1, keepdim=True)
        D, Du = J[:1] - J[1:], U[:1] - U[1:]
        rest = J[0] @ Du.T @ torch.linalg.inv(D @ Du.T)
        alpha = torch.cat([(1 - rest.sum()).reshape(1), rest])
        agg = IMTLG(T)
        torch.testing.assert_close(agg(J.float()).double(), alpha @ J, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(agg.last_weights.double(), alpha, rtol=1e-4, atol=1e-5)


def test_imtlg_dependent_rows_keep_a_descent_direction() -> None:
    # Rows g1, g2, g1 + g2 (rank 2): equal projections would force g = 0 (u3.g = c (|g1| + |g2|) /
    # |g1 + g2|), the closed form returned ~1e-7. The least-squares solution: by symmetry
    # g = a (1, 1); the min-norm weights on the unit vectors are a/2 (1, 1, sqrt 2), i.e.
    # alpha proportional to (1, 1, 1): alpha = 1/3 each and g = (2/3, 2/3), projections
    # (2/3, 2/3, 2 sqrt(2) / 3).
    J = t([[1, 0], [0, 1], [1, 1]])
    agg = IMTLG(3)
    torch.testing.assert_close(agg(J), t([2 / 3, 2 / 3]))
    torch.testing.assert_close(agg.last_weights, torch.full((3,), 1 / 3))
    for seed in range(5):
        g = torch.randn(2, 10, generator=torch.Generator().manual_seed(seed))
        g[1] += ((g[0] @ g[1]).abs() / (g[0] @ g[0]) + 0.1) * g[0]  # g1 . g2 > 0
        J = torch.stack([g[0], g[1], g[0] + g[1]])
        agg = IMTLG(3)
        out = agg(J)
        proj = (J / J.norm(dim=1, keepdim=True)) @ out
        assert out.norm() > 0.1 * J.norm(dim=1).min()  # not the ~1e-6 of the closed form
        assert torch.all(proj > 0)  # a descent direction for every task
        assert agg.last_weights.sum().item() == pytest.approx(1.0, abs=1e-5)
        # Same direction as the min-norm least-squares solution of U v = 1 (ConFIG's direction).
        cos = torch.nn.functional.cosine_similarity(out, ConFIG(3)(J), dim=0)
        assert cos.item() == pytest.approx(1.0, abs=1e-5)
    # Duplicated directions (g1, g2, 3 g1): equal projections exist and are found, along the
    # direction of IMTL-G on (g1, g2).
    g = torch.randn(2, 6, generator=torch.Generator().manual_seed(9))
    J = torch.stack([g[0], g[1], 3 * g[0]])
    out = IMTLG(3)(J)
    proj = (J / J.norm(dim=1, keepdim=True)) @ out
    torch.testing.assert_close(proj, proj[0].expand(3), rtol=1e-5, atol=1e-6)
    assert proj[0] > 0
    two = IMTLG(2)(g)
    assert torch.nn.functional.cosine_similarity(out, two, dim=0).item() == pytest.approx(1.0, abs=1e-6)
    # Opposite rows: no direction with equal positive projections; the answer is zero.
    torch.testing.assert_close(IMTLG(2)(t([[1, 2], [-1, -2]])), t([0, 0]))


def test_nashmtl_optimality() -> None:
    # Orthogonal rows: alpha_t = 1/|g_t|, so the update is the sum of unit vectors, then clipped.
    J = t([[3, 0], [0, 0.5]])
    torch.testing.assert_close(NashMTL(2, max_norm=0.0)(J), t([1, 1]))
    torch.testing.assert_close(NashMTL(2)(J).norm(), torch.tensor(1.0, dtype=torch.float64), atol=1e-5, rtol=0)
    for seed in range(4):
        J = rand_J(4, 10, seed)
        agg = NashMTL(4, max_norm=0.0)
        agg(J)
        alpha = agg.last_weights.double()
        G = J @ J.T
        torch.testing.assert_close(alpha * (G @ alpha), torch.ones(4, dtype=torch.float64), rtol=1e-4, atol=0)


def test_nashmtl_reuses_weights_between_updates() -> None:
    agg = NashMTL(2, update_weights_every=2, max_norm=0.0)
    agg(t([[3, 0], [0, 0.5]]))
    agg(t([[1, 0], [0, 1]]))
    torch.testing.assert_close(agg.last_weights, torch.tensor([1 / 3, 2.0]))


@pytest.mark.parametrize("cls", [NashMTL, FairGrad], ids=lambda c: c.__name__)
def test_bargaining_methods_are_bounded_on_stationary_gramians(cls: type[GradientAggregator]) -> None:
    # Rows g and -g: no direction improves both (weights were ~1e4): no update, zero weights.
    agg = cls(2, max_norm=0.0)
    torch.testing.assert_close(agg(t([[1, 2], [-1, -2]])), t([0, 0]))
    torch.testing.assert_close(agg.last_weights, torch.zeros(2))
    # A zero row gets weight 0, the others are solved alone; orthogonal rows of norms 3 and 0.5:
    # Nash (and FairGrad with alpha = 1) 1 / |g_t|.
    agg = cls(3, max_norm=0.0)
    g = agg(t([[3, 0], [0, 0.5], [0, 0]]))
    torch.testing.assert_close(agg.last_weights, torch.tensor([1 / 3, 2.0, 0.0]))
    torch.testing.assert_close(g, t([1, 1]))
    # Near-stationary rows (1, 0) and (-1, d): the weights never exceed the documented bound
    # 1 / (min_cos sqrt(T) |g_t|) (Nash; alpha = 1 for FairGrad): solved down to d = 3e-3
    # (weights ~470, cosine ~2e-3), zero from d = 1e-3 on. Where the problem is well
    # conditioned the kept solution solves the equation (below d ~ 1e-2, float32 weights
    # and Gramian carry a relative error ~1e-7 / d^2).
    for d in (1e-1, 1e-2, 3e-3, 1e-3, 1e-4, 1e-6, 0.0):
        J = t([[1, 0], [-1, d]])
        agg = cls(2, max_norm=0.0)
        agg(J)
        w = agg.last_weights.double()
        assert torch.all(w <= 1 / (agg.min_cos * math.sqrt(2) * J.norm(dim=1)) * (1 + 1e-6)), (d, w)
        assert (w.max() > 0) == (d >= 3e-3), d
        if d >= 1e-2:
            torch.testing.assert_close(w * ((J @ J.T) @ w), torch.ones(2, dtype=torch.float64), rtol=2e-3, atol=0)


def test_alignedmtl_hand_cases() -> None:
    # Orthogonal rows of equal norm: B = I, the sum of the rows.
    J = t([[0, 2, 0], [2, 0, 0]])
    torch.testing.assert_close(AlignedMTL(2)(J), J.sum(0))
    # Orthogonal rows of norms 2 and 1: both rescaled to the smallest singular value 1.
    torch.testing.assert_close(AlignedMTL(2)(t([[2, 0], [0, 1]])), t([1, 1]))
    torch.testing.assert_close(AlignedMTL(2, scale_mode="rmse")(t([[2, 0], [0, 1]])), math.sqrt(2.5) * t([1, 1]))


def test_alignedmtl_aligned_gradients_are_orthogonal_equal_norm() -> None:
    J = rand_J(3, 6, 0)
    agg = AlignedMTL(3)
    agg(J)
    G = J @ J.T
    lam, V = torch.linalg.eigh(G)
    B = lam.min().sqrt() * (V * lam.rsqrt()) @ V.T
    aligned = B @ J
    torch.testing.assert_close(aligned @ aligned.T, lam.min() * torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(agg.last_weights.double(), B.sum(1), rtol=1e-5, atol=1e-6)


def test_config_equal_positive_cosines() -> None:
    # Units e1, e2; v = (1, 1); length = (2 + 1)/sqrt 2 along (1, 1)/sqrt 2: g = (3/2, 3/2).
    torch.testing.assert_close(ConFIG(2)(t([[2, 0], [0, 1]])), t([1.5, 1.5]))
    for seed in range(5):
        J = rand_J(2, 6, seed)
        g = ConFIG(2)(J)
        cos = torch.nn.functional.cosine_similarity(J, g[None], dim=1)
        assert torch.all(cos > 0)
        torch.testing.assert_close(cos[0], cos[1])
        # Its length is the sum of the projections of the gradients on its direction.
        torch.testing.assert_close(g.norm(), (J @ (g / g.norm())).sum())


def test_dbmtl_first_two_steps_by_hand() -> None:
    # Log-gradients J_t / L_t = (1, 0) and (0, 2). Step 0 from the zero buffer with
    # beta_0 = 0.9 / 1^sigma: EMA = 0.1 (1, 0), 0.1 (0, 2); rescaled to the largest norm 0.2:
    # 2 (0.1, 0) + (0, 0.2) = (0.2, 0.2).
    J = t([[2, 0], [0, 1]])
    losses = torch.tensor([2.0, 0.5])
    J2, losses2 = t([[0, 0], [1, 0]]), torch.tensor([1.0, 1.0])  # log-gradients (0, 0) and (1, 0)
    for sigma in (0.0, 0.5):
        agg = DBMTL(2, beta_sigma=sigma)
        torch.testing.assert_close(agg(J, losses), t([0.2, 0.2]), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(agg.grad_ema, torch.tensor([[0.1, 0.0], [0.0, 0.2]]))
        # Step 1, beta_1 = 0.9 / 2^sigma: EMA = new + beta_1 (old - new).
        b = 0.9 / 2**sigma
        e1 = b * t([0.1, 0.0])
        e2 = t([1.0, 0.0]) + b * (t([0.0, 0.2]) - t([1.0, 0.0]))
        g = agg(J2, losses2)
        big = max(e1.norm(), e2.norm())
        torch.testing.assert_close(g, big / e1.norm() * e1 + big / e2.norm() * e2, rtol=1e-5, atol=1e-6)
    # LibMTL's defaults: beta = 0.9, sigma = 0.
    assert DBMTL(2).beta == 0.9 and DBMTL(2).beta_sigma == 0.0
    with pytest.raises(ValueError, match="losses"):
        DBMTL(2)(J)
    with pytest.raises(ValueError, match="space=params"):
        agg(torch.zeros(2, 5), losses)


def test_fairgrad_hand_case_and_equation() -> None:
    # Orthogonal rows of norms a, b: a^2 w1 = w1^(-1/alpha) gives w1 = a^(-2 alpha / (alpha + 1)).
    alpha = 2.0
    J = t([[2, 0], [0, 0.5]])
    agg = FairGrad(2, alpha=alpha, max_norm=0.0)
    agg(J)
    expected = torch.tensor([2.0, 0.5]).pow(-2 * alpha / (alpha + 1))
    torch.testing.assert_close(agg.last_weights, expected)
    # alpha = 1 is the Nash-MTL equation.
    J = rand_J(3, 5, 3)
    a, b = FairGrad(3, alpha=1.0, max_norm=0.0), NashMTL(3, max_norm=0.0)
    torch.testing.assert_close(a(J), b(J), rtol=1e-5, atol=1e-6)
    for alpha in (0.5, 3.0):
        agg = FairGrad(3, alpha=alpha, max_norm=0.0)
        agg(J)
        w = agg.last_weights.double()
        torch.testing.assert_close((J @ J.T) @ w, w.pow(-1 / alpha), rtol=1e-4, atol=0)


def test_moco_first_two_steps_by_hand() -> None:
    # h_t = L_t g_t / |g_t| = (1, 0) and (0, 3). Step k = 1: beta_1 = 0.5, Y = 0.5 h;
    # gamma_1 = 0.1, Y Y^T = diag(0.25, 2.25): lambda - 0.1 diag(.) (1/2, 1/2) = (0.4875, 0.3875),
    # projected onto the simplex (+0.0625 each): (0.55, 0.45); g = lambda^T Y = (0.275, 0.675).
    J = t([[2, 0], [0, 1]])
    losses = torch.tensor([1.0, 3.0])
    agg = MoCo(2)
    torch.testing.assert_close(agg(J, losses), t([0.275, 0.675]))
    torch.testing.assert_close(agg.lam, torch.tensor([0.55, 0.45]))
    assert agg.last_weights is None
    # Step k = 2 (same J): beta_2 = 0.5 / sqrt 2, gamma_2 = 0.1 / sqrt 2.
    b, c = 0.5 / math.sqrt(2), 0.1 / math.sqrt(2)
    y1, y2 = 0.5 + b * (1 - 0.5), 1.5 + b * (3 - 1.5)
    v = torch.tensor([0.55 - c * y1**2 * 0.55, 0.45 - c * y2**2 * 0.45], dtype=torch.float64)
    lam = v + (1 - v.sum()) / 2  # both stay positive
    torch.testing.assert_close(agg(J, losses), t([lam[0] * y1, lam[1] * y2]), rtol=1e-5, atol=1e-6)
    # LibMTL's softmax update at step 1: softmax(0.4875, 0.3875).
    agg = MoCo(2, lambda_update="softmax")
    agg(J, losses)
    p0 = 1 / (1 + math.exp(-0.1))
    torch.testing.assert_close(agg.lam, torch.tensor([p0, 1 - p0]))
    # Raw gradients (no losses needed): h = J.
    agg = MoCo(2, normalize=False)
    assert not agg.needs_losses
    torch.testing.assert_close(agg(t([[1, 0], [0, 1]])), t([0.25, 0.25]))
    with pytest.raises(ValueError, match="losses"):
        MoCo(2)(J)
    with pytest.raises(ValueError, match="space=params"):
        agg(torch.zeros(2, 5))


def test_excessmtl_first_two_steps_by_hand() -> None:
    # Step 0: risks sum_i g_i^2 / sqrt(g_i^2 + eps) = (4/2, 1/1) = (2, 1) recorded, the weights
    # stay ones: g = (2, 1).
    J1, J2 = t([[2, 0], [0, 1]]), t([[1, 0], [0, 2]])
    agg = ExcessMTL(2, robust_step_size=1.0)
    torch.testing.assert_close(agg(J1), t([2, 1]))
    torch.testing.assert_close(agg.initial_risk, torch.tensor([2.0, 1.0]), rtol=1e-6, atol=0)
    torch.testing.assert_close(agg.last_weights, torch.ones(2))
    # Step 1: accumulators (5, 0), (0, 5); risks 1/sqrt 5 and 4/sqrt 5; ratios to step 0:
    # r = (1 / (2 sqrt 5), 4 / sqrt 5); w = 2 softmax(eta r).
    r = torch.tensor([1 / (2 * math.sqrt(5)), 4 / math.sqrt(5)], dtype=torch.float64)
    w = 2 * torch.softmax(r, 0)
    torch.testing.assert_close(agg(J2), w @ J2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(agg.last_weights.double(), w, rtol=1e-5, atol=1e-6)
    assert agg.last_weights.sum().item() == pytest.approx(2.0)
    # A task without gradient at step 0 takes its reference later (no division by zero).
    agg = ExcessMTL(2)
    agg(t([[1, 0], [0, 0]]))
    agg(J2)
    assert torch.isfinite(agg.task_weights).all()
    torch.testing.assert_close(agg.initial_risk, torch.tensor([1.0, 4 / math.sqrt(4)]), rtol=1e-5, atol=0)


def test_modo_step_by_hand() -> None:
    # G = diag(1, 4), lambda_0 = (1/2, 1/2), gamma = 0.1, rho = 0: lambda - 0.1 G lambda =
    # (0.45, 0.3), projected: (0.575, 0.425); g = lambda^T J = (0.575, 0.85).
    J = t([[1, 0], [0, 2]])
    agg = MoDo(2, gamma=0.1, rho=0.0)
    torch.testing.assert_close(agg(J), t([0.575, 0.85]))
    torch.testing.assert_close(agg.last_weights, torch.tensor([0.575, 0.425]))
    # LibMTL's defaults gamma = 1e-3, rho = 0.1: (0.5 - 1e-3 * 0.55, 0.5 - 1e-3 * 2.05) + 0.0013.
    agg = MoDo(2)
    agg(J)
    torch.testing.assert_close(agg.lam, torch.tensor([0.50075, 0.49925]))


def test_sdmgrad_steps_by_hand_and_inner_problem() -> None:
    # J = diag(2, 1): G / mean(|g_t|)^2 = diag(4, 1) / 2.25. One step from (1/2, 1/2) with lr 5:
    # grad = G~ w + 0.3 G~ 1/2 = 1.3 (2, 0.5) / 2.25, w - 5 grad = (-5.278, -0.944), projected
    # onto the simplex: (0, 1). g = (J^T w + 0.3 g0) / 1.3 = ((0, 1) + 0.3 (1, 0.5)) / 1.3.
    J = t([[2, 0], [0, 1]])
    agg = SDMGrad(2, niter=1)
    torch.testing.assert_close(agg(J), t([0.3 / 1.3, 1.15 / 1.3]))
    torch.testing.assert_close(agg.w, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(agg.last_weights, torch.tensor([0.15 / 1.3, 1.15 / 1.3]))
    # Orthogonal rows of equal norm: symmetric, w stays (1/2, 1/2), g = mean of the rows.
    torch.testing.assert_close(SDMGrad(2)(t([[1, 0], [0, 1]])), t([0.5, 0.5]))
    # Enough plain projected steps solve min_w 1/2 w^T G~ w + lam w^T G~ 1/T exactly.
    J = rand_J(3, 5, 4)
    G = J @ J.T
    G = G / (G.diagonal().sqrt().mean() ** 2 + 1e-8)
    agg = SDMGrad(3, niter=2000, lr=0.05, momentum=0.0)
    agg(J)
    w = simplex_qp(G, 0.3 * G.mean(1))
    torch.testing.assert_close(agg.w.double(), w, rtol=0, atol=1e-5)


# ------------------------------------------------------------- CAGrad's dual solver vs references


def _cagrad_objective(G: torch.Tensor, W: torch.Tensor, c: float) -> torch.Tensor:
    """``w^T G b + c ||g0|| ||g_w||`` for each row ``w`` of ``W [K, T]``."""
    T = G.shape[0]
    b = torch.full((T,), 1 / T, dtype=torch.float64)
    r = c * math.sqrt(b @ G @ b)
    return W @ (G @ b) + r * ((W @ G) * W).sum(1).clamp_min(0).sqrt()


def _cagrad_bisection(G: torch.Tensor, c: float, floor: float = 1e-7) -> torch.Tensor:
    """Reference: bisection on log(lambda) over exact simplex QPs (the former solver, with its
    bracket starting at ``floor * max ||g_t||``) to a relative 1e-11."""
    T = G.shape[0]
    b = torch.full((T,), 1 / T, dtype=torch.float64)
    a, r = G @ b, c * math.sqrt(b @ G @ b)
    hi = math.sqrt(float(G.diagonal().max()))
    lo = floor * hi

    def inner(lam: float) -> tuple[torch.Tensor, float]:
        w = simplex_qp((r / lam) * G, a, tol=1e-13)
        return w, math.sqrt(max(float(w @ G @ w), 0.0))

    w, norm = inner(lo)
    if norm <= lo:
        return w
    while hi / lo - 1 > 1e-11:
        mid = math.sqrt(lo * hi)
        w, norm = inner(mid)
        lo, hi = (mid, hi) if norm > mid else (lo, mid)
    return w


def _cagrad_jacobians() -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for T in (2, 3, 5, 10, 20, 40):
        J = torch.randn(T, 50, generator=gen, dtype=torch.float64)
        out.append(("random", J))
        C = J.clone()  # the second half nearly opposes the first
        k = T // 2
        C[k:] = -C[: T - k] * (0.5 + torch.rand(T - k, 1, generator=gen, dtype=torch.float64))
        C[k:] += 0.1 * J[k:]
        out.append(("conflicting", C))
        base = torch.randn(1, 50, generator=gen, dtype=torch.float64)
        scale = 0.5 + torch.rand(T, 1, generator=gen, dtype=torch.float64)
        out.append(("near-parallel", base * scale + 1e-3 * J))
        low = torch.randn(T, 3, generator=gen, dtype=torch.float64)
        out.append(("rank-3", low @ torch.randn(3, 50, generator=gen, dtype=torch.float64)))
        out.append(("scaled rows", J * torch.logspace(-2, 2, T, dtype=torch.float64)[:, None]))
    return out


@pytest.mark.parametrize("c", [0.1, 0.4, 0.9])
def test_cagrad_dual_agrees_with_bisection(c: float) -> None:
    # The update g0 + c ||g0|| g_w / ||g_w|| agrees to 1e-8 relative (measured: ~1e-10) wherever
    # ||g_w|| >= 1e-4 max_t ||g_t|| (below, the direction of g_w is ill-conditioned).
    checked = 0
    for kind, J in _cagrad_jacobians():
        G = J @ J.T
        w, ref = cagrad_dual(G, c), _cagrad_bisection(G, c)
        assert torch.all(w >= 0) and abs(float(w.sum()) - 1) < 1e-12
        scale = float(G.diagonal().max())
        obj = _cagrad_objective(G, torch.stack([w, ref]), c)
        assert obj[0] <= obj[1] + 1e-11 * scale, kind
        top = J.norm(dim=1).max()
        if min((w @ J).norm(), (ref @ J).norm()) < 1e-4 * top:
            continue
        g0 = J.mean(0)
        d, d_ref = (g0 + c * g0.norm() / (v @ J).norm() * (v @ J) for v in (w, ref))
        assert (d - d_ref).norm() <= 1e-8 * d_ref.norm(), (kind, J.shape)
        checked += 1
    assert checked >= 20


def test_cagrad_dual_zero_in_hull_brute_force() -> None:
    # Zero is inside the convex hull of these three 2-d gradients, so g_w = 0 is feasible, but for
    # c < 1 the optimum has g_w ~ -g0 (objective ||g0||^2 (c - 1) eps < 0). The former solver (and
    # any bisection that starts at lambda ~ 0) returned the min-norm point here.
    J = t([[1, 0], [-1, 0.5], [-0.2, -1]])
    G = J @ J.T
    grid = simplex_grid(3, 150)
    for c in (0.2, 0.4, 0.8):
        w = cagrad_dual(G, c)
        best = _cagrad_objective(G, grid, c).min()
        assert best < -1e-3
        assert _cagrad_objective(G, w[None], c)[0] <= best + 1e-12
        d = CAGrad(3, c=c, rescale=0)(J)
        g0 = J.mean(0)
        assert (d - g0).norm() > 0.5 * c * g0.norm()  # not the fallback to g0
    # c >= 1: g_w = 0 is optimal; CAGrad returns g0 / (1 + c^2).
    torch.testing.assert_close(CAGrad(3, c=1.5)(J), J.mean(0) / (1 + 1.5**2))


def test_cagrad_dual_brute_force_two_and_three_tasks() -> None:
    gen = torch.Generator().manual_seed(1)
    grids = {2: simplex_grid(2, 5000), 3: simplex_grid(3, 120)}
    for T, P in ((2, 2), (2, 5), (3, 2), (3, 6)):
        grid = grids[T]
        for _ in range(5):
            J = torch.randn(T, P, generator=gen, dtype=torch.float64)
            J[1] = -0.7 * J[0] + 0.2 * J[1]  # a conflicting pair
            G = J @ J.T
            b = torch.full((T,), 1 / T, dtype=torch.float64)
            lin, norm = grid @ (G @ b), ((grid @ G) * grid).sum(1).clamp_min(0).sqrt()
            for c in (0.1, 0.5, 0.9):
                w = cagrad_dual(G, c)
                best = (lin + c * math.sqrt(b @ G @ b) * norm).min()
                assert _cagrad_objective(G, w[None], c)[0] <= best + 1e-12 * float(G.diagonal().max())


@pytest.mark.parametrize("T", [1, 2, 5, 12, 30])
def test_dual_cone_weights_batched_matches_one_by_one(T: int) -> None:
    from mtl.balancing.solvers import dual_cone_weights_batched, nonnegative_qp_batched

    gen = torch.Generator().manual_seed(T)
    for trial in range(4):
        J = torch.randn(T, 3 if trial == 3 else 40, generator=gen, dtype=torch.float64)
        if T > 1:
            J[1 : max(2, T // 2)] -= (1.0 + trial) * J[0]  # conflicting rows
        G = J @ J.T
        G = G / G.trace() + 1e-4 * torch.eye(T, dtype=torch.float64)
        for U in (torch.eye(T, dtype=torch.float64) / T, torch.full((1, T), 1.0 / T, dtype=torch.float64)):
            torch.testing.assert_close(dual_cone_weights_batched(U, G), dual_cone_weights(U, G), rtol=1e-9, atol=1e-12)
        Q = torch.randn(3, T, generator=gen, dtype=torch.float64)
        X = nonnegative_qp_batched(G, Q)
        for k in range(3):
            torch.testing.assert_close(X[k], nonnegative_qp(G, Q[k]), rtol=1e-9, atol=1e-12)
    # Degenerate H = 0: each problem keeps its own scale.
    Z = torch.zeros(T, T, dtype=torch.float64)
    Q = torch.randn(2, T, generator=gen, dtype=torch.float64)
    X = nonnegative_qp_batched(Z, Q)
    for k in range(2):
        torch.testing.assert_close(X[k], nonnegative_qp(Z, Q[k]))


@pytest.mark.parametrize("leak", [0.0, 0.3, 1.0])
def test_graddrop_matches_mask_formula(leak: float) -> None:
    J = torch.randn(4, 500, generator=torch.Generator().manual_seed(0))
    J[1] -= 2 * J[0]
    J[2, :50] = 0.0  # zero entries are dropped by both branches of the rule
    agg = GradDrop(4, leak=leak, seed=7)
    g = agg(J)
    purity = 0.5 * (1.0 + J.sum(0) / (J.abs().sum(0) + agg.eps))
    U = torch.rand(J.shape[1], generator=torch.Generator().manual_seed(7 * 1_000_003), dtype=J.dtype)
    mask = ((purity > U) & (J > 0)) | ((purity < U) & (J < 0))
    ref = ((leak + (1.0 - leak) * mask.to(J.dtype)) * J).sum(0)
    torch.testing.assert_close(g, ref)
