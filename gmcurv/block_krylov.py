"""Block Krylov (block Lanczos) for the top eigenpairs of a symmetric matrix given by
block products ``X -> A X`` — for operators where a product with ``b`` vectors costs
about one with a single vector (a formed Gram kernel: one pass over its memory).

The basis ``Q = [V_0, V_1, ...]`` spans ``{V_0, A V_0, A^2 V_0, ...}`` (``V_0`` random, or
given directions completed with random ones; ``b`` columns; every new block orthogonalised
twice against all previous ones, Kahan–Parlett). After each block product a Rayleigh–Ritz
step on the explicit products ``A Q`` gives Ritz pairs ``(θ_i, y_i = Q s_i)``; while
iterating, their residuals come from the block recurrence ``A Q = Q T + W E^T``
(``r_i = ||W s_i[last block]||``, ``W`` the new block before orthonormalisation), and the
reported top-``k`` residuals ``r_i = ||A y_i - θ_i y_i||`` are recomputed from the
products. Some eigenvalue lies within ``r_i`` of ``θ_i``, and within ``r_i^2 / δ_i`` when
the rest of the spectrum is at least ``δ_i`` away (Kato–Temple; ``δ_i`` taken from the
other Ritz values less their residuals, as in `gmcurv.lanczos.error_bounds`). It stops
when every top-``k`` bound is at most ``tol · max|θ|`` (``criterion='gap'``; ``'residual'``
asks the residuals themselves to be that small, for accurate vectors).

Cheap products, exact answers: the iterations may run on approximate products (a float32
kernel) when one final block product is exact (`exact`): a Rayleigh–Ritz step on the top
Ritz vectors with exact products gives values, true residuals and bounds that do not
depend on the iterations' rounding (the Ritz vectors only need to be good, and their
errors enter the values squared).

A block of ``b > 1`` random vectors sees each eigenvalue of multiplicity up to ``b`` and
converges at the rate set by the gap from ``λ_k`` to ``λ_{b+1}`` rather than ``λ_{k+1}``,
so clustered top eigenvalues (Fisher kernels of wide layers) need few block products.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import Tensor

from gmcurv.lanczos import LanczosResult

Matmat = Callable[[Tensor], Tensor]
T = TypeVar("T")


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Run the block with `n` intra-op threads (torch's and the BLAS/LAPACK's), restoring
    the previous count after. Small dense problems (``eigh`` of a few hundred rows, ``QR``
    of a thin block) run fastest on one thread: threaded LAPACK synchronises per panel,
    costing 1-2 orders of magnitude on a busy machine (``eigh`` of 84 x 84 on 2 threads,
    loaded: 380 ms against 0.6 ms on one)."""
    old = torch.get_num_threads()
    if n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def cost_groups(costs: Sequence[float], parts: int) -> list[list[int]]:
    """The items ``0..len(costs)-1`` in `parts` groups of about equal total cost (greedy,
    costliest first, each to the lightest group), each group in increasing order."""
    parts = max(1, min(parts, len(costs)))
    groups: list[list[int]] = [[] for _ in range(parts)]
    load = [0.0] * parts
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        j = min(range(parts), key=load.__getitem__)
        groups[j].append(i)
        load[j] += costs[i]
    return [sorted(g) for g in groups]


def in_threads(
    work: Callable[[int, list[int]], T], costs: Sequence[float], threads: int
) -> list[T]:
    """``[work(t, group_t)]`` for the `cost_groups` of `costs` over `threads` threads, the
    first group on the caller's thread, the others each on its own thread, every torch op
    on one intra-op thread. Coarse-grained parallelism for many small dense ops (row panels
    of a kernel): the ops release the GIL and run side by side with no per-op fork/join
    (which on a shared 2-core machine costs more than the small ops themselves)."""
    groups = cost_groups(costs, threads)
    if len(groups) == 1:
        return [work(0, groups[0])]
    out: list = [None] * len(groups)
    errors: list[BaseException] = []

    def run(t: int) -> None:
        try:
            if t:  # a new thread's OpenMP/BLAS team would otherwise have the default size
                torch.set_num_threads(1)
            out[t] = work(t, groups[t])
        except BaseException as e:  # re-raised on the caller's thread
            errors.append(e)

    with intra_op_threads(1):
        others = [threading.Thread(target=run, args=(t,)) for t in range(1, len(groups))]
        for th in others:
            th.start()
        run(0)
        for th in others:
            th.join()
    if errors:
        raise errors[0]
    return out


def default_block(n: int, k: int) -> int:
    """Block width: twice the wanted eigenvalues, at least 8 (at most ``n``)."""
    return max(1, min(n, max(2 * k, 8)))


def default_max_basis(n: int, k: int) -> int:
    """Basis size after which `block_lanczos` gives up (reporting what converged)."""
    return min(n, max(32 * k, 16 * default_block(n, k)))


def _project(X: Tensor, Q: Tensor) -> Tensor:
    for _ in range(2):  # twice is enough (Kahan–Parlett)
        X = X - Q @ (Q.T @ X)
    return X


