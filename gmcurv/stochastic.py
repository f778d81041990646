"""Randomised trace and diagonal estimators over a matrix-free symmetric operator ``A``.

- Hutchinson: ``tr A = E[z^T A z]`` for Rademacher ``z`` (``E[z z^T] = I``); with ``m``
  probes the mean of ``s_i = z_i^T A z_i`` is unbiased and its standard error is
  ``std(s) / sqrt(m)`` (variance per probe ``2 (||A||_F^2 - Σ_q A_qq^2)``).
- Hutch++ (Meyer, Musco, Musco, Woodruff 2021): with ``m`` products, sketch ``Q = orth(A S)``
  from ``k = m/3`` probes, take ``tr(Q^T A Q)`` exactly (``k`` products) and Hutchinson on
  the deflated ``(I - QQ^T) A (I - QQ^T)`` with the remaining ``l = m - 2k`` probes. Since
  ``tr A = tr(Q^T A Q) + tr((I-QQ^T) A (I-QQ^T))`` for any orthonormal ``Q``, the estimate is
  unbiased conditionally on ``Q``, so the residual probes' standard error is calibrated.
- Block traces from shared products: one product ``y = A z`` over the full space gives
  every block's sample ``z_b^T y_b``; a deflation sketch may be any orthonormal basis
  (Hutch++'s ``orth(A S)``, or a Lanczos basis whose products also gave eigenvalues).
- Diagonal: ``diag A = E[z ⊙ A z]`` (Rademacher), per-entry standard errors over probes.

Probes come from a local ``torch.Generator`` seeded per estimate, never the global RNG,
as random bits (`rademacher_bits`: 64 signs per draw); per-probe samples are summed in
float64 from the products in the vectors' precision (`probe_dots`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gmcurv.errors import ConfigError
from gmcurv.estimate import Estimate
from gmcurv.params import ParamSpace

Matvec = Callable[[Tensor], Tensor]
BlockSlices = dict[str, list[slice]]
TRACE_METHODS = ("hutchinson", "hutchpp", "exact")


@dataclass(frozen=True)
class TraceEstimate:
    """A trace estimate: value, probe standard error (0 when exact), products used."""

    value: float
    stderr: float
    n_probes: int
    n_matvecs: int
    method: str
    exact: bool = False  # the value has no probe noise

    def estimate(self, method: str | None = None, converged: bool = True) -> Estimate:
        """As a reported `Estimate` (stderr None when exact)."""
        return Estimate(
            self.value,
            None if self.exact else self.stderr,
            self.n_probes,
            method or self.method,
            converged,
            n_matvecs=self.n_matvecs,
        )


def rademacher(n: int, gen: torch.Generator, dtype=torch.float64, device="cpu", count=None):
    """``±1`` entries, shape ``[n]`` or ``[count, n]``: one draw of `gen` per entry (the
    stream `gmcurv.density` and the head's baselines use; the trace estimators here use
    the 64-times cheaper `rademacher_bits`)."""
    shape = (n,) if count is None else (count, n)
    z = torch.randint(0, 2, shape, generator=gen, device=device, dtype=torch.int8)
    return z.to(dtype).mul_(2).sub_(1)


_SIGN_TABLES: dict[tuple[torch.dtype, str], Tensor] = {}


def _sign_table(dtype: torch.dtype, device) -> Tensor:
    """``[256, 8]``: row ``b`` holds ``1 - 2 bit_j(b)`` for ``j = 0..7``."""
    key = (dtype, str(device))
    table = _SIGN_TABLES.get(key)
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = _SIGN_TABLES[key] = (1 - 2 * bits).to(dtype=dtype, device=device)
    return table


def rademacher_bits(
    n: int, gen: torch.Generator, dtype=torch.float64, device="cpu", count=None
) -> Tensor:
    """``±1`` entries, shape ``[n]`` or ``[count, n]``, from random bits: each uniform
    64-bit draw of `gen` gives 64 independent signs (byte ``b`` of the draws -> entries
    ``8b .. 8b+7`` through a 256-row sign table, one gather), so a probe costs ``n/64``
    draws, not ``n`` (W1's 269k parameters, one core: 0.3 ms a probe against 2.3 ms with
    `rademacher`, whose product takes about 14 ms). Same `gen` state -> same signs (byte
    order: the platform's)."""
    rows = 1 if count is None else count
    words = -(-n // 64)
    draws = torch.empty(rows * words, dtype=torch.int64, device=device)
    draws.random_(-(2**63), None, generator=gen)  # the full 64-bit range: uniform bits
    index = draws.view(torch.uint8).to(torch.int32)
    signs = _sign_table(dtype, device).index_select(0, index).reshape(rows, words * 64)
    if count is None:
        return signs[0, :n]
    return signs[:, :n] if n == words * 64 else signs[:, :n].contiguous()


def probe_dots(slices: BlockSlices, u: Tensor, y: Tensor) -> tuple[float, dict[str, float]]:
    """``(u^T y, {b: u_b^T y_b})`` summed in float64 from the products ``u_i y_i`` in the
    vectors' own precision (at least float32; exact when ``u`` is a ``±1`` probe): no
    float64 copies of the two vectors."""
    if u.dtype not in (torch.float32, torch.float64):
        u = u.float()
    prod = u * y if y.dtype in (torch.float32, torch.float64) else u * y.float()
    total = float(prod.sum(dtype=torch.float64))
    parts = {
        b: float(sum(prod[sl].sum(dtype=torch.float64) for sl in sls)) for b, sls in slices.items()
    }
    return total, parts


def _generator(seed: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


def _mean_se(samples: Tensor) -> tuple[float, float]:
    m = samples.numel()
    mean = float(samples.mean())
    se = float(samples.std(unbiased=True)) / math.sqrt(m) if m > 1 else math.nan
    return mean, se


class _Running:
    """Mean and standard error of a growing sample in O(1) per sample (Welford), for
    stopping rules checked after every probe; reported values come from `_mean_se`."""

    __slots__ = ("m", "m2", "mean")

    def __init__(self) -> None:
        self.m, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, x: float) -> None:
        self.m += 1
        delta = x - self.mean
        self.mean += delta / self.m
        self.m2 += delta * (x - self.mean)

    def mean_se(self) -> tuple[float, float]:
        if self.m < 2:
            return self.mean, math.nan
        return self.mean, math.sqrt(self.m2 / (self.m - 1) / self.m)


def hutchinson(
    matvec: Matvec,
    n: int,
    probes: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    rtol: float | None = None,
    min_probes: int = 8,
) -> TraceEstimate:
    """``tr A ≈ mean_i z_i^T A z_i``; stops early once ``stderr <= rtol |mean|``."""
    if probes < 2:
        raise ConfigError("Hutchinson needs at least 2 probes for a standard error")
    gen = _generator(seed, device)
    samples: list[float] = []
    running = _Running()
    for i in range(probes):
        z = rademacher_bits(n, gen, dtype, device)
        samples.append(probe_dots({}, z, matvec(z))[0])
        running.add(samples[-1])
        if rtol is not None and i + 1 >= max(2, min_probes):
            mean, se = running.mean_se()
            if se <= rtol * abs(mean):
                break
    mean, se = _mean_se(torch.tensor(samples, dtype=torch.float64))
    return TraceEstimate(mean, se, len(samples), len(samples), "hutchinson")


def hutchpp(
    matvec: Matvec,
    n: int,
    matvecs: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> TraceEstimate:
    """Hutch++ with a budget of `matvecs` products (see module doc); ``n_probes`` counts
    the residual Hutchinson probes the standard error rests on."""
    k = min(matvecs // 3, n)
    if k < 1 or matvecs - 2 * k < 2:
        return hutchinson(matvec, n, max(matvecs, 2), seed=seed, dtype=dtype, device=device)
    gen = _generator(seed, device)
    S = rademacher_bits(n, gen, dtype, device, count=k)  # [k, n]
    AS = torch.stack([matvec(s).to(dtype) for s in S])
    Q = torch.linalg.qr(AS.double().T).Q.T.to(dtype)  # [k, n], orthonormal rows
    AQ = torch.stack([matvec(q).to(dtype) for q in Q])
    top = float((Q.double() * AQ.double()).sum())
    m = matvecs - 2 * k
    samples = torch.empty(m, dtype=torch.float64)
    for i in range(m):
        g = rademacher_bits(n, gen, dtype, device)
        g = g - Q.T @ (Q @ g)
        g = g - Q.T @ (Q @ g)  # twice: orthogonal to working precision
        samples[i] = probe_dots({}, g, matvec(g))[0]
    mean, se = _mean_se(samples)
    return TraceEstimate(top + mean, se, m, 2 * k + m, "hutchpp")


def exact_trace(matvec: Matvec, n: int, dtype=torch.float64, device="cpu") -> TraceEstimate:
    """``Σ_q e_q^T A e_q`` with `n` products (for small blocks)."""
    total = 0.0
    e = torch.zeros(n, dtype=dtype, device=device)
    for q in range(n):
        e[q] = 1.0
        total += float(matvec(e)[q])
        e[q] = 0.0
    return TraceEstimate(total, 0.0, n, n, "exact(basis)", True)


def trace(
    matvec: Matvec,
    n: int,
    probes: int,
    method: str = "hutchpp",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    small_exact: bool = True,
) -> TraceEstimate:
    """Dispatch: ``hutchinson`` (`probes` probes), ``hutchpp`` (`probes` products) or
    ``exact``; with `small_exact`, an operator of size ``n <= probes`` is summed exactly."""
    if method not in TRACE_METHODS:
        raise ConfigError(f"unknown trace method {method!r}", hint=f"use one of {TRACE_METHODS}")
    if method == "exact" or (small_exact and n <= probes):
        return exact_trace(matvec, n, dtype, device)
    if method == "hutchinson":
        return hutchinson(matvec, n, probes, seed=seed, dtype=dtype, device=device)
    return hutchpp(matvec, n, probes, seed=seed, dtype=dtype, device=device)


# ------------------------------------------------------------------- shared products
MIN_ADAPTIVE_PROBES = 10  # residual probes before a standard error is trusted for stopping


@dataclass(frozen=True)
class SharedTraces:
    """`shared_block_traces`' result: the total, every block, and why it stopped."""

    total: TraceEstimate
    blocks: dict[str, TraceEstimate]
    stopped: str  # 'tol' (relative standard error reached) or 'probes' (the cap)


def block_slices(space: ParamSpace, blocks: Mapping[str, Sequence[str]]) -> BlockSlices:
    """Each block's coordinate ranges in the flat space."""
    offsets = space.offsets()
    return {b: [offsets[k] for k in names] for b, names in blocks.items()}


@dataclass
class Sketch:
    """An orthonormal basis ``Q`` ([k, n] rows) with the exact part of the trace it spans:
    ``Σ_j q_j^T A q_j`` in total and per block (``Σ_j (q_j)_b^T (A q_j)_b``), and the
    products spent on it."""

    Q: Tensor | None
    top_total: float
    top: dict[str, float]
    products: int
    label: str


def shared_block_traces(
    matvec: Matvec,
    space: ParamSpace,
    blocks: Mapping[str, Sequence[str]],
    probes: int,
    method: str = "hutchpp",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    rtol: float | None = None,
    offset: float = 0.0,
    progress: Callable[[int], None] | None = None,
) -> SharedTraces:
    """``tr A`` and every block's ``tr A_bb`` from the same products over the full space.

    Hutchinson: with ``y = A z``, block ``b``'s sample is ``z_b^T y_b`` (unbiased for
    ``tr A_bb``) and the total's is ``z^T y = Σ_b z_b^T y_b``. Hutch++: with the sketch
    ``Q`` (orthonormal, from ``k = probes/3`` products) and ``Π = I - QQ^T``,
    ``tr A_bb = Σ_j (q_j)_b^T (A q_j)_b + E[(Π g)_b^T (A Π g)_b]`` for Rademacher ``g``
    (since ``tr(P_b A) = tr(Q^T P_b A Q) + tr(Π P_b A Π)``), and the blocks sum to the
    usual Hutch++ estimate. Each block's standard error is that of its own samples over
    probes; the total's is that of the summed samples (blocks are correlated).

    Stops when the total's standard error is at most ``rtol |offset + estimate|``
    (`offset`: an exactly known part of the reported value) after
    `MIN_ADAPTIVE_PROBES` probes, or at the cap of `probes` products.
    """
    if method not in ("hutchinson", "hutchpp"):
        raise ConfigError(f"unknown trace method {method!r}", hint="use hutchinson or hutchpp")
    if probes < 2:
        raise ConfigError("stochastic traces need at least 2 probes for a standard error")
    slices = block_slices(space, blocks)
    n = space.size
    gen = _generator(seed, device)

    def product(v: Tensor) -> Tensor:
        out = matvec(v).to(torch.float64)
        if progress:
            progress(1)
        return out

    sketch = Sketch(None, 0.0, dict.fromkeys(blocks, 0.0), 0, "hutchinson")
    k = min(probes // 3, n) if method == "hutchpp" else 0
    if k >= 1 and probes - 2 * k >= 2:
        S = rademacher_bits(n, gen, dtype, device, count=k)
        AS = torch.stack([product(s_) for s_ in S])
        Q = torch.linalg.qr(AS.T).Q.T.to(dtype)  # [k, n] orthonormal rows
        sketch = Sketch(Q, 0.0, dict.fromkeys(blocks, 0.0), 2 * k, "hutchpp")
        for q in Q:
            total, parts = probe_dots(slices, q, product(q))
            for b, v in parts.items():
                sketch.top[b] += v
            sketch.top_total += total
    return deflated_block_traces(
        matvec,
        space,
        blocks,
        sketch,
        probes,
        gen=gen,
        dtype=dtype,
        device=device,
        rtol=rtol,
        offset=offset,
        progress=progress,
    )


def deflated_block_traces(
    matvec: Matvec,
    space: ParamSpace,
    blocks: Mapping[str, Sequence[str]],
    sketch: Sketch,
    probes: int,
    *,
    gen: torch.Generator,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    rtol: float | None = None,
    offset: float = 0.0,
    progress: Callable[[int], None] | None = None,
    min_probes: int = 2,
) -> SharedTraces:
    """The residual phase of `shared_block_traces` for any orthonormal `sketch` (built
    independently of `gen`'s draws, so the estimate is unbiased conditionally on it):
    Hutchinson on ``Π A Π`` with ``Π = I - QQ^T`` until the total's standard error is at
    most ``rtol |offset + estimate|`` (after `MIN_ADAPTIVE_PROBES` probes) or the products,
    the sketch's included, reach `probes` (at least `min_probes` residual probes).
    A basis spanning the whole space leaves nothing to estimate (exact)."""
    slices = block_slices(space, blocks)
    names = list(blocks)
    n = space.size
    Q = sketch.Q
    if Q is not None and Q.shape[0] >= n:  # the basis spans everything: tr A = tr Q^T A Q
        used = sketch.products
        total = TraceEstimate(sketch.top_total, 0.0, 0, used, sketch.label, True)
        per = {b: TraceEstimate(sketch.top[b], 0.0, 0, used, sketch.label, True) for b in names}
        return SharedTraces(total, per, "tol")
    budget = max(probes - sketch.products, min_probes)
    rows: list[list[float]] = []  # per probe: [total, block values...]
    running = _Running()  # the total's mean and standard error, for the stopping rule
    stopped = "probes"
    while len(rows) < budget:
        g = rademacher_bits(n, gen, dtype, device)
        if Q is not None:
            g = g.to(Q.dtype)
            g = g - Q.T @ (Q @ g)
            g = g - Q.T @ (Q @ g)  # twice: orthogonal to working precision
        y = matvec(g)
        if progress:
            progress(1)
        total, parts = probe_dots(slices, g, y)
        del y
        rows.append([total, *(parts[b] for b in names)])
        running.add(total)
        m = len(rows)
        if rtol is not None and m >= min(MIN_ADAPTIVE_PROBES, probes) and m >= 2:
            mean, se = running.mean_se()
            if se <= rtol * abs(offset + sketch.top_total + mean):
                stopped = "tol"
                break
    samples = torch.tensor(rows, dtype=torch.float64).reshape(len(rows), len(names) + 1)
    m = len(rows)
    used = sketch.products + m

    def est(col: int, base: float) -> TraceEstimate:
        mean, se = _mean_se(samples[:, col])
        return TraceEstimate(base + mean, se, m, used, sketch.label)

    total = est(0, sketch.top_total)
    per = {b: est(i + 1, sketch.top[b]) for i, b in enumerate(names)}
    return SharedTraces(total, per, stopped)


# ---------------------------------------------------------------------------- diagonal
@dataclass(frozen=True)
class DiagonalEstimate:
    """``diag A`` per coordinate (flat) with per-entry standard errors."""

    value: Tensor  # [n]
    stderr: Tensor  # [n]
    n_samples: int
    n_matvecs: int
    method: str = "hutchinson-diag"

    def as_dicts(self, space: ParamSpace) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(value, stderr) in parameter layout."""
        return space.unflatten(self.value), space.unflatten(self.stderr)


def diagonal(
    matvec: Matvec,
    n: int,
    probes: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> DiagonalEstimate:
    """``diag A ≈ mean_i z_i ⊙ A z_i`` (Rademacher; exact entries have zero variance only
    when ``A`` is diagonal). Streams the first two moments, memory O(n)."""
    if probes < 2:
        raise ConfigError("the diagonal estimator needs at least 2 probes for standard errors")
    gen = _generator(seed, device)
    s1 = torch.zeros(n, dtype=torch.float64, device=device)
    s2 = torch.zeros(n, dtype=torch.float64, device=device)
    for _ in range(probes):
        z = rademacher_bits(n, gen, dtype, device)
        x = (z * matvec(z).to(dtype)).double()
        s1 += x
        s2 += x * x
    mean = s1 / probes
    var = ((s2 - probes * mean * mean) / (probes - 1)).clamp_min(0.0)
    return DiagonalEstimate(mean, (var / probes).sqrt(), probes, probes)


def hessian_diagonal(operator: Any, probes: int = 100, seed: int = 0) -> DiagonalEstimate:
    """``diag H ≈ E[z ⊙ H z]`` for a `gmcurv.hessian.CurvatureOperator` (flat layout:
    ``operator.space.unflatten`` or `DiagonalEstimate.as_dicts` give parameter layout)."""
    obj = operator.objective
    return diagonal(
        operator.matvec, operator.space.size, probes, seed=seed, dtype=obj.dtype, device=obj.device
    )
