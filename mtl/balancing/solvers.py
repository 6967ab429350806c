"""Small convex solvers on ``T x T`` matrices, for the gradient aggregators.

Every problem an aggregator solves lives in task space: its data is the Gramian ``G = J J^T``
(``T x T``, ``T`` = number of tasks) and its unknown is a vector of task weights ``w`` (``[T]``),
never the ``P``-dimensional gradient. The solvers here are exact or second-order methods, written
with torch ops on whatever device and dtype they are given; the aggregators call them on a float64
host copy of the Gramian (see :mod:`mtl.balancing.aggregator` for why).

Solvers and tolerances:

* :func:`active_set_qp`: minimise ``1/2 x^T H x + q^T x`` subject to ``x >= 0`` and, optionally,
  ``sum(x) = 1``. A primal active-set method (Lawson and Hanson, *Solving Least Squares Problems*,
  1974, ch. 23, written on the normal equations and extended by the simplex equality). It is exact
  up to round-off: it stops when the KKT multipliers of the inactive bounds are all
  ``>= -tol * (1 + max|q_i|)`` with ``tol = 1e-10``, after scaling the problem to ``max|H_ii| = 1``
  (which does not move the minimiser and keeps the bordered KKT systems balanced). ``H`` then gets
  a ridge of ``1e-12`` so that singular Gramians (duplicated or zero gradients) give well-posed
  sub-systems; this shifts the optimum by a relative ``1e-12``.
* :func:`nonnegative_qp`, :func:`simplex_qp`, :func:`min_norm_simplex`: the two cases of it.
* :func:`dual_cone_weights`: the quadratic program of UPGrad and DualProj,
  ``min_v v^T G v  s.t.  v >= u``, one per row ``u`` of a weight matrix.
* :func:`power_balance`: the positive solution of ``G w = w^(-p)`` (Nash-MTL with ``p = 1``,
  FairGrad with ``p = 1/alpha``), by damped Newton on the strictly convex potential
  ``1/2 w^T G w - sum_i h(w_i)`` with ``h'(w) = w^(-p)``; stops when the Newton decrement is below
  ``1e-20`` (full Newton steps once it is below ``1e-6``, so a few iterations past that), when the
  line search finds no decrease, or after ``max_iter = 100`` steps; a ridge ``1e-10 I`` on the normalised ``G`` keeps Pareto-stationary
  inputs finite.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "active_set_qp",
    "dual_cone_weights",
    "min_norm_simplex",
    "nonnegative_qp",
    "power_balance",
    "simplex_qp",
]

_RIDGE = 1e-12


def _solve(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``A^-1 b`` by LU (the ridge makes ``A`` non-singular), least squares if LU still fails."""
    try:
        return np.linalg.solve(A, b)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(A, b, rcond=None)[0]


def _solve_subproblem(H: np.ndarray, q: np.ndarray, P: np.ndarray, simplex: bool) -> np.ndarray:
    """Minimiser of the quadratic on the face ``{x: x_i = 0 for i not in P}`` (and ``sum x = 1``).

    Returns a full-length ``[T]`` vector that is zero outside ``P``.
    """
    idx = np.flatnonzero(P)
    H_pp = H[np.ix_(idx, idx)]
    n = idx.size
    if simplex:
        # KKT of the equality-constrained problem: [H_pp 1; 1^T 0] [x; -lam] = [-q_p; 1].
        K = np.zeros((n + 1, n + 1))
        K[:n, :n] = H_pp
        K[:n, n] = 1.0
        K[n, :n] = 1.0
        sol = _solve(K, np.append(-q[idx], 1.0))[:n]
    else:
        sol = _solve(H_pp, -q[idx])
    x = np.zeros_like(q)
    x[idx] = sol
    return x


