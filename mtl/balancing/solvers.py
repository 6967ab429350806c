"""Small convex solvers on ``T x T`` matrices, for the gradient aggregators.

Every problem an aggregator solves lives in task space: its data is the Gramian ``G = J J^T``
(``T x T``, ``T`` = number of tasks) and its unknown is a vector of task weights ``w`` (``[T]``),
never the ``P``-dimensional gradient. The solvers here are exact or second-order methods, written
with torch ops on whatever device and dtype they are given; the aggregators call them on a float64
host copy of the Gramian (see :mod:`mtl.balancing.aggregators.base` for why).

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
  :func:`dual_cone_weights_batched` solves the ``K`` problems of one step together by block
  principal pivoting (:func:`_pivoting_batched`; closed form for ``T <= 2``): exact, with the same
  scaling, ridge and KKT tolerance as the active set, which it falls back to for a row that does
  not reach a KKT point. Every face solve is exact, so its answer is the active set's up to
  round-off; it needs two or three batched solves where the active set needs one per freed weight.
* :func:`power_balance`: the positive solution of ``G w = w^(-p)`` (Nash-MTL with ``p = 1``,
  FairGrad with ``p = 1/alpha``), by damped Newton on the strictly convex potential
  ``1/2 w^T G w - sum_i h(w_i)`` with ``h'(w) = w^(-p)``; stops when the Newton decrement is below
  ``1e-20`` (full Newton steps once it is below ``1e-6``, so a few iterations past that), when the
  line search finds no decrease, or after ``max_iter = 100`` steps; a ridge ``1e-10 I`` on the normalised ``G`` keeps Pareto-stationary
  inputs finite.
* :func:`bargaining_weights`: :func:`power_balance` with the two cases where its equation has no
  positive solution handled explicitly: zero gradients are left out (weight 0), and an update
  whose cosine with some task gradient is below ``min_cos`` (a (near-)Pareto-stationary point,
  where the weights grow without bound) is replaced by no update at all (every weight 0).
* :func:`project_simplex`: Euclidean projection onto the probability simplex, by sorting.
* :func:`simplex_norm_program`: ``min_{w in simplex} q^T w + r sqrt(w^T G w)`` (the dual of
  CAGrad), by a safeguarded Newton iteration on the exact piecewise-linear path of the simplex QPs
  ``min t q^T w + 1/2 w^T G w``; the answer is the closed form on the optimal face, checked against
  the KKT conditions of that QP (``tol = 1e-10`` relative to the size of its gradient terms), so it
  is exact up to round-off and the ridge; optima with ``||g_w|| < 1e-7 max_i ||g_i||`` are not
  resolved (see its docstring).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

try:  # an optional compiled QP solver (pip install "mtl[qp]"): Goldfarb-Idnani's dual method
    import quadprog as _quadprog
except ImportError:  # pragma: no cover - depends on the environment
    _quadprog = None

__all__ = [
    "active_set_qp",
    "bargaining_weights",
    "dual_cone_weights",
    "dual_cone_weights_batched",
    "min_norm_simplex",
    "nonnegative_qp",
    "nonnegative_qp_batched",
    "power_balance",
    "project_simplex",
    "project_simplex_np",
    "simplex_norm_program",
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

    For ``T > 16``, block principal pivoting started from the full face (:func:`_simplex_pivoting`:
    the min-norm point of many task gradients usually weights every one of them, so a single
    bordered solve of size ``T + 1`` tends to be the answer, where the active set adds the weights
    one solve at a time), checked against the KKT conditions; otherwise, or if it does not get
    there in a few steps, the active set of :func:`simplex_qp`. Both are exact; where the
    minimiser is not unique (duplicated or linearly dependent gradients, resolved only by the
    ``1e-12`` ridge) they may return different weights for the same min-norm point.
    """
    if G.shape[0] > 16:
        w = _simplex_pivoting(_host_array(G), np.zeros(G.shape[0]), 1e-10, 12)
        if w is not None:
            return torch.from_numpy(w).to(device=G.device, dtype=G.dtype)
    return simplex_qp(G, torch.zeros_like(G[0]))


def _simplex_pivoting(H: np.ndarray, q: np.ndarray, tol: float, max_iter: int) -> np.ndarray | None:
    """``argmin_{x >= 0, sum x = 1} 1/2 x^T H x + q^T x`` by block principal pivoting from the full
    face, with :func:`_active_set`'s scaling, ridge and tolerance; None if no KKT point within
    ``max_iter`` face solves (the caller falls back to the active set).

    On a face ``F``, ``H_FF x_F + q_F = lam 1`` with ``sum x_F = 1`` gives the minimiser on the
    affine hull and the multiplier ``lam`` of ``sum x = 1``; the KKT conditions are
    ``x_F >= 0`` and ``y_i = (H x + q)_i - lam >= -thresh`` off ``F``. Infeasible indices change
    sides, all at once for the first six steps and then only the largest (Murty's rule)."""
    T = H.shape[0]
    diag_scale = float(np.abs(H.diagonal()).max())
    if not diag_scale > 0:
        return None
    H = (0.5 / diag_scale) * (H + H.T)
    H.flat[:: T + 1] += _RIDGE
    q = q / diag_scale
    thresh = tol * (1.0 + float(np.abs(q).max()))
    F = np.ones(T, dtype=bool)
    for it in range(max_iter):
        idx = np.flatnonzero(F)
        n = idx.size
        if n == 0:
            return None
        # x_F = b + lam a with a = H_FF^-1 1, b = -H_FF^-1 q_F and lam from sum x_F = 1, by Cholesky
        # (torch: its thread setting holds). A tiny pivot means a (nearly) singular face, where
        # the minimiser is not unique: leave those to the active set, so that they keep its answer.
        L, info = torch.linalg.cholesky_ex(torch.from_numpy(H[np.ix_(idx, idx)]))
        if int(info) != 0 or float(L.diagonal().min()) ** 2 < 1e-8:
            return None
        rhs = torch.from_numpy(np.stack([np.ones(n), -q[idx]], axis=1))
        ab = torch.cholesky_solve(rhs, L).numpy()
        a, b = ab[:, 0], ab[:, 1]
        lam = (1.0 - b.sum()) / a.sum()
        x = np.zeros(T)
        x[idx] = b + lam * a
        y = H @ x + q - lam
        infeasible = np.where(F, x < 0.0, y < -thresh)
        if not infeasible.any():
            if np.abs(y[F]).max() > thresh:
                return None  # an inaccurate face solve
            x = np.maximum(x, 0.0)
            return x / x.sum()
        if it < 6:
            F = F ^ infeasible
        else:
            F[T - 1 - int(np.argmax(infeasible[::-1]))] ^= True
    return None


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