def _next_block(W: Tensor, Q: Tensor, b: int, gen: torch.Generator, scale: float) -> Tensor:
    """Up to `b` orthonormal columns spanning `W` (already orthogonal to ``Q``). Directions
    that vanish (``W`` nearly inside span ``Q``: an invariant subspace) are replaced by
    random ones while ``Q`` does not yet span the whole space."""
    n = W.shape[0]
    V, R = torch.linalg.qr(W)
    V = V[:, R.diagonal().abs() > 1e-10 * max(scale, 1e-300)]
    room = n - Q.shape[1] - V.shape[1]
    missing = min(b - V.shape[1], room)
    if missing > 0:
        base = torch.cat([Q, V], 1)
        X = torch.randn(n, missing, generator=gen, dtype=W.dtype, device=W.device)
        F, Rf = torch.linalg.qr(_project(X, base))
        V = torch.cat([V, F[:, Rf.diagonal().abs() > 1e-10]], 1)
    return V


def first_block(
    start: Tensor | None,
    n: int,
    b: int,
    gen: torch.Generator,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Tensor:
    """``b`` orthonormal columns: the `start` directions (unit-normalised; dependent ones
    dropped) completed with random ones from `gen`."""
    if start is None or start.shape[1] == 0:
        return torch.linalg.qr(torch.randn(n, b, generator=gen, dtype=dtype, device=device)).Q
    X = start[:, :b].to(dtype=dtype, device=device)
    X = X / X.norm(dim=0).clamp_min(1e-300)
    return _next_block(X, X.new_zeros(n, 0), b, gen, 1.0)


def gap_bounds(theta: Tensor, res: Tensor, top: int, criterion: str) -> Tensor:
    """`gmcurv.lanczos.error_bounds` of the first `top` Ritz values (``theta`` descending),
    vectorised: ``min(r_i, r_i^2 / δ_i)`` with ``δ_i = min_{j≠i} |θ_j - θ_i| - r_j`` (the
    plain residual when ``δ_i <= 0``); ``criterion='residual'``: the residuals."""
    r = res[:top]
    if criterion == "residual" or len(theta) < 2:
        return r.clone()
    if criterion != "gap":
        raise ValueError(f"criterion must be residual or gap, got {criterion!r}")
    d = (theta[None, :] - theta[:top, None]).abs() - res[None, :]
    d[torch.arange(top), torch.arange(top)] = math.inf
    gap = d.min(1).values
    return torch.where(gap > 0, torch.minimum(r, r * r / gap.clamp_min(1e-300)), r)


def block_lanczos(
    matmat: Matmat,
    n: int,
    k: int,
    *,
    block: int | None = None,
    tol: float = 1e-10,
    max_basis: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    vectors: bool = False,
    criterion: str = "gap",
    progress: Callable[[int], None] | None = None,
    start: Tensor | None = None,
    exact: Matmat | None = None,
    product_error: float = 0.0,
    first: tuple[Tensor, Tensor] | None = None,
    atol: float = 0.0,
) -> LanczosResult:
    """The `k` largest eigenpairs of the symmetric ``n x n`` operator `matmat` (module doc).

    `max_basis` caps the basis (default `default_max_basis`); at ``n`` the
    Rayleigh–Ritz step is exact. `progress(b)` after each block product of ``b`` columns.
    ``n_matvecs`` counts columns multiplied, ``iterations`` block products. `start`:
    ``[n, s]`` directions for the first block (completed with random ones). `first`:
    ``(V_0, A V_0)``, the first block (orthonormal, e.g. from `first_block`) with its
    product already computed (by `matmat`'s rules; counted as the first block product).

    `exact`: when `matmat` computes the products only approximately (e.g. in float32, with
    errors up to `product_error` per unit column, absolute), the iterations stop on
    their own (estimated) bounds and one block product by `exact` with the top Ritz vectors
    (``b`` of them) then gives a Rayleigh–Ritz step whose values, true residuals and
    bounds are reported. The other Ritz values enter the gaps of the bounds with their
    residuals enlarged by the product error.

    `atol`: an absolute floor on the bounds, ``bound <= max(tol · max|θ|, atol)`` — the
    accuracy the operator itself carries (e.g. a float32 kernel's rounding), below which
    further products would refine only that rounding.
    """
    outer = torch.get_num_threads()

    def on_all_threads(f: Matmat | None) -> Matmat | None:
        if f is None or outer == 1:
            return f

        def run(X: Tensor) -> Tensor:
            with intra_op_threads(outer):
                return f(X)

        return run

    # the products on the caller's threads, the small dense algebra around them on one
    with intra_op_threads(1):
        return _block_lanczos(
            on_all_threads(matmat), n, k, block, tol, max_basis, seed, dtype, device,
            vectors, criterion, progress, start, on_all_threads(exact), product_error, first,
            atol,
        )  # fmt: skip


def _block_lanczos(
    matmat, n, k, block, tol, max_basis, seed, dtype, device, vectors, criterion, progress,
    start, exact, product_error, first, atol,
) -> LanczosResult:  # fmt: skip
    """`block_lanczos`'s iterations."""
    if k < 1:
        raise ValueError("k must be positive")
    k = min(k, n)
    b = block or default_block(n, k)
    cap = min(n, max_basis or default_max_basis(n, k))
    gen = torch.Generator(device=device).manual_seed(seed)
    if first is not None:
        V, AV = first[0].to(dtype), first[1].to(dtype)
        b = max(b, V.shape[1])
    else:
        V, AV = first_block(start, n, b, gen, dtype, device), None
    # the basis, its products (kept only for the residuals without `exact`) and
    # T = Q^T A Q in buffers grown in place: one copy of each new block
    Qb = V.new_empty(n, cap + b)
    AQb = V.new_empty(n, cap + b) if exact is None else None
    Tb = V.new_zeros(cap + b, cap + b)
    m = n_mv = iters = 0
    scale = 0.0
    while True:
        if AV is None:
            AV = matmat(V).to(dtype)
        w = V.shape[1]
        n_mv += w
        iters += 1
        if progress:
            progress(w)
        Qb[:, m : m + w] = V
        if AQb is not None:
            AQb[:, m : m + w] = AV
        Q = Qb[:, : m + w]
        C = Q.T @ AV  # the new block's columns of T (A symmetric: also its rows)
        C[m:] = 0.5 * (C[m:] + C[m:].T)
        Tb[: m + w, m : m + w] = C
        Tb[m : m + w, :m] = C[:m].T
        m += w
        theta, S = torch.linalg.eigh(Tb[:m, :m])
        theta, S = theta.flip(0), S.flip(1)
        scale = max(scale, float(theta.abs().max()))
        # A Q = Q T + W E^T (block recurrence; W = the new block's remainder): the residual
        # of the Ritz pair (θ_i, Q s_i) is ||W s_i[last block]||, without products. W is
        # AV less its projection C, then projected once more (Kahan–Parlett: twice)
        W = AV - Q @ C
        W = W - Q @ (Q.T @ W)
        res = (W @ S[m - w :]).norm(dim=0)
        bounds = gap_bounds(theta, res, min(k, m), criterion)
        done = bool((bounds <= max(tol * scale, atol, 1e-300)).all()) and m >= k
        if done or m >= cap:
            break
        nxt = _next_block(W[:, : min(b, cap - m)], Q, b, gen, scale)
        if nxt.shape[1] == 0:
            break  # the basis spans an invariant subspace: Ritz pairs are exact
        V, AV = nxt, None
    Q = Qb[:, :m]
    if exact is not None:
        return _exact_ritz(exact, Q, S, theta, res, k, b, scale, product_error, tol, criterion,
                           vectors, iters, n_mv, progress, atol)  # fmt: skip
    assert AQb is not None
    # reported residuals of the top pairs recomputed from the explicit products
    top = min(k, m)
    St = S[:, :top]
    res = res.clone()
    res[:top] = (AQb[:, :m] @ St - Q @ (St * theta[:top])).norm(dim=0)
    bounds = gap_bounds(theta, res, top, criterion)
    converged = bounds <= max(tol * scale, atol, 1e-300)
    vecs = (Q @ St).T.contiguous() if vectors else None
    return LanczosResult(
        values=theta[:top].clone(),
        residuals=res[:top].clone(),
        converged=converged,
        vectors=vecs,
        iterations=iters,
        n_matvecs=n_mv,
    )


def _exact_ritz(
    exact: Matmat,
    Q: Tensor,
    S: Tensor,
    theta: Tensor,
    res: Tensor,
    k: int,
    b: int,
    scale: float,
    product_error: float,
    tol: float,
    criterion: str,
    vectors: bool,
    iters: int,
    n_mv: int,
    progress: Callable[[int], None] | None,
    atol: float = 0.0,
) -> LanczosResult:
    """Rayleigh–Ritz on the top ``p = max(b, k)`` Ritz vectors, exact products (`block_lanczos`)."""
    p = min(max(b, k), Q.shape[1])
    Y = Q @ S[:, :p]
    KY = exact(Y).to(Y.dtype)
    if progress:
        progress(p)
    G = Y.T @ KY
    mu, U = torch.linalg.eigh(0.5 * (G + G.T))
    mu, U = mu.flip(0), U.flip(1)
    Y, KY = Y @ U, KY @ U
    r = (KY - Y * mu).norm(dim=0)  # true residuals
    scale = max(scale, float(mu.abs().max()))
    others = res[p:] + product_error
    top = min(k, p)
    bounds = gap_bounds(torch.cat([mu, theta[p:]]), torch.cat([r, others]), top, criterion)
    return LanczosResult(
        values=mu[:top].clone(),
        residuals=r[:top].clone(),
        converged=bounds <= max(tol * scale, atol, 1e-300),
        vectors=Y[:, :top].T.contiguous() if vectors else None,
        iterations=iters + 1,
        n_matvecs=n_mv + p,
    )