def _active_set(
    H: np.ndarray, q: np.ndarray, simplex: bool, tol: float, max_iter: int
) -> np.ndarray:
    T = H.shape[0]
    # Scaling the objective does not move its minimiser; unit diagonal scale keeps the bordered
    # KKT systems of the simplex case well balanced.
    diag_scale = float(np.abs(np.diag(H)).max())
    if not diag_scale > 0:
        diag_scale = max(float(np.abs(q).max()), np.finfo(np.float64).tiny)
    H = 0.5 * (H + H.T) / diag_scale + _RIDGE * np.eye(T)
    q = q / diag_scale
    thresh = tol * (1.0 + float(np.abs(q).max()))

    x = np.zeros(T)
    P = np.zeros(T, dtype=bool)
    if simplex:  # start from the best vertex of the simplex
        k = int(np.argmin(0.5 * np.diag(H) + q))
        x[k] = 1.0
        P[k] = True

    for _ in range(max_iter):
        grad = H @ x + q
        mult = grad - grad[P].mean() if simplex else grad
        mult = np.where(P, np.inf, mult)
        j = int(np.argmin(mult))
        if not mult[j] < -thresh:
            break  # KKT conditions hold
        P[j] = True
        first = True
        while True:
            s = _solve_subproblem(H, q, P, simplex)
            bad = P & (s <= 0)
            if not bad.any():
                x = s
                break
            if first and bad[j]:
                # Round-off: the entering variable cannot move; the current x is optimal.
                P[j] = False
                return x
            first = False
            alpha = float(np.clip((x[bad] / (x[bad] - s[bad])).min(), 0.0, 1.0))
            x = x + alpha * (s - x)
            P = P & (x > thresh * 1e-2)
            x = np.where(P, x, 0.0)
            if simplex:
                x = x / x.sum()  # stays on the affine set up to round-off
            if not P.any():
                break
    return x


def active_set_qp(
    H: Tensor,
    q: Tensor,
    *,
    simplex: bool = False,
    tol: float = 1e-10,
    max_iter: int | None = None,
) -> Tensor:
    """Minimise ``1/2 x^T H x + q^T x`` s.t. ``x >= 0`` (and ``sum(x) = 1`` if ``simplex``).

    The iterations are scalar-heavy, so they run in float64 NumPy on a host copy of ``H``.

    Args:
        H: ``[T, T]`` symmetric positive semi-definite matrix.
        q: ``[T]`` linear term.
        simplex: add the constraint ``sum(x) = 1``.
        tol: relative tolerance on the KKT multipliers (see the module docstring).
        max_iter: cap on outer iterations (default ``3 T + 20``; the method needs at most ``T``
            additions when no bound is dropped).

    Returns:
        ``[T]`` minimiser, same dtype and device as ``H``.
    """
    T = H.shape[0]
    max_iter = 3 * T + 20 if max_iter is None else max_iter
    H_np = H.detach().to("cpu", torch.float64).numpy()
    q_np = q.detach().to("cpu", torch.float64).numpy()
    x = np.clip(_active_set(H_np, q_np, simplex, tol, max_iter), 0.0, None)
    if simplex:
        x = x / x.sum()
    return torch.from_numpy(x).to(device=H.device, dtype=H.dtype)


def nonnegative_qp(H: Tensor, q: Tensor, **kwargs: float) -> Tensor:
    """``argmin_{x >= 0} 1/2 x^T H x + q^T x`` for ``H [T, T]`` PSD, ``q [T]``; returns ``[T]``."""
    return active_set_qp(H, q, simplex=False, **kwargs)


def simplex_qp(H: Tensor, q: Tensor, **kwargs: float) -> Tensor:
    """``argmin_{x >= 0, sum x = 1} 1/2 x^T H x + q^T x`` for ``H [T, T]`` PSD; returns ``[T]``."""
    return active_set_qp(H, q, simplex=True, **kwargs)


def min_norm_simplex(G: Tensor) -> Tensor:
    """Weights of the min-norm point of the convex hull of the rows of ``J``, given ``G = J J^T``.

    ``argmin_{w >= 0, sum w = 1} w^T G w``. ``G``: ``[T, T]``; returns ``[T]``.
    """
    return simplex_qp(G, torch.zeros_like(G[0]))