def bargaining_weights(
    G: Tensor, p: float = 1.0, w0: Tensor | None = None, *, min_cos: float = 1e-3
) -> Tensor:
    """:func:`power_balance` where it has a solution, and a bounded answer where it has none.

    ``G w = w^(-p)`` has a positive solution exactly when some direction ``d`` improves every task
    (``g_t^T d > 0`` for all ``t``; Gordan's alternative: no non-negative, non-zero combination of
    the rows of ``J`` vanishes). Two cases break that, and both make :func:`power_balance` return
    weights of order ``1e5`` (its ridge is all that keeps them finite):

    * a zero row (a task without gradient, e.g. no labels in the batch): no direction can improve
      it. Rows with ``||g_t|| <= 1e-12 max_s ||g_s||`` are left out of the equation and get
      weight 0; the others are solved for alone.
    * a (near-)Pareto-stationary point (rows ``g`` and ``-g``; zero inside the convex hull of the
      gradients): every solution of the perturbed equation has a huge weight along the vanishing
      combination. The solution's update ``d = J^T w`` is kept only if its cosine with every
      remaining task gradient is at least ``min_cos``; otherwise no direction improves all tasks
      to that tolerance and the answer is the bargaining "disagreement point" ``d = 0`` (all
      weights 0).

    With ``p = 1`` (Nash-MTL) ``||d||^2 = w^T G w = T`` and ``g_t^T d = 1 / w_t``, so a kept solution
    satisfies ``w_t <= 1 / (min_cos sqrt(T) ||g_t||)``: the weights are bounded by the tolerance.

    Args:
        G: ``[T, T]`` PSD Gramian.
        p: exponent, ``> 0``.
        w0: optional warm start ``[T]`` (used for the kept rows if all positive there).
        min_cos: smallest cosine between the update and a task gradient that counts as an
            improvement for that task.

    Returns:
        ``[T]`` non-negative weights (zero for left-out rows; all zero at a stationary point).
    """
    T = G.shape[0]
    w = torch.zeros(T, dtype=G.dtype, device=G.device)
    sq_norms = G.diagonal().clamp_min(0)
    keep = sq_norms > 1e-24 * sq_norms.max()
    if not bool(keep.any()):
        return w
    idx = keep.nonzero().flatten()
    G_kept = G[idx][:, idx]
    warm = None if w0 is None else w0.to(G)[idx]
    w_kept = power_balance(G_kept, p, warm)
    Gw = G_kept @ w_kept
    d_norm = (w_kept @ Gw).clamp_min(0).sqrt()
    cos = Gw / (sq_norms[idx].sqrt() * d_norm)
    if not (bool(d_norm > 0) and bool(torch.isfinite(cos).all()) and float(cos.min()) >= min_cos):
        return w
    w[idx] = w_kept
    return w


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of ``v`` (``[T]``) onto ``{x >= 0, sum x = 1}``.

    The sort-based algorithm (Held, Wolfe and Crowder 1974; Duchi et al., ICML 2008): with ``u``
    sorted in decreasing order and ``rho`` the largest ``k`` with ``u_k > (sum_{i<=k} u_i - 1) / k``,
    the projection is ``max(v - theta, 0)`` for ``theta = (sum_{i<=rho} u_i - 1) / rho``.
    """
    u = torch.sort(v, descending=True).values
    css = torch.cumsum(u, 0) - 1.0
    k = torch.arange(1, v.numel() + 1, dtype=v.dtype, device=v.device)
    rho = int((u > css / k).nonzero().max())
    theta = css[rho] / (rho + 1)
    return (v - theta).clamp_min(0)


def project_simplex_np(v: np.ndarray) -> np.ndarray:
    """:func:`project_simplex` on a float64 NumPy vector (the same steps; for host-side loops)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    rho = int(np.flatnonzero(u > css / np.arange(1, v.size + 1))[-1])
    return np.maximum(v - css[rho] / (rho + 1), 0.0)


