"""Properties every gradient aggregator (or a stated family of them) must have, checked on random
Jacobians, in the spirit of TorchJD's aggregator tests.

The aggregators are discovered from ``mtl.balancing.__all__``, so a new one is covered by the
generic properties as soon as it is exported. The method-specific properties are listed
explicitly, with the reason each one holds; a method is only in a list if its rule guarantees
the property (not because it happens to pass here).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import mtl.balancing as balancing
from mtl.balancing import (
    DBMTL,
    IMTLG,
    MGDA,
    AlignedMTL,
    CAGrad,
    ConFIG,
    DualProj,
    FairGrad,
    GradDrop,
    GradientAggregator,
    GradVac,
    NashMTL,
    PCGrad,
    UPGrad,
)

ALL = sorted(
    (
        obj
        for name in balancing.__all__
        if isinstance(obj := getattr(balancing, name), type)
        and issubclass(obj, GradientAggregator)
        and obj is not GradientAggregator
    ),
    key=lambda c: c.__name__,
)
IDS = [c.__name__ for c in ALL]

#: Non-negative inner product with every row, for any J, by the method's construction:
#: MGDA (the min-norm point d of the hull has g_t^T d >= |d|^2), UPGrad and DualProj (projection
#: onto the dual cone {x: J x >= 0}, up to their ridge reg_eps), Nash-MTL and FairGrad
#: (g_t^T d = w_t^(-1/alpha) > 0, or d = 0 at their stationary fallback).
NON_CONFLICTING = [MGDA, UPGrad, DualProj, NashMTL, FairGrad]
#: Non-conflicting only under a condition: ConFIG for linearly independent rows (u_t^T v = 1 for
#: all t), IMTL-G for two tasks (the common projection 1 / (1^T N^-1 G_unit^-1 1) can be negative
#: for T >= 3, see its docstring), PCGrad for two tasks (each projected gradient is orthogonal to
#: the other task's gradient).
NON_CONFLICTING_IF = {ConFIG: "independent", IMTLG: "two", PCGrad: "two"}

#: g(P J) = g(J) for a permutation P of the rows (same losses permuted): every method whose rule
#: treats the tasks symmetrically. PCGrad and GradVac visit the tasks in a random order; GradDrop
#: is in (its draws are per coordinate, shared by the tasks).
ORDER_DEPENDENT = {PCGrad, GradVac}
PERMUTATION_INVARIANT = [c for c in ALL if c not in ORDER_DEPENDENT]

#: g(c J) = c^k g(J) for c > 0, with the degree k and constructor arguments: positively
#: homogeneous (k = 1) because the weights depend on J only through scale-free quantities
#: (trace-normalised or unit Gramians, ratios): UPGrad and DualProj (TorchJD), MGDA, CAGrad
#: (the ball is relative to |g0|), IMTL-G and ConFIG (unit gradients; their length is a
#: combination of the rows), Aligned-MTL (the scale is a singular value of J), PCGrad, GradVac
#: (cosines) and GradDrop (sign purity), DB-MTL (log-gradients over a fixed loss); scale
#: invariant (k = 0): Nash-MTL (the bargaining solution is invariant to rescaling the utilities,
#: Navon et al.; without the norm clipping).
HOMOGENEOUS: dict[type[GradientAggregator], tuple[int, dict]] = {
    UPGrad: (1, {}),
    DualProj: (1, {}),
    MGDA: (1, {}),
    CAGrad: (1, {}),
    IMTLG: (1, {}),
    ConFIG: (1, {}),
    AlignedMTL: (1, {}),
    PCGrad: (1, {"seed": 0}),
    GradVac: (1, {"seed": 0}),
    GradDrop: (1, {"seed": 0}),
    DBMTL: (1, {}),
    NashMTL: (0, {"max_norm": 0.0}),
}

#: The direction depends on the unit gradients only: g(D J) is parallel to g(J) for a positive
#: diagonal D (IMTL-G and ConFIG: equal projections on the u_t); Nash-MTL's whole update is
#: invariant (w -> D^-1 w).
ROW_SCALE_DIRECTION = [IMTLG, ConFIG]


def build(cls: type[GradientAggregator], T: int, **kwargs) -> GradientAggregator:
    if "seed" in inspect.signature(cls).parameters:
        kwargs.setdefault("seed", 0)
    return cls(T, **kwargs)


def rand_J(T: int, P: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(T, P, generator=gen, dtype=torch.float64)
    if T > 1:
        J[1] -= 1.5 * J[0]  # a conflicting pair
    return J.to(dtype)


def rand_losses(T: int, seed: int) -> torch.Tensor:
    return 0.5 + torch.rand(T, generator=torch.Generator().manual_seed(seed))


def test_discovery_finds_every_exported_aggregator() -> None:
    assert len(ALL) >= 17 and {UPGrad, MGDA, NashMTL} <= set(ALL)
    listed = set(NON_CONFLICTING) | set(NON_CONFLICTING_IF) | set(HOMOGENEOUS) | set(ROW_SCALE_DIRECTION)
    assert listed <= set(ALL)


@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_shape_dtype_and_finite(cls: type[GradientAggregator]) -> None:
    for T in (1, 2, 5):
        for P in (1, 3, 17):
            for dtype in (torch.float32, torch.float64):
                J = rand_J(T, P, 7 * T + P, dtype)
                agg = build(cls, T)
                g = agg(J, rand_losses(T, T))
                assert g.shape == (P,) and g.dtype == dtype, (T, P, dtype)
                assert torch.isfinite(g).all(), (T, P, dtype)
                if agg.last_weights is not None:
                    assert agg.last_weights.shape == (T,) and torch.isfinite(agg.last_weights).all()
                    torch.testing.assert_close(agg.last_weights.double() @ J.double(), g.double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_finite_on_badly_scaled_and_degenerate_jacobians(cls: type[GradientAggregator]) -> None:
    scales = torch.logspace(-4, 4, 5, dtype=torch.float64)[:, None]
    g = rand_J(1, 6, 3)[0]
    cases = [
        rand_J(5, 8, 1) * scales,  # row norms over 8 orders of magnitude
        rand_J(5, 3, 2),  # more tasks than dimensions
        torch.stack([g, -g, 2 * g, torch.zeros_like(g), g + rand_J(1, 6, 4)[0]]),  # opposite, zero, parallel
    ]
    for J in cases:
        agg = build(cls, 5)
        for _ in range(2):  # the stateful ones also on their second call
            assert torch.isfinite(agg(J.float(), rand_losses(5, 0))).all()


@pytest.mark.parametrize("cls", NON_CONFLICTING + list(NON_CONFLICTING_IF), ids=lambda c: c.__name__)
def test_non_conflicting(cls: type[GradientAggregator]) -> None:
    condition = NON_CONFLICTING_IF.get(cls)
    checked = 0
    for T in (2, 3, 5):
        if condition == "two" and T != 2:
            continue
        for P in (3, 8):
            if condition == "independent" and P < T:
                continue
            for seed in range(6):
                J = rand_J(T, P, 100 * T + 10 * P + seed) * torch.logspace(-1, 1, T, dtype=torch.float64)[:, None]
                agg = build(cls, T)
                g = agg(J.float(), rand_losses(T, seed)).double()
                # float32 round-off, relative to the rows (at a Pareto-stationary J, g is round-off).
                allowed = 1e-5 * J.norm(dim=1) * J.norm(dim=1).max()
                if cls in (UPGrad, DualProj):
                    # Their ridge: the KKT conditions of min v^T (G / tr G + reg_eps I) v give
                    # J g >= -reg_eps tr(G) w (documented). With row norms far apart this is not
                    # small for the small rows: the guarantee is only up to it.
                    allowed = allowed + agg.reg_eps * (J @ J.T).trace() * agg.last_weights.double().abs()
                assert torch.all(J @ g >= -allowed), (T, P, seed, J @ g, allowed)
                checked += 1
    assert checked >= 12


@pytest.mark.parametrize("cls", PERMUTATION_INVARIANT, ids=lambda c: c.__name__)
def test_permutation_invariance(cls: type[GradientAggregator]) -> None:
    T, P = 4, 9
    perm = torch.tensor([2, 0, 3, 1])
    a, b = build(cls, T), build(cls, T)
    for step in range(3):  # stateful methods: the same permutation at every step
        J = rand_J(T, P, 50 + step)
        losses = rand_losses(T, step)
        ga, gb = a(J.float(), losses), b(J[perm].float(), losses[perm])
        scale = J.norm(dim=1).max()
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-5 * float(scale))


@pytest.mark.parametrize("cls", list(HOMOGENEOUS), ids=lambda c: c.__name__)
def test_scaling(cls: type[GradientAggregator]) -> None:
    degree, kwargs = HOMOGENEOUS[cls]
    for T in (2, 3, 5):
        J = rand_J(T, 7, 200 + T)
        losses = rand_losses(T, T)
        base = build(cls, T, **kwargs)(J.float(), losses).double()
        for c in (0.01, 3.0, 100.0):
            g = build(cls, T, **kwargs)((c * J).float(), losses).double()
            torch.testing.assert_close(g, c**degree * base, rtol=2e-4, atol=1e-6 * c**degree * float(base.norm()))


@pytest.mark.parametrize("cls", ROW_SCALE_DIRECTION, ids=lambda c: c.__name__)
def test_direction_invariant_to_row_scales(cls: type[GradientAggregator]) -> None:
    for T, P in ((2, 4), (3, 7), (5, 9)):
        J = rand_J(T, P, 300 + T)
        D = torch.logspace(-2, 2, T, dtype=torch.float64)[:, None]
        g, gd = build(cls, T)(J.float()).double(), build(cls, T)((D * J).float()).double()
        cos = torch.nn.functional.cosine_similarity(g, gd, dim=0)
        assert abs(cos.item()) == pytest.approx(1.0, abs=1e-5), (T, P)


def test_nashmtl_invariant_to_row_scales() -> None:
    # G -> D G D gives w -> D^-1 w: the same update (Navon et al., scale invariance).
    for T in (2, 3, 5):
        J = rand_J(T, 8, 400 + T)
        # Within a factor 10 either way: power_balance's ridge 1e-10 on G / |G|_F perturbs tasks
        # whose squared norm is ~1e-8 of the largest by ~1%.
        D = torch.logspace(-1, 1, T, dtype=torch.float64)[:, None]
        g = NashMTL(T, max_norm=0.0)(J.float()).double()
        gd = NashMTL(T, max_norm=0.0)((D * J).float()).double()
        torch.testing.assert_close(gd, g, rtol=1e-3, atol=1e-5 * float(g.norm()))


def test_mgda_scaled_by_losses_is_not_homogeneous_but_loss_scale_free() -> None:
    # The loss normalisation divides by L_t: scaling the losses does not change MGDA's weights.
    J = rand_J(3, 5, 0)
    losses = rand_losses(3, 0)
    a, b = MGDA(3, normalization="loss"), MGDA(3, normalization="loss")
    torch.testing.assert_close(a(J.float(), losses), b(J.float(), 10 * losses), rtol=1e-5, atol=1e-6)
    assert math.isclose(float(a.last_weights.sum()), 1.0, rel_tol=1e-5)