def dual_cone_weights(U: Tensor, G: Tensor) -> Tensor:
    """For each row ``u`` of ``U``, ``v = argmin_{v >= u} v^T G v``.

    By Proposition 1 of Quinton and Rey (2024), ``J^T v`` is then the projection of ``J^T u`` onto
    the dual cone ``{g : J g >= 0}`` of the rows of ``J``. Substituting ``v = u + x`` gives the
    non-negative QP ``min_{x >= 0} 1/2 x^T G x + (G u)^T x``.

    Args:
        U: ``[K, T]`` weight vectors (``u >= 0`` in the uses here).
        G: ``[T, T]`` Gramian.

    Returns:
        ``[K, T]``.
    """
    rows = [u + nonnegative_qp(G, G @ u) for u in U]
    return torch.stack(rows)


def _potential(G: Tensor, w: Tensor, p: float) -> Tensor:
    barrier = torch.log(w).sum() if p == 1.0 else (w.pow(1.0 - p) / (1.0 - p)).sum()
    return 0.5 * w @ G @ w - barrier


def power_balance(
    G: Tensor,
    p: float = 1.0,
    w0: Tensor | None = None,
    *,
    max_iter: int = 100,
    tol: float = 1e-20,
) -> Tensor:
    """Positive solution ``w`` of ``G w = w^(-p)`` (elementwise power), ``p > 0``.

    It is the stationary point of the strictly convex ``f(w) = 1/2 w^T G w - sum_i h(w_i)`` with
    ``h(w) = log w`` (``p = 1``) or ``w^(1-p) / (1-p)``. We scale ``G`` to unit Frobenius norm
    (``G = s G~``), solve ``G~ w~ = w~^(-p)`` by Newton's method with a fraction-to-the-boundary
    rule (``w`` stays positive) and Armijo backtracking, and return ``w = s^(-1/(1+p)) w~``.

    If some positive combination of the gradients is zero (a Pareto-stationary point), ``f`` is
    unbounded below and ``w`` grows along that combination; a ridge ``1e-10 I`` on ``G~`` keeps it
    finite (of order ``1e5``). The ridge perturbs the equation by a relative ``1e-10 w_i^(1+p)``.

    Args:
        G: ``[T, T]`` PSD.
        p: exponent, ``> 0``.
        w0: optional warm start ``[T]`` (positive), in the scale of ``G``.
        max_iter: Newton iterations at most.
        tol: stop when the squared Newton decrement is below ``tol``.

    Returns:
        ``[T]`` positive weights; all ones when ``G`` is zero (then any ``w`` gives ``J^T w = 0``).
    """
    T = G.shape[0]
    s = torch.linalg.matrix_norm(G)
    if not bool(s > 0):
        return torch.ones(T, dtype=G.dtype, device=G.device)
    k = s.pow(-1.0 / (1.0 + p))
    Gn = G / s + 1e-10 * torch.eye(T, dtype=G.dtype, device=G.device)
    Gn = 0.5 * (Gn + Gn.T)
    if w0 is not None and bool(torch.isfinite(w0).all()) and bool((w0 > 0).all()):
        w = w0.to(G) / k
    else:
        w = Gn.diagonal().pow(-1.0 / (1.0 + p))
    f = _potential(Gn, w, p)
    for _ in range(max_iter):
        grad = Gn @ w - w.pow(-p)
        hess = Gn + torch.diag(p * w.pow(-p - 1.0))
        step = -torch.linalg.solve(hess, grad)
        decrement = float(-(grad @ step))
        if decrement < tol:
            break
        # Largest step that keeps w positive (fraction 0.99 of the way to the boundary).
        neg = step < 0
        t = 1.0
        if bool(neg.any()):
            t = min(1.0, 0.99 * float((-w[neg] / step[neg]).min()))
        if t == 1.0 and decrement < 1e-6:
            # Quadratic-convergence region: take the full step (an Armijo test on f would only
            # compare round-off here).
            w = w + step
            f = _potential(Gn, w, p)
            continue
        for _ in range(60):
            w_new = w + t * step
            f_new = _potential(Gn, w_new, p)
            if bool(f_new <= f - 0.25 * t * decrement):
                break
            t *= 0.5
        else:
            break  # no decrease representable in float64: converged to round-off
        w, f = w_new, f_new
    return k * w