def _simplex_active_set_warm(
    H: np.ndarray, q: np.ndarray, x0: np.ndarray, tol: float, max_iter: int
) -> np.ndarray:
    """:func:`_active_set` on the simplex, started from a feasible ``x0`` and its support.

    The same primal active-set steps (and scaling, ridge and threshold), but it first descends
    from ``x0`` to the minimiser on the face ``x0 > 0`` (dropping blocking bounds), so that a
    start near the optimal face needs only a few solves. Falls back to the cold start if the
    face empties (round-off).
    """
    T = H.shape[0]
    diag_scale = float(np.abs(np.diag(H)).max())
    if not diag_scale > 0:
        return _active_set(H, q, True, tol, max_iter)
    Hs = 0.5 * (H + H.T) / diag_scale + _RIDGE * np.eye(T)
    qs = q / diag_scale
    thresh = tol * (1.0 + float(np.abs(qs).max()))

    def descend(x: np.ndarray, P: np.ndarray, j: int | None) -> tuple[np.ndarray, bool]:
        """Minimiser on face ``P`` (updated in place), from feasible ``x``; True if ``j`` stalls."""
        first = True
        while P.any():
            s = _solve_subproblem(Hs, qs, P, True)
            bad = P & (s <= 0)
            if not bad.any():
                return s, False
            if first and j is not None and bad[j]:
                P[j] = False  # round-off: the entering variable cannot move
                return x, True
            first = False
            alpha = float(np.clip((x[bad] / (x[bad] - s[bad])).min(), 0.0, 1.0))
            x = x + alpha * (s - x)
            P &= x > thresh * 1e-2
            x = np.where(P, x, 0.0)
            x = x / x.sum()
        raise FloatingPointError

    try:
        P = x0 > 0
        x, _ = descend(x0 / x0.sum(), P, None)
        for _ in range(max_iter):
            grad = Hs @ x + qs
            mult = np.where(P, np.inf, grad - grad[P].mean())
            j = int(np.argmin(mult))
            if not mult[j] < -thresh:
                break
            P[j] = True
            x, stalled = descend(x, P, j)
            if stalled:
                break
    except (FloatingPointError, ZeroDivisionError):
        return _active_set(H, q, True, tol, max_iter)
    return x


