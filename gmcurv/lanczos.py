"""Lanczos with full reorthogonalisation for the extreme eigenpairs of a symmetric operator.

Builds an orthonormal Krylov basis ``Q`` and the tridiagonal ``T = Q^T A Q``; the Ritz
pairs ``(θ, Q s)`` of ``T`` approximate eigenpairs of ``A`` with residual
``||A Q s - θ Q s|| = |β_m s_m|`` (exact in exact arithmetic with full reorthogonalisation).
A pair is converged when its residual is at most ``tol * max|θ|`` (``criterion='residual'``),
or when its eigenvalue error bound is (``criterion='gap'``): for a Ritz pair with residual
``r`` and gap ``δ`` to the rest of the spectrum, some eigenvalue lies within
``min(r, r^2 / δ)`` of ``θ`` (Kato–Temple); ``δ`` is taken as the distance to the nearest
other Ritz value less that value's residual (the plain residual bound when that is not
positive). The gap rule stops once eigenvalues (not vectors) are accurate.

A single Krylov sequence sees each eigenvalue once, so repeated eigenvalues would be
missed. After the first run, converged pairs are *locked* and Lanczos restarts in their
orthogonal complement (`max_restarts` times, stopping as soon as a restart finds nothing
new among the top ``k``); this recovers multiplicities and eigenvalues a poor start missed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Matvec = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class LanczosResult:
    """Top-k eigenpairs (descending by the ordering `which`), with convergence data."""

    values: Tensor  # [k]
    residuals: Tensor  # [k], ||A v - θ v||
    converged: Tensor  # [k] bool
    vectors: Tensor | None  # [k, n]
    iterations: int  # Krylov steps over all runs
    n_matvecs: int
    basis: Tensor | None = None  # [m, n] the first run's orthonormal Krylov basis (keep_basis)


def _order(values: Tensor, which: str) -> Tensor:
    if which == "LA":
        return torch.argsort(values, descending=True)
    if which == "SA":
        return torch.argsort(values)
    if which == "LM":
        return torch.argsort(values.abs(), descending=True)
    raise ValueError(f"which must be LA, SA or LM, got {which!r}")


def _run(
    matvec: Matvec,
    start: Tensor,
    locked: Tensor | None,
    k: int,
    which: str,
    tol: float,
    max_iters: int,
    scale_hint: float,
    check_every: int,
    criterion: str = "residual",
    atol: float = 0.0,
):
    """One Lanczos sequence orthogonal to `locked`; returns Ritz data of its top-k."""
    n = start.numel()
    dtype = start.dtype
    Q = torch.zeros(max_iters + 1, n, dtype=dtype, device=start.device)
    alpha = torch.zeros(max_iters, dtype=torch.float64)
    beta = torch.zeros(max_iters, dtype=torch.float64)

    def orth(w: Tensor, upto: int) -> Tensor:
        for _ in range(2):  # twice is enough (Kahan–Parlett)
            if locked is not None:
                w = w - locked.T @ (locked @ w)
            w = w - Q[:upto].T @ (Q[:upto] @ w)
        return w

    q = orth(start, 0)
    q = q / q.norm()
    Q[0] = q
    m = 0
    theta = S = None
    for j in range(max_iters):
        w = matvec(Q[j]).to(dtype)
        alpha[j] = float(Q[j] @ w)
        w = orth(w, j + 1)
        b = float(w.norm())
        m = j + 1
        if m >= k and (m % check_every == 0 or m == max_iters or b < 1e-12 * max(1.0, scale_hint)):
            T = torch.diag(alpha[:m]) + torch.diag(beta[: m - 1], 1) + torch.diag(beta[: m - 1], -1)
            theta, S = torch.linalg.eigh(T)
            top = _order(theta, which)[:k]
            res = (b * S[m - 1, top]).abs()
            scale = max(float(theta.abs().max()), scale_hint, 1e-300)
            bound = error_bounds(theta, (b * S[m - 1]).abs(), top, criterion)
            if bool((bound <= max(tol * scale, atol)).all()) or b < 1e-12 * scale:
                beta[j] = b
                break
        if b < 1e-300:
            break
        beta[j] = b
        Q[j + 1] = w / b
    T = torch.diag(alpha[:m]) + torch.diag(beta[: m - 1], 1) + torch.diag(beta[: m - 1], -1)
    theta, S = torch.linalg.eigh(T)
    last_beta = float(beta[m - 1])
    top = _order(theta, which)[: min(k, m)]
    all_res = (last_beta * S[m - 1]).abs()
    res = all_res[top]
    vecs = S[:, top].T.to(dtype) @ Q[:m]
    return theta[top], res, vecs, m, error_bounds(theta, all_res, top, criterion), Q[:m]


def error_bounds(theta: Tensor, res: Tensor, top: Tensor, criterion: str) -> Tensor:
    """Eigenvalue error bounds of the Ritz values `top` (see module doc)."""
    if criterion == "residual" or len(theta) < 2:
        return res[top]
    if criterion != "gap":
        raise ValueError(f"criterion must be residual or gap, got {criterion!r}")
    out = []
    for i in top.tolist():
        others = torch.cat([torch.arange(i), torch.arange(i + 1, len(theta))])
        gap = float(((theta[others] - theta[i]).abs() - res[others]).min())
        r = float(res[i])
        out.append(min(r, r * r / gap) if gap > 0 else r)
    return torch.tensor(out, dtype=torch.float64)


def lanczos(
    matvec: Matvec,
    n: int,
    k: int,
    *,
    which: str = "LA",
    tol: float = 1e-6,
    max_iters: int | None = None,
    max_restarts: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    vectors: bool = False,
    check_every: int = 1,
    criterion: str = "residual",
    keep_basis: bool = False,
    atol: float = 0.0,
) -> LanczosResult:
    """Top-`k` eigenpairs of the symmetric ``n x n`` operator `matvec` (see module doc).

    Converged: error bound at most ``max(tol · max|θ|, atol)`` (`atol`: the accuracy the
    products themselves carry, e.g. float32 rounding).

    `keep_basis`: also return the first run's Krylov basis ``Q`` (its rows are the first
    ``m`` vectors `matvec` was called with, orthonormal to working precision), e.g. as a
    deflation sketch for a trace estimate that reuses the products."""
    if k < 1:
        raise ValueError("k must be positive")
    k = min(k, n)
    max_iters = min(n, max_iters or max(4 * k + 20, 60))
    gen = torch.Generator(device=device).manual_seed(seed)
    count = {"mv": 0}

    def counted(v: Tensor) -> Tensor:
        count["mv"] += 1
        return matvec(v)

    pairs: list[tuple[float, float, Tensor, float]] = []  # (value, residual, vector, bound)
    iterations = 0
    scale = 0.0
    basis = None

    def ok(p: tuple[float, float, Tensor, float]) -> bool:
        return p[3] <= max(tol * scale, atol, 1e-300)

    for run in range(max_restarts + 1):
        done = [p for p in pairs if ok(p)]
        if run > 0 and not done:
            break  # nothing to deflate: another start would only repeat the first run
        locked = torch.stack([p[2] for p in done]) if done else None
        budget = min(max_iters, n - len(done))
        if budget < 1:
            break
        start = torch.randn(n, generator=gen, dtype=dtype, device=device)
        theta, r, V, m, bd, Q = _run(
            counted, start, locked, k, which, tol, budget, scale, check_every, criterion, atol
        )
        if run == 0 and keep_basis:
            basis = Q
        iterations += m
        scale = max(scale, float(theta.abs().max()) if len(theta) else 0.0)
        new = list(zip(theta.tolist(), r.tolist(), list(V), bd.tolist(), strict=True))
        if run == 0:
            pairs = new
            continue
        cand = done + new
        order = _order(torch.tensor([p[0] for p in cand], dtype=torch.float64), which)[:k]
        pairs = [cand[i] for i in order.tolist()]
        if not any(i >= len(done) and ok(cand[i]) for i in order.tolist()):
            break  # the complement holds nothing that enters the top k
    values = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    residuals = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    bounds = torch.tensor([p[3] for p in pairs], dtype=torch.float64)
    converged = bounds <= max(tol * scale, atol, 1e-300)
    vecs = [p[2] for p in pairs]
    return LanczosResult(
        values=values,
        residuals=residuals,
        converged=converged,
        vectors=torch.stack(vecs) if vectors and vecs else None,
        iterations=iterations,
        n_matvecs=count["mv"],
        basis=basis,
    )


def dense_topk(A: Tensor, k: int, which: str = "LA") -> tuple[Tensor, Tensor]:
    """Reference: top-k eigenpairs of a dense symmetric matrix (values, vectors [k, n])."""
    w, V = torch.linalg.eigh(A)
    order = _order(w, which)[:k]
    return w[order], V[:, order].T


def relative_gap(values: Tensor) -> float:
    """Smallest relative gap between consecutive values (diagnostics)."""
    v = values.sort(descending=True).values
    if len(v) < 2:
        return math.inf
    return float(((v[:-1] - v[1:]).abs() / v.abs().max().clamp_min(1e-300)).min())


def lanczos_tridiagonal(
    matvec: Matvec, start: Tensor, steps: int, breakdown: float = 1e-12
) -> tuple[Tensor, Tensor]:
    """``m <= steps`` Lanczos steps from `start` with full reorthogonalisation: the
    diagonal ``α [m]`` and off-diagonal ``β [m-1]`` of ``T = Q^T A Q`` (float64), stopping
    early on an invariant subspace (``β < breakdown · max(1, |α|)``)."""
    n = start.numel()
    steps = min(steps, n)
    dtype = start.dtype
    Q = torch.zeros(steps, n, dtype=dtype, device=start.device)
    alpha: list[float] = []
    beta: list[float] = []
    Q[0] = start / start.norm()
    for j in range(steps):
        w = matvec(Q[j]).to(dtype)
        a = float(Q[j] @ w)
        alpha.append(a)
        for _ in range(2):
            w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
        b = float(w.norm())
        if j + 1 == steps or b < breakdown * max(1.0, abs(a)):
            break
        beta.append(b)
        Q[j + 1] = w / b
    return torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64)