def _face_path(
    G: np.ndarray, q: np.ndarray, S: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The simplex QP ``min t q^T w + 1/2 w^T G w`` restricted to the face ``S`` (with ``sum w = 1``).

    Its KKT system ``[G_SS 1; 1^T 0] [w; -mu] = [-t q_S; 1]`` is linear in ``t``, so the minimiser
    is ``w(t) = w0 + t w1`` and the multiplier ``mu(t) = mu0 + t mu1``. Returns ``(idx, w0, w1,
    [mu0, mu1])``; ``G_SS`` gets the ridge of :func:`active_set_qp`.
    """
    idx = np.flatnonzero(S)
    n = idx.size
    K = np.zeros((n + 1, n + 1))
    K[:n, :n] = G[np.ix_(idx, idx)] + _RIDGE * np.eye(n)
    K[:n, n] = 1.0
    K[n, :n] = 1.0
    rhs = np.zeros((n + 1, 2))
    rhs[n, 0] = 1.0
    rhs[:n, 1] = -q[idx]
    sol = _solve(K, rhs)
    return idx, sol[:n, 0], sol[:n, 1], -sol[n]


def _face_root(
    G: np.ndarray, q: np.ndarray, r: float, S: np.ndarray, lo: float, hi: float, tol: float
) -> tuple[float | None, np.ndarray | None]:
    """Root ``t`` of ``r t = ||g_w(t)||`` along the path of face ``S`` inside ``[lo, hi]``.

    Returns ``(t, w)`` with ``w`` the full ``[T]`` weights when the face is optimal for the QP at
    that ``t`` (``w_S >= -tol`` and the KKT multipliers of the other coordinates are
    ``>= -tol * (|G w|_inf + t |q|_inf)``) and ``||g_w|| = r t`` survives clipping ``w`` to the
    simplex; else ``(t, None)`` with the first root in the bracket (or ``(None, None)``: no root on
    this face in the bracket).
    """
    idx, w0, w1, mu = _face_path(G, q, S)
    G_SS = G[np.ix_(idx, idx)]
    Gw0, Gw1 = G_SS @ w0, G_SS @ w1
    A, B, C = float(w0 @ Gw0), float(w0 @ Gw1), float(w1 @ Gw1)
    # r^2 t^2 = A + 2 B t + C t^2.
    lead = r * r - C
    if abs(lead) <= 1e-14 * max(r * r, abs(C)):
        roots = [-A / (2.0 * B)] if B != 0.0 else []
    else:
        disc = B * B + lead * A
        if disc < 0.0:
            return None, None
        sq = np.sqrt(disc)
        roots = [(B + sq) / lead, (B - sq) / lead]
    slack = 1e-12
    roots = [t for t in roots if np.isfinite(t) and lo * (1 - slack) <= t <= hi * (1 + slack)]
    if not roots:
        return None, None
    T = G.shape[0]
    qmax = float(np.abs(q).max())
    for t in roots:
        w_S = w0 + t * w1
        if w_S.min() < -tol:
            continue
        w = np.zeros(T)
        w[idx] = np.clip(w_S, 0.0, None)
        w /= w.sum()
        Gw = G @ w
        grad = Gw + t * q
        m = mu[0] + t * mu[1]
        # Relative to the size of the two terms at this point (both are small near a
        # Pareto-stationary point, where an absolute threshold would accept any face).
        thresh = max(tol * (float(np.abs(Gw).max()) + t * qmax), 1e-14)
        others = np.ones(T, dtype=bool)
        others[idx] = False
        if others.any() and (grad[others] - m).min() < -thresh:
            continue
        norm = np.sqrt(max(float(w @ G @ w), 0.0))
        if abs(norm - r * t) > 1e-8 * r * t:
            continue  # the clipping moved it: not a clean root
        return t, w
    return roots[0], None


def simplex_norm_program(
    G: Tensor,
    q: Tensor,
    r: float,
    *,
    floor: float = 1e-7,
    tol: float = 1e-10,
    rtol: float = 1e-9,
    max_iter: int = 100,
) -> Tensor:
    r"""``argmin_{w >= 0, sum w = 1} q^T w + r sqrt(w^T G w)`` for ``G [T, T]`` PSD, ``r > 0``.

    With :math:`\sqrt{s} = \min_{\lambda > 0} (s/\lambda + \lambda)/2` and :math:`t = \lambda/r` the
    problem is a one-dimensional search over the simplex QPs
    :math:`w(t) = \arg\min_{w \in \Delta} t\,q^\top w + \tfrac12 w^\top G w`: the optimum is the
    :math:`t > 0` where :math:`r t = \|g_{w(t)}\| = \sqrt{w(t)^\top G w(t)}` (before it the norm is
    larger, after it smaller). On a fixed face of the simplex :math:`w(t) = w_0 + t w_1` is affine
    (parametric QP), so on that face the equation is a quadratic in :math:`t` with a closed-form
    root. The iteration: solve the QP exactly (:func:`active_set_qp`'s method) at the current
    :math:`t`, update a bracket from the sign of :math:`\|g_{w(t)}\| - r t`, take the root on the
    QP's face; if that face is still optimal there (``w >= 0``, KKT multipliers ``>= -tol`` relative)
    it is the answer, exactly; otherwise the next :math:`t` is that root (or the bracket's geometric
    midpoint when the root leaves the bracket). Typically one to three QPs.

    Stops also, returning the QP solution, when :math:`|\|g_{w(t)}\| - r t| \le`
    ``tol`` :math:`\cdot r t` or the bracket is within ``rtol`` relatively (the bisection's
    criterion). The search starts at :math:`r t = \text{floor} \cdot \max_i \sqrt{G_{ii}}`: if
    :math:`\|g_{w(t)}\| \le r t` there, the optimum has :math:`\|g_w\|` below that (zero is, or
    nearly is, in the convex hull and the norm term wins) and that QP solution is returned, so
    optima with :math:`\|g_w\| < \text{floor} \cdot \max_i \|g_i\|` are not resolved further.

    Tolerances: the KKT tests use ``tol`` relative to the size of the two gradient terms
    (:math:`|G w|_\infty + t|q|_\infty`, at least ``1e-14`` in units of :math:`\max_i G_{ii}`), so
    they stay meaningful near Pareto-stationary points where both are small. Checked against a
    bisection over exact QPs: the weights agree to round-off (update directions to ``1e-10``
    relative) when :math:`\|g_w\| \ge 10^{-4} \max_i \|g_i\|`; between ``1e-6`` and ``1e-4`` the
    problem is ill-conditioned and the directions agree to ``~1e-3``.

    A ``G`` that is not positive definite (Cholesky fails) is projected onto the PSD cone
    (negative eigenvalues, from round-off, set to 0).

    Args:
        G: ``[T, T]`` Gramian with a positive diagonal entry.
        q: ``[T]`` linear term.
        r: weight of the norm, ``> 0``.
        floor: smallest resolved :math:`\|g_w\|`, relative to :math:`\max_i \|g_i\|` (see above).
        tol: KKT tolerance (relative, see above).
        rtol: stop when the bracket on :math:`t` is this tight (a fallback; the closed-form root
            normally ends the search first).
        max_iter: cap on QP solves after the first.

    Returns:
        ``[T]`` weights on the simplex, same dtype and device as ``G``.
    """
    G_np = G.detach().to("cpu", torch.float64).numpy()
    q_np = q.detach().to("cpu", torch.float64).numpy()
    T = G_np.shape[0]
    # Scaling G by 1/s (q by 1/s, r by 1/sqrt(s)) scales the objective and keeps the minimiser.
    s = float(np.diag(G_np).max())
    if not s > 0:
        raise ValueError("simplex_norm_program needs a Gramian with a positive diagonal entry.")
    Gn = 0.5 * (G_np + G_np.T) / s
    try:
        np.linalg.cholesky(Gn)  # positive definite: nothing to do (the common case)
    except np.linalg.LinAlgError:
        # A Gramian rounded from float32 has eigenvalues ~ -1e-7 where the gradients are linearly
        # dependent: the QPs are then non-convex near the zero combination and a KKT point need
        # not be a minimum. Clipping them moves G by no more than the rounding did. (torch's
        # eigh: it honours torch's thread setting, NumPy's BLAS threads can stall on a busy host.)
        evals, evecs = (m.numpy() for m in torch.linalg.eigh(torch.from_numpy(Gn)))
        if evals[0] < 0.0:
            Gn = (evecs * np.clip(evals, 0.0, None)) @ evecs.T
            Gn = 0.5 * (Gn + Gn.T)
    qn = q_np / s
    rn = r / np.sqrt(s)
    max_qp = 3 * T + 20

    qmax = float(np.abs(qn).max())

    def search(Gn: np.ndarray) -> tuple[np.ndarray, bool]:
        """The weights, and whether the search stopped at the floor."""

        def qp(t: float, x0: np.ndarray) -> tuple[np.ndarray, float]:
            # The QP's threshold is tol * (1 + t max|q|), absolute in units of max G_ii; for small
            # t (solutions near a Pareto-stationary point) scale it down with the linear term.
            tol_t = tol * max(min(1.0, t * qmax), 1e-4)
            x = np.clip(_simplex_active_set_warm(Gn, t * qn, x0, tol_t, max_qp), 0.0, None)
            x = x / x.sum()
            return x, float(np.sqrt(max(float(x @ Gn @ x), 0.0)))

        # ||g_w|| <= max_i ||g_i|| = 1, so r t = 1 brackets the root from above; the lower end is
        # only checked (one QP) if the search heads there.
        lo0 = floor / rn
        lo, hi = lo0, 1.0 / rn
        x = np.full(T, 1.0 / T)
        # Often every task keeps a positive weight: try the full face first (one KKT solve).
        t_root, w = _face_root(Gn, qn, rn, x > 0, lo, hi, tol)
        if w is not None:
            return w, False
        t = t_root if t_root is not None and lo < t_root < hi else lo0
        for _ in range(max_iter):
            x, norm = qp(t, x)
            if t == lo0 and norm <= rn * t:
                return x, True  # zero (nearly) in the hull, the norm term wins: ||g_w*|| < floor
            if abs(norm - rn * t) <= tol * rn * t:
                break
            if norm > rn * t:
                lo = t
            else:
                hi = t
            if hi / lo - 1.0 < rtol:
                break
            t_root, w = _face_root(Gn, qn, rn, x > 0, lo, hi, tol)
            if w is not None:
                x = w
                break
            if t_root is not None and lo < t_root < hi:
                t = t_root
            elif lo == lo0 and t != lo0:
                t = lo0
            else:
                t = float(np.sqrt(lo * hi))
        return x, False

    x, _ = search(Gn)
    return torch.from_numpy(x).to(device=G.device, dtype=G.dtype)


def _batched_face_solve(H: np.ndarray, Q: np.ndarray, P: np.ndarray) -> np.ndarray:
    """For each row ``k``, the minimiser of ``1/2 x^T H x + Q_k^T x`` on the face ``x_i = 0``
    (``i`` not in ``P_k``), as a ``[K, T]`` array that is zero outside ``P_k``.

    One batched LU of ``[K, T, T]`` systems, each ``H`` on ``P_k x P_k`` and the identity
    elsewhere: a column outside ``P_k`` holds only its unit diagonal, so partial pivoting does the
    same eliminations as on the sub-matrix ``H[P_k, P_k]`` (what :func:`_solve_subproblem` solves).
    """
    both = P[:, :, None] & P[:, None, :]
    M = np.where(both, H[None], 0.0)
    idx = np.arange(H.shape[0])
    M[:, idx, idx] = np.where(P, M[:, idx, idx], 1.0)
    rhs = np.where(P, -Q, 0.0)
    try:
        return np.linalg.solve(M, rhs[:, :, None])[:, :, 0]
    except np.linalg.LinAlgError:
        return np.stack([_solve_subproblem(H, Q[k], P[k], False) for k in range(Q.shape[0])])


def _active_set_batched(
    H: np.ndarray, Q: np.ndarray, tol: float, max_iter: int
) -> np.ndarray:
    """:func:`_active_set` (``simplex=False``) for the ``K`` linear terms ``Q [K, T]`` at once.

    Every problem takes exactly the steps it takes in :func:`_active_set`; the problems advance in
    lockstep, so each pass of the loop does one batched face solve for all problems that need one
    instead of one small solve (and its Python overhead) per problem and step.
    """
    K, T = Q.shape
    diag_scale = float(np.abs(np.diag(H)).max())
    if K == 1 or not diag_scale > 0:  # one problem, or each one has its own scale (H = 0)
        return np.stack([_active_set(H, Q[k], False, tol, max_iter) for k in range(K)])
    H = 0.5 * (H + H.T) / diag_scale + _RIDGE * np.eye(T)
    Q = Q / diag_scale
    thresh = tol * (1.0 + np.abs(Q).max(axis=1))  # [K]

    X = np.zeros((K, T))
    P = np.zeros((K, T), dtype=bool)
    done = np.zeros(K, dtype=bool)
    inner = np.zeros(K, dtype=bool)  # inside the inner (feasibility-restoring) loop
    first = np.zeros(K, dtype=bool)
    enter = np.zeros(K, dtype=np.int64)
    outer_iters = np.zeros(K, dtype=np.int64)

    while True:
        # Outer step for the problems between inner loops: KKT test, else add a variable.
        outer = ~done & ~inner
        if outer.any():
            k = np.flatnonzero(outer)
            stop = outer_iters[k] >= max_iter
            done[k[stop]] = True
            k = k[~stop]
            grad = X[k] @ H + Q[k]  # H symmetric: rows of (H x_k + q_k)
            mult = np.where(P[k], np.inf, grad)
            j = np.argmin(mult, axis=1)
            ok = ~(mult[np.arange(k.size), j] < -thresh[k])
            done[k[ok]] = True
            k, j = k[~ok], j[~ok]
            outer_iters[k] += 1
            P[k, j] = True
            enter[k] = j
            first[k] = True
            inner[k] = True
        if not inner.any():
            break
        # One inner step for every problem inside its inner loop.
        k = np.flatnonzero(inner)
        Pk = P[k]
        S = _batched_face_solve(H, Q[k], Pk)
        bad = Pk & (S <= 0)
        anybad = bad.any(axis=1)
        feasible = k[~anybad]
        X[feasible] = S[~anybad]
        inner[feasible] = False
        # Round-off: the entering variable cannot move; the current x is optimal.
        stuck = anybad & first[k] & bad[np.arange(k.size), enter[k]]
        ks = k[stuck]
        P[ks, enter[ks]] = False
        done[ks] = True
        inner[ks] = False
        step = anybad & ~stuck
        if step.any():
            kk = k[step]
            x, s, b = X[kk], S[step], bad[step]
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(b, x / (x - s), np.inf)
            alpha = np.clip(ratio.min(axis=1), 0.0, 1.0)[:, None]
            x = x + alpha * (s - x)
            p = P[kk] & (x > (thresh[kk] * 1e-2)[:, None])
            X[kk] = np.where(p, x, 0.0)
            P[kk] = p
            first[kk] = False
            inner[kk[~p.any(axis=1)]] = False
    return X


def _padded_face_solve(H: np.ndarray, Q: np.ndarray, F: np.ndarray, m: int) -> np.ndarray:
    """The face solutions of the rows of ``Q [K, T]`` on systems of size ``m >= max_k |F_k|``:
    row ``k``'s system is ``H[F_k, F_k]`` (indices in increasing order) bordered by the identity
    up to size ``m``; the identity block only carries zeros, so the solution on ``F_k`` is that of
    ``H[F_k, F_k]`` alone. Returns ``[K, T]``, zero outside ``F_k``."""
    K, T = Q.shape
    n = F.sum(axis=1)
    order = np.argsort(~F, axis=1, kind="stable")[:, :m]  # F_k first, in increasing order
    valid = np.arange(m) < n[:, None]
    M = np.where(valid[:, :, None] & valid[:, None, :], H[order[:, :, None], order[:, None, :]], np.eye(m))
    rhs = np.where(valid, -np.take_along_axis(Q, order, axis=1), 0.0)
    # Cholesky in torch (it honours torch's thread setting; NumPy's BLAS threads stall on a busy
    # host): half the flops of LU; LU if some face is not numerically positive definite.
    M_t, rhs_t = torch.from_numpy(M), torch.from_numpy(rhs).unsqueeze(2)
    L, info = torch.linalg.cholesky_ex(M_t)
    if bool((info == 0).all()):
        sol = torch.cholesky_solve(rhs_t, L).squeeze(2).numpy()
    else:
        try:
            sol = np.linalg.solve(M, rhs[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            return np.stack([_solve_subproblem(H, Q[k], F[k], False) for k in range(K)])
    X = np.zeros((K, T))
    rows, cols = np.nonzero(valid)
    X[rows, order[rows, cols]] = sol[rows, cols]
    return X


def _gathered_face_solve(H: np.ndarray, Q: np.ndarray, F: np.ndarray, eye: np.ndarray) -> np.ndarray:
    """:func:`_batched_face_solve` (``eye``: the ``T x T`` identity), on smaller systems when the
    faces are small against ``T``.

    Small ``T``: one ``[K, T, T]`` solve, ``H`` on ``F_k x F_k`` and the identity elsewhere (the
    fewest NumPy calls). Large ``T`` (UPGrad at ``T = 100`` frees about 40 of the 100 weights):
    the rows, sorted by ``|F_k|``, go in up to four groups, each group's systems gathered to its
    own largest face (:func:`_padded_face_solve`): a ``|F|^3`` solve rather than ``T^3``.
    """
    K, T = Q.shape
    if T <= 16:
        FF = F[:, :, None] & F[:, None, :]
        try:
            return np.linalg.solve(np.where(FF, H, eye), np.where(F, -Q, 0.0)[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            return np.stack([_solve_subproblem(H, Q[k], F[k], False) for k in range(K)])
    n = F.sum(axis=1)
    if K < 16:
        m = int(n.max())
        return np.zeros((K, T)) if m == 0 else _padded_face_solve(H, Q, F, m)
    X = np.zeros((K, T))
    by_size = np.argsort(n, kind="stable")
    for group in np.array_split(by_size, 4):
        m = int(n[group[-1]])
        if m > 0:
            X[group] = _padded_face_solve(H, Q[group], F[group], m)
    return X


_WARM_STEPS = 8


def _warm_free_set(H: Tensor, Q: Tensor, steps: int) -> np.ndarray:
    """A guess of the optimal free sets: the support after ``steps`` accelerated projected
    gradient steps (FISTA) from ``x = 0``, with the step from a power-iteration estimate of
    ``H``'s largest eigenvalue. Only a guess: the pivoting checks and corrects it."""
    v = torch.ones(H.shape[0], dtype=H.dtype)
    for _ in range(8):
        v = H @ v
        v = v / v.norm()
    L = 1.1 * float(v @ (H @ v))
    X = torch.zeros_like(Q)
    Z, t = X, 1.0
    for _ in range(steps):
        X_new = (Z - (Z @ H + Q) / L).clamp_min_(0.0)
        t_new = 0.5 * (1.0 + (1.0 + 4.0 * t * t) ** 0.5)
        Z = X_new + ((t - 1.0) / t_new) * (X_new - X)
        X, t = X_new, t_new
    return (X > 0).numpy()


def _pivoting_batched(
    H: np.ndarray, Q: np.ndarray, thresh: np.ndarray, max_iter: int, F: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Block principal pivoting for ``min_{x >= 0} 1/2 x^T H x + q_k^T x``, every row ``q_k`` of
    ``Q [K, T]`` at once (``H`` already scaled and ridged, ``thresh [K]`` the KKT tolerances).

    Júdice and Pires (1994), in the form of Kim and Park (SIAM J. Sci. Comput. 33(6), 2011) for
    non-negative least squares: guess the free set ``F`` (default ``q_i < 0``, the variables the
    gradient at ``x = 0`` pushes up), solve the equality-constrained problem on the face
    (``x_F = -H_FF^-1 q_F``, ``x_i = 0`` elsewhere), compute the multipliers ``y = H x + q``, and
    stop when the face solution is a KKT point: ``x_F >= 0``, ``y_i >= -thresh`` off ``F`` (and
    ``|y_F| <= thresh``, the check that the face solve was accurate). Otherwise every infeasible
    index changes sides at once; if that does not reduce their number for three consecutive
    steps, only the largest infeasible index moves (Murty's rule, which cannot cycle) until it
    does. Unlike an active-set method, which frees one variable per face solve (about 40 solves
    per problem for UPGrad at ``T = 100``), this typically needs two or three, and each step is
    one batched solve for all unfinished problems.

    Returns ``(X [K, T], converged [K])``: rows that are not KKT points after ``max_iter`` steps
    (or whose face solve was inaccurate) are flagged for the caller's fallback.
    """
    K, T = Q.shape
    H_t = torch.from_numpy(H)
    if F is None:
        F = Q < 0 if _WARM_STEPS == 0 else _warm_free_set(H_t, torch.from_numpy(Q), _WARM_STEPS)
    else:
        F = F.copy()
    eye = np.eye(T)
    X = np.zeros((K, T))
    ok = np.zeros(K, dtype=bool)
    best = np.full(K, T + 1)
    tries = np.full(K, 3)
    todo = np.arange(K)
    Ft, Qt, th = F, Q, thresh[:, None]
    for _ in range(max_iter):
        Xt = _gathered_face_solve(H, Qt, Ft, eye)
        Yt = (torch.from_numpy(Xt) @ H_t).numpy() + Qt  # H symmetric: rows of (H x_k + q_k)
        infeasible = np.where(Ft, Xt < 0.0, Yt < -th)
        count = infeasible.sum(axis=1)
        done = count == 0
        if done.any():
            k = todo[done]
            X[k] = Xt[done]
            ok[k] = (np.abs(np.where(Ft[done], Yt[done], 0.0)) <= th[done]).all(axis=1)
            if done.all():
                break
            keep = ~done
            todo, infeasible, count, Ft = todo[keep], infeasible[keep], count[keep], Ft[keep]
        improved = count < best[todo]
        left = tries[todo]
        full = improved | (left >= 1)
        best[todo] = np.where(improved, count, best[todo])
        tries[todo] = np.where(improved, 3, np.where(full, left - 1, left))
        flip = infeasible & full[:, None]
        if not full.all():
            r = np.flatnonzero(~full)
            flip[r, T - 1 - np.argmax(infeasible[r, ::-1], axis=1)] = True
        Ft = Ft ^ flip
        Qt, th = Q[todo], thresh[todo, None]
    return X, ok


def _pivoting_small(
    H: np.ndarray, Q: np.ndarray, thresh: np.ndarray, max_iter: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_pivoting_batched` for small ``T``, in as few NumPy calls as possible (at ``T <= 16``
    the calls, not the flops, are the cost): every row is solved again at each step (a finished
    row keeps its face, so its solution does not change), and the exchange rule is simpler: every
    infeasible index changes sides for the first ``_FULL_EXCHANGES`` steps, then only the largest
    one (Murty's rule, finite on its own), so no per-row bookkeeping is needed."""
    K, T = Q.shape
    F = Q < 0
    eye = np.eye(T)
    minus_q = -Q
    th = -thresh[:, None]
    for it in range(max_iter):
        try:
            X = np.linalg.solve(np.where(F[:, :, None] & F[:, None, :], H, eye), np.where(F, minus_q, 0.0)[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            X = np.stack([_solve_subproblem(H, Q[k], F[k], False) for k in range(K)])
        Y = X @ H + Q
        infeasible = np.where(F, X < 0.0, Y < th)
        if not infeasible.any():
            break
        if it < _FULL_EXCHANGES:
            F = F ^ infeasible
        else:
            r = np.flatnonzero(infeasible.any(axis=1))
            F[r, T - 1 - np.argmax(infeasible[r, ::-1], axis=1)] ^= True
    residual_ok = np.abs(np.where(F, Y, 0.0)) <= -th
    if residual_ok.all() and it < max_iter - 1:  # the common case: converged, accurate
        return X, np.ones(K, dtype=bool)
    return X, ~infeasible.any(axis=1) & residual_ok.all(axis=1)


_FULL_EXCHANGES = 6


def _nonnegative_qp_tiny(H: np.ndarray, Q: np.ndarray, tol: float) -> np.ndarray | None:
    """The rows of ``Q [K, T]`` for ``T <= 2`` in closed form, in Python floats (a NumPy call costs
    more than the whole solve here); the same scaling, ridge and KKT threshold as
    :func:`_pivoting_qp_batched`. The minimiser is the KKT point on one of the ``2^T`` faces:
    each face's solution is tried in turn (the empty face first) and the first that satisfies the
    KKT conditions is returned. None if none does (round-off in a degenerate problem): the caller
    falls back."""
    K, T = Q.shape
    h = H.tolist()
    s = max(abs(h[i][i]) for i in range(T))
    if not s > 0:
        return None
    rows = []
    if T == 1:
        a = h[0][0] / s + _RIDGE
        for (q,) in Q.tolist():
            rows.append((max(-(q / s) / a, 0.0),))
        return np.array(rows)
    a, b, c = h[0][0] / s + _RIDGE, 0.5 * (h[0][1] + h[1][0]) / s, h[1][1] / s + _RIDGE
    det = a * c - b * b
    for q1, q2 in Q.tolist():
        q1, q2 = q1 / s, q2 / s
        th = tol * (1.0 + max(abs(q1), abs(q2)))
        if q1 >= -th and q2 >= -th:
            rows.append((0.0, 0.0))
            continue
        x1 = -q1 / a
        if x1 >= 0.0 and b * x1 + q2 >= -th:
            rows.append((x1, 0.0))
            continue
        x2 = -q2 / c
        if x2 >= 0.0 and b * x2 + q1 >= -th:
            rows.append((0.0, x2))
            continue
        if not det > 0:
            return None
        x1, x2 = (b * q2 - c * q1) / det, (b * q1 - a * q2) / det
        if x1 < 0.0 or x2 < 0.0:
            return None
        rows.append((x1, x2))
    return np.array(rows)


def _pivoting_qp_batched(H: np.ndarray, Q: np.ndarray, tol: float, max_iter: int) -> np.ndarray:
    """:func:`_active_set_batched`'s problems (same scaling, ridge and KKT threshold) by
    :func:`_pivoting_batched`, with the active set as the fallback for unconverged rows."""
    K, T = Q.shape
    if T <= 2:
        X = _nonnegative_qp_tiny(H, Q, tol)
        if X is not None:
            return X
    diag_scale = float(np.abs(H.diagonal()).max())
    if not diag_scale > 0:
        return _active_set_batched(H, Q, tol, max_iter)
    Hs = (0.5 / diag_scale) * (H + H.T)
    Hs.flat[:: T + 1] += _RIDGE
    Qs = Q / diag_scale
    thresh = tol * (1.0 + np.abs(Qs).max(axis=1))
    solver = _pivoting_small if T <= 16 else _pivoting_batched
    X, ok = solver(Hs, Qs, thresh, max_iter)
    if not ok.all():
        bad = np.flatnonzero(~ok)
        X[bad] = _active_set_batched(H, Q[bad], tol, 3 * T + 20)
    return X


def nonnegative_qp_batched(
    H: Tensor, Q: Tensor, *, tol: float = 1e-10, max_iter: int | None = None
) -> Tensor:
    """``argmin_{x >= 0} 1/2 x^T H x + q^T x`` for every row ``q`` of ``Q [K, T]``; returns ``[K, T]``.

    Same method, steps and result as ``K`` calls of :func:`nonnegative_qp` (up to round-off in
    the face solves, ~1e-15 relative), in one float64 NumPy pass on the host.
    """
    T = H.shape[0]
    max_iter = 3 * T + 20 if max_iter is None else max_iter
    H_np = H.detach().to("cpu", torch.float64).numpy()
    Q_np = Q.detach().to("cpu", torch.float64).numpy().reshape(-1, T)
    X = np.clip(_active_set_batched(H_np, Q_np, tol, max_iter), 0.0, None)
    return torch.from_numpy(X).to(device=H.device, dtype=H.dtype)


def dual_cone_weights_batched(U: Tensor, G: Tensor, backend: str = "auto") -> Tensor:
    """:func:`dual_cone_weights` for the ``K`` quadratic programs (which share ``G``) at once.
    ``U [K, T]``, ``G [T, T]``; returns ``[K, T]``.

    Backends, all exact (they agree to ~1e-16 on the weights; ``tests/balancing/test_fast_paths.py``
    also checks the KKT conditions):

    * ``pivoting`` (what ``auto`` uses): block principal pivoting on all ``K`` problems at once
      (:func:`_pivoting_batched`, :func:`_pivoting_small` for ``T <= 16``, a closed form for
      ``T <= 2``): two or three batched face solves in all where an active set needs one per
      freed weight. A row that does not reach a KKT point within ``3 T + 20`` steps is solved again
      by the active set.
    * ``active_set``: the primal active set of :func:`nonnegative_qp`, batched
      (:func:`nonnegative_qp_batched`).
    * ``quadprog``: the compiled dual active-set solver of Goldfarb and Idnani (1983) from the
      ``quadprog`` package (``pip install "mtl[qp]"``), once per row, on ``G`` scaled to unit
      diagonal maximum with the same ``1e-12`` ridge.

    ``scripts/bench_solvers.py`` times them (``docs/results/bench_solvers_cpu.json``, UPGrad's
    ``K = T`` problems): pivoting takes 0.27, 0.83, 0.65 and 0.08 times quadprog's time at
    ``T = 2, 10, 40, 100`` (0.012, 0.12, 2.8 and 13 ms).
    """
    if backend not in ("auto", "pivoting", "quadprog", "active_set"):
        raise ValueError(
            f"backend must be 'auto', 'pivoting', 'quadprog' or 'active_set', got '{backend}'."
        )
    if backend == "quadprog":
        if _quadprog is None:
            raise ImportError('The quadprog backend needs the quadprog package: pip install "mtl[qp]".')
        return _dual_cone_quadprog(U, G)
    T = G.shape[0]
    G_np, U_np = _host_array(G), _host_array(U).reshape(-1, T)
    if T <= 16:
        Q_np = U_np @ G_np.T
    else:  # in torch, which honours its thread setting (NumPy's BLAS threads stall on a busy host)
        Q_np = (torch.from_numpy(U_np) @ torch.from_numpy(G_np).T).numpy()
    if backend == "active_set":
        X = _active_set_batched(G_np, Q_np, 1e-10, 3 * T + 20)
    else:
        X = _pivoting_qp_batched(G_np, Q_np, 1e-10, 3 * T + 20)
    V = torch.from_numpy(U_np + np.maximum(X, 0.0))
    return V if G.device.type == "cpu" and G.dtype == torch.float64 else V.to(device=G.device, dtype=G.dtype)


def _host_array(x: Tensor) -> np.ndarray:
    """A float64 NumPy view (or copy) of ``x`` on the host."""
    if x.device.type == "cpu" and x.dtype == torch.float64:
        return x.detach().numpy()
    return x.detach().to("cpu", torch.float64).numpy()


def _dual_cone_quadprog(U: Tensor, G: Tensor) -> Tensor:
    """``argmin_{v >= u} v^T G v`` per row ``u`` of ``U`` with quadprog's ``solve_qp``
    (``min 1/2 v^T H v - a^T v  s.t.  C^T v >= b`` with ``a = 0``, ``C = I``, ``b = u``)."""
    T = G.shape[0]
    H = G.detach().to("cpu", torch.float64).numpy()
    scale = float(np.max(np.abs(np.diag(H)))) or 1.0
    H = H / scale + _RIDGE * np.eye(T)  # the minimiser does not depend on the scale
    zeros, eye = np.zeros(T), np.eye(T)
    rows = [_quadprog.solve_qp(H, zeros, eye, u, 0)[0] for u in U.detach().to("cpu", torch.float64).numpy()]
    out = np.maximum(np.stack(rows), U.detach().to("cpu", torch.float64).numpy())  # v >= u exactly
    return torch.from_numpy(out).to(device=G.device, dtype=G.dtype)
