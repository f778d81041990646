"""Hessian and GGN summaries: traces (total and per layer) and top eigenvalues.

``H = ∇² L(θ)`` and ``G = (1/N) Σ_n J_nᵀ Λ_n J_n`` for ``L = (1/N) Σ_n L_n`` are applied
matrix-free by `gmcurv.operator.CurvatureOperator` (products: `gmcurv.products`). Here:
the dense matrix for tiny models, the exact GGN trace from C-class square-root factors
(`exact_ggn_trace`, no products), ``tr H = tr G + tr(H - G)`` with Hutch++ on the residual
only, and Lanczos for the top eigenvalues — what ``gmcurv trace`` and ``gmcurv eigen``
report (`curvature_summary`, `top_eigen`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from gmcurv.data import DataSample
from gmcurv.errors import ConfigError
from gmcurv.estimate import Estimate
from gmcurv.fisher import LayerCurvature
from gmcurv.ggn import EXACT_GGN_MAX_COLUMNS, exact_ggn_columns, exact_ggn_trace
from gmcurv.lanczos import lanczos
from gmcurv.lanczos_trace import lanczos_block_traces
from gmcurv.memory import default_budget, preflight
from gmcurv.objective import Objective
from gmcurv.operator import CurvatureOperator
from gmcurv.piecewise import piecewise_linear_reason
from gmcurv.stochastic import shared_block_traces

# ------------------------------------------------------------------------------ dense
DENSE_MAX_PARAMS = 2000  # --method auto: dense below this many parameters ...
DENSE_MAX_WORK = 20_000_000  # ... and N * P at most this (P products over N examples)


def dense_matrix(op: CurvatureOperator, budget_bytes: int | None = None) -> Tensor:
    """The ``[P, P]`` matrix (float64, symmetrised) from ``P`` products with basis vectors."""
    P = op.size
    preflight(
        8.0 * P * P * 2,
        budget_bytes,
        f"the dense {P} x {P} curvature matrix",
        "use --method hutchpp / lanczos, or restrict --layers",
    )
    A = torch.zeros(P, P, dtype=torch.float64)
    chunk = max(1, min(P, 256))
    for lo in range(0, P, chunk):
        hi = min(P, lo + chunk)
        E = torch.zeros(hi - lo, P, dtype=torch.float64, device=op.objective.device)
        E[torch.arange(hi - lo), torch.arange(lo, hi)] = 1.0
        A[lo:hi] = op.matmat(E).double().cpu()
    return (A + A.T) / 2


def resolve_method(method: str, n_params: int, n: int) -> str:
    """``auto`` -> ``exact`` for tiny problems (dense matrix), else ``hutchpp``."""
    if method != "auto":
        return method
    if n_params <= DENSE_MAX_PARAMS and n_params * n <= DENSE_MAX_WORK:
        return "exact"
    return "hutchpp"


def lanczos_cap(P: int, k: int, max_iters: int | None, restarts: int = 0) -> int:
    """The most products a top-`k` Lanczos run may take (``max(4k + 20, 60)`` per start)."""
    return min(P, max_iters or max(4 * k + 20, 60)) * (1 + restarts)


DEFAULT_EIGEN_TOL = 1e-3  # Lanczos: error bounds at most this x |λ_max|
DEFAULT_TRACE_RTOL = 0.01  # stochastic traces stop at 1 % relative standard error


# ------------------------------------------------------------------ command level
@dataclass(frozen=True)
class CurvatureSummary:
    """Trace (total, per layer) and top eigenvalues of the Hessian or GGN on a sample."""

    kind: str
    method: str
    trace: Estimate
    eigenvalues: list[Estimate]
    per_layer: dict[str, LayerCurvature]
    n_params: int
    n_matvecs: int
    notes: list[str] = field(default_factory=list)
    stopped: str | None = None  # stochastic trace: 'tol' or 'probes' (the cap); else None


def graphs_first(op: CurvatureOperator, announce: Callable[[str, int | None], None]) -> None:
    """Build `op`'s gradient graphs as a phase of their own (a spinner: one step, on large
    models the longest), before its first product, so that no product bar sits at 0 while
    they are built (`CurvatureOperator.prepare`)."""
    if op.graph_pending:
        what = "Jacobian graph" if op.kind == "ggn" else "gradient graph"
        announce(f"{what} over {op.data.n:,} examples (built once)", None)
        op.prepare()


def _release(op: CurvatureOperator) -> None:
    """Free `op`'s graphs once its products are done, not whenever the operator is
    collected (``--curvature all``: the GGN's graphs would otherwise still be held while
    the Hessian's are built)."""
    op.graphs.graphs.clear()
    op.graphs.held = 0


def capture_blocks(objective: Objective) -> dict[str, tuple[tuple[str, ...], str]]:
    """Per-layer blocks, the same as the Fisher's: ``{name: (param names, kind)}``."""
    from gmcurv.capture import plan_capture

    return {p.name: (p.params, p.kind) for p in plan_capture(objective.model, objective.params)}


def _n_params(objective: Objective, names: tuple[str, ...]) -> int:
    return sum(objective.params[k].numel() for k in names)


def _dense_summary(op, A: Tensor, blocks, k: int, per_layer: bool) -> tuple[Estimate, list, dict]:
    n, P = op.n, op.size
    method = "exact(dense)"

    def eig_estimates(M: Tensor) -> list[Estimate]:
        w = torch.linalg.eigvalsh(M).flip(0)[:k]
        return [Estimate(float(v), None, n, method, True, n_matvecs=P, residual=0.0) for v in w]

    trace = Estimate.exact_value(float(torch.diagonal(A).sum()), n, method, n_matvecs=P)
    layers = {}
    if per_layer:
        offsets = op.space.offsets()
        for name, (params, kind) in blocks.items():
            idx = torch.cat([torch.arange(offsets[p].start, offsets[p].stop) for p in params])
            sub = A[idx][:, idx]
            layers[name] = LayerCurvature(
                Estimate.exact_value(float(torch.diagonal(sub).sum()), n, method, n_matvecs=P),
                len(idx),
                kind,
                eig_estimates(sub)[:1],
            )
    return trace, eig_estimates(A) if k > 0 else [], layers


def lanczos_preflight(n: int, k: int, max_iters: int | None, budget: int | None) -> None:
    """Stop early when the Lanczos basis (float64, ``max_iters + 1`` vectors of `n`) would
    exceed the memory budget (GPT-2 124M: 61 vectors are 60 GB)."""
    steps = min(n, max_iters or max(4 * k + 20, 60)) + 1
    preflight(
        8.0 * steps * n,
        budget,
        f"the Lanczos basis for the top-{k} eigenvalues ({steps} vectors of {n:,} parameters)",
        "use --k 0 (no eigenvalues), a smaller --max-iters, or restrict --layers",
    )


def sketch_fits(n: int, probes: int, budget: int | None) -> bool:
    """Whether Hutch++'s sketch (``probes/3`` vectors of `n`, with their products and
    orthonormal basis, float64) fits the memory budget."""
    limit = default_budget() if budget is None else budget
    return 3 * 8.0 * (probes // 3) * n <= limit


def lanczos_estimates(
    op: CurvatureOperator,
    k: int,
    tol: float,
    max_iters: int | None,
    seed: int,
    vectors: bool,
    restarts: int = 0,
    budget_bytes: int | None = None,
):
    """Top-k by Lanczos on `op` as `Estimate`s, converged when the eigenvalue error bound
    is within ``tol |λ_max|`` (`gmcurv.lanczos`, gap rule) — never when products are random.
    `restarts` > 0 deflates converged pairs and restarts to recover repeated eigenvalues."""
    lanczos_preflight(op.size, k, max_iters, budget_bytes)
    before = op.n_matvecs
    res = lanczos(
        op.matvec,
        op.size,
        k,
        tol=tol,
        max_iters=max_iters,
        seed=seed,
        dtype=torch.float64,
        device=op.objective.device,
        vectors=vectors,
        max_restarts=restarts,
        criterion="gap",
    )
    random = op.is_random(seed)
    return lanczos_to_estimates(res, op.n_matvecs - before, random), res, random


def lanczos_to_estimates(res, n_mv: int, random: bool = False) -> list[Estimate]:
    """A `gmcurv.lanczos.LanczosResult` as `Estimate`s (never converged when random)."""
    return [
        Estimate(
            float(v),
            None,
            res.iterations,
            "lanczos",
            bool(c) and not random,
            n_matvecs=n_mv,
            residual=float(r),
        )
        for v, r, c in zip(res.values, res.residuals, res.converged, strict=True)
    ]


def _trace_method(method: str, n_params: int, n: int) -> str:
    """`resolve_method`, refusing methods that do not estimate traces."""
    resolved = resolve_method(method, n_params, n)
    if resolved not in ("exact", "hutchinson", "hutchpp"):
        raise ConfigError(
            f"--method {resolved} does not estimate traces",
            hint="use auto, exact, hutchinson or hutchpp",
        )
    return resolved


def _cached_exact_ggn(
    objective: Objective,
    data: DataSample,
    batch_size: int,
    budget_bytes: int | None,
    progress: Callable[[int], None] | None,
    cache: dict | None,
    announce: Callable[[str, int | None], None],
    grow: bool = False,
):
    """`exact_ggn_trace`, computed once per `cache` (shared by ``--curvature all``)."""
    key = ("exact_ggn_trace", batch_size)
    if cache is not None and key in cache:
        return cache[key]
    announce("GGN from factors: examples", data.n)
    acc = exact_ggn_trace(objective, data, batch_size, budget_bytes, progress=progress, grow=grow)
    if cache is not None:
        cache[key] = acc
    return acc


def _stop_note(
    stopped: str | None, n_matvecs: int, probes: int, rtol: float | None, total: Estimate
) -> str:
    """Why a stochastic trace stopped: the tolerance (``--tol``) or the cap (``--probes``);
    at the cap, how many probes the tolerance would take (the standard error falls as
    ``1/sqrt(m)``: ``m (se / (rtol |value|))^2``), and whether the trace is distinguishable
    from zero at all (``|value| < 2 se``: a relative tolerance is then out of reach)."""
    if stopped == "tol":
        return (
            f"stochastic trace stopped at {n_matvecs} products: relative "
            f"standard error <= {rtol:g} (--tol)"
        )
    note = f"stochastic trace stopped at the cap of {probes} products (--probes) before " + (
        f"a relative standard error of {rtol:g}" if rtol else "any tolerance"
    )
    se, value, m = total.stderr, total.value, total.n_samples
    if not rtol or not se or not m or not math.isfinite(se):
        return note
    if abs(value) < 2 * se:
        return note + (
            f"; the trace is within 2 standard errors of zero ({value:.4g} ± {se:.3g}), so a "
            "relative tolerance is out of reach: read the ± as an absolute precision"
        )
    needed = math.ceil(m * (se / (rtol * abs(value))) ** 2)
    return note + f"; about {needed:,} probes would reach it (s.e. falls as 1/sqrt(probes))"


def _stochastic_traces(
    target: CurvatureOperator,
    blocks: dict[str, tuple[tuple[str, ...], str]],
    ggn_part: dict[str, tuple[float, float]],
    method: str,
    *,
    residual: bool,
    probes: int,
    per_layer: bool,
    seed: int,
    rtol: float | None,
    lanczos_run: Callable | None = None,
) -> tuple[Estimate, dict[str, Estimate], str | None, list[str]]:
    """Hutchinson / Hutch++ traces of `target` (total and per block from shared products),
    shifted by the exact GGN parts when `target` is the residual ``H - G``:
    ``tr H = tr G + tr(H - G)``. Returns (total, per block, why it stopped, notes).
    `lanczos_run(blocks, offset)`: the traces from a Lanczos basis instead (`_Krylov`)."""
    objective, n = target.objective, target.data.n
    prefix, suffix = ("exact-ggn+", "(H-G)") if residual else ("", "")
    base = sum(v for v, _ in ggn_part.values())
    wanted = {b: p for b, (p, _) in blocks.items()} if per_layer else {}
    if lanczos_run is not None:  # the eigenvalues' Lanczos basis deflates the trace
        res = lanczos_run(wanted, base)
    else:
        res = shared_block_traces(
            target.matvec,
            objective.space,
            wanted,
            probes,
            method,
            seed=seed,
            dtype=objective.dtype,
            device=objective.device,
            rtol=rtol,
            offset=base,
        )
    parts = {
        b: _shifted(e, ggn_part.get(b, (0.0, 0.0))[0], prefix, suffix, n)
        for b, e in res.blocks.items()
    }
    total = _shifted(res.total, base, prefix, suffix, n)
    if rtol and res.stopped != "tol" and not total.exact:
        # the cap came first: the trace misses the requested precision (--strict: exit 3)
        total = replace(total, converged=False)
    notes = [_stop_note(res.stopped, res.total.n_matvecs, probes, rtol, total)]
    if per_layer:
        notes.append("per-layer traces share the total's products (v_b^T (A v)_b)")
    return total, parts, res.stopped, notes


def curvature_summary(
    objective: Objective,
    data: DataSample,
    kind: str,
    *,
    method: str = "auto",
    probes: int = 100,
    k: int = 5,
    per_layer: bool = True,
    seed: int = 0,
    tol: float = 1e-3,
    max_iters: int | None = None,
    batch_size: int = 256,
    budget_bytes: int | None = None,
    progress: Callable[[int], None] | None = None,
    restarts: int = 0,
    rtol: float | None = DEFAULT_TRACE_RTOL,
    phase: Callable[[str, int | None], None] | None = None,
    cache: dict | None = None,
    grow_capture: bool = False,
) -> CurvatureSummary:
    """Everything ``gmcurv trace --curvature hessian|ggn`` reports.

    Methods: ``exact`` (dense matrix from ``P`` products), ``hutchinson`` / ``hutchpp``
    (at most `probes` products, stopping once the total's standard error is at most
    `rtol` of the reported trace; every layer's trace from the same products,
    `gmcurv.stochastic.shared_block_traces`), ``auto``: exact when tiny, else the GGN
    trace exactly from C-class factors (`exact_ggn_trace`) and, for the Hessian,
    ``tr H = tr G + tr(H - G)`` with Hutch++ on the residual ``H - G`` only — or no
    products at all when the network is piecewise linear in each layer
    (`gmcurv.piecewise`: the within-layer blocks of ``H - G`` vanish); falls back to
    Hutch++ on the matrix itself when the factors would be too many.
    Top-k eigenvalues by Lanczos (tolerance `tol` on eigenvalue error bounds relative to
    ``|λ_max|``); ``k = 0`` skips them. `phase(label, total)` announces each phase.
    `cache`: a dict shared by calls on the same objective and data (``--curvature all``),
    so that the GGN's factors are captured once for the GGN and the Hessian.
    `grow_capture`: `batch_size` is a default, so the exact GGN's capture may use larger
    batches (`gmcurv.ggn.capture_batch`).
    """
    if kind not in ("hessian", "ggn"):
        raise ConfigError(f"unknown curvature {kind!r}", hint="use hessian or ggn")
    blocks = capture_blocks(objective)
    P, n = objective.space.size, data.n
    resolved = _trace_method(method, P, n)
    announce = phase or (lambda label, total: None)
    op = CurvatureOperator(objective, data, batch_size, kind, progress=progress)
    notes: list[str] = []
    stopped: str | None = None
    eigs: list[Estimate] | None = None  # from the trace's Lanczos basis, when shared
    if resolved == "exact":
        graphs_first(op, announce)
        announce("dense matrix: products", P)
        A = dense_matrix(op, budget_bytes)
        tr, eigs, layers = _dense_summary(op, A, blocks, k, per_layer)
        _release(op)
        return CurvatureSummary(kind, "exact(dense)", tr, eigs, layers, P, op.n_matvecs, notes)

    exact_ggn = method == "auto" and exact_ggn_columns(objective, data) <= EXACT_GGN_MAX_COLUMNS
    ggn_part: dict[str, tuple[float, float]] = {}
    if exact_ggn:
        acc = _cached_exact_ggn(
            objective, data, batch_size, budget_bytes, progress, cache, announce, grow_capture
        )
        ggn_part = {b: acc.trace(b) for b in blocks}
        notes.append("GGN trace exact from the C-class square-root factors (no products)")
    pl_reason = piecewise_linear_reason(objective.model, objective.mode)
    if exact_ggn and (kind == "ggn" or pl_reason is not None):
        label = "exact(factors)" if kind == "ggn" else "exact-ggn+zero(H-G)"
        if kind == "hessian":
            notes.append(f"H - G: {pl_reason}")
        parts = {
            b: Estimate.exact_value(value, n, label, data_stderr=se, n_matvecs=0)
            for b, (value, se) in ggn_part.items()
        }
        value, se = acc.trace(None)
        total = Estimate.exact_value(value, n, label, data_stderr=se, n_matvecs=0)
    else:
        target = CurvatureOperator(objective, data, batch_size, "residual") if exact_ggn else op
        target.progress = progress
        if method == "auto" and resolved == "hutchpp" and not sketch_fits(P, probes, budget_bytes):
            resolved = "hutchinson"  # unbiased either way; Hutch++ only lowers the variance
            notes.append(
                f"Hutchinson, not Hutch++: a sketch of {probes // 3} vectors of {P:,} "
                "parameters does not fit the memory budget"
            )
        graphs_first(target, announce)
        shared = None
        if method == "auto" and not exact_ggn and k > 0 and not op.is_random(seed):
            lanczos_preflight(P, k, max_iters, budget_bytes)
            shared = _Krylov(op, k, probes, tol, max_iters, restarts, seed, rtol)
        cap = probes if shared is None else max(probes, lanczos_cap(P, k, max_iters, restarts) + 2)
        announce(f"{'H - G' if exact_ggn else 'trace'}: products", cap)
        total, parts, stopped, more = _stochastic_traces(
            target, blocks, ggn_part, resolved, residual=exact_ggn,
            probes=probes, per_layer=per_layer, seed=seed, rtol=rtol,
            lanczos_run=shared.run if shared else None,
        )  # fmt: skip
        notes += more
        if shared is not None:
            eigs = shared.eigenvalues
            notes.append(shared.note)
        if exact_ggn:
            op.n_matvecs += target.n_matvecs
        _release(target)
    if k > 0 and eigs is None:
        graphs_first(op, announce)
        announce("Lanczos: products", lanczos_cap(P, k, max_iters, restarts))
        eigs, _, random = lanczos_estimates(
            op, k, tol, max_iters, seed, False, restarts, budget_bytes
        )
        if random:
            notes.append("products are random (train mode with Dropout): nothing converged")
    _release(op)
    layers = {
        b: LayerCurvature(parts[b], _n_params(objective, p), kd, [])
        for b, (p, kd) in blocks.items()
        if b in parts
    }
    return CurvatureSummary(
        kind, total.method, total, eigs or [], layers, P, op.n_matvecs, notes, stopped
    )


@dataclass
class _Krylov:
    """The top-k Lanczos run whose basis also deflates the trace: `run` when the traces
    are asked for (`gmcurv.lanczos_trace.lanczos_block_traces`). A method, not a closure
    over itself: no reference cycle keeps the operator (and its graphs) alive after the
    summary returns."""

    op: CurvatureOperator
    k: int
    probes: int
    tol: float
    max_iters: int | None
    restarts: int
    seed: int
    rtol: float | None
    eigenvalues: list[Estimate] = field(default_factory=list)
    note: str = ""

    def run(self, blocks, base: float):
        op = self.op
        lz, res = lanczos_block_traces(
            op.matvec, op.space, blocks, self.k, self.probes, tol=self.tol,
            max_iters=self.max_iters, restarts=self.restarts, seed=self.seed,
            device=op.objective.device, rtol=self.rtol, offset=base,
        )  # fmt: skip
        self.eigenvalues = lanczos_to_estimates(lz, lz.n_matvecs)
        self.note = (
            f"the trace reuses the {lz.basis.shape[0]} Lanczos products of the top-{self.k} "
            "eigenvalues as its deflation basis (exact on that subspace), then Hutchinson "
            "probes on the complement"
        )
        return res


def _shifted(e, base: float, prefix: str, suffix: str, n: int) -> Estimate:
    """A `TraceEstimate` of the residual plus the exact GGN part, as an `Estimate`."""
    method = prefix + e.method + suffix
    if e.exact:
        return Estimate.exact_value(base + e.value, n, method, n_matvecs=e.n_matvecs)
    return Estimate(base + e.value, e.stderr, e.n_probes, method, True, n_matvecs=e.n_matvecs)


@dataclass(frozen=True)
class EigenSummary:
    """Top-k eigenvalues (and optionally unit eigenvectors in parameter layout)."""

    kind: str
    method: str
    values: list[Estimate]
    vectors: list[dict[str, Tensor]] | None
    n_params: int
    n_matvecs: int
    notes: list[str] = field(default_factory=list)


def top_eigen(
    objective: Objective,
    data: DataSample,
    kind: str,
    k: int = 5,
    *,
    method: str = "auto",
    tol: float | None = None,
    max_iters: int | None = None,
    seed: int = 0,
    vectors: bool = False,
    batch_size: int = 256,
    fisher: str = "empirical",
    budget_bytes: int | None = None,
    progress: Callable[[int], None] | None = None,
    restarts: int = 0,
    phase: Callable[[str, int | None], None] | None = None,
) -> EigenSummary:
    """What ``gmcurv eigen`` reports: the Hessian/GGN by dense ``eigh`` (``exact``, tiny
    models) or Lanczos; the Fisher on the exact Gram route (`gmcurv.fisher.fisher_eigen`).
    `phase(label, total)` announces each phase, `progress(k)` counts examples / products.
    `tol`: eigenvalue error bound relative to ``|λ_max|`` (None: 1e-3 for Lanczos, the
    kernel's own rounding for the Fisher, `gmcurv.fisher.eigen_tolerance`)."""
    P, n = objective.space.size, data.n
    announce = phase or (lambda label, total: None)
    if kind == "fisher":
        from gmcurv.capture import CaptureSteps, capture_all
        from gmcurv.fisher import eigen_products, fisher_eigen, formed_kernel

        total = None if n <= batch_size else n  # one batch: a spinner (a count sits at 0)
        announce(
            "capturing gradients" + (f" (one batch of {n:,} examples)" if total is None else ""),
            total,
        )
        # one batch: progress inside it (module calls of the forward and backward)
        steps = CaptureSteps(phase, progress) if phase and progress and total is None else None
        dg = capture_all(
            objective, data, batch_size, fisher, progress=progress, budget_bytes=budget_bytes,
            steps=steps,
        )  # fmt: skip
        K = formed_kernel(dg, "Gram kernel (rows)", announce, progress)
        announce("Gram eigenvalues (kernel products)", eigen_products(dg.n * dg.columns, k))
        res = fisher_eigen(dg, k, vectors=vectors, tol=tol, seed=seed, progress=progress, kernel=K)
        values = [
            Estimate(
                float(v), None, dg.n, res.method, bool(c), n_matvecs=res.n_matvecs,
                residual=float(r),
            )
            for v, r, c in zip(res.values, res.residuals, res.converged, strict=True)
        ]  # fmt: skip
        return EigenSummary(kind, res.method, values, res.vectors, P, res.n_matvecs)
    if kind not in ("hessian", "ggn"):
        raise ConfigError(f"unknown curvature {kind!r}", hint="use hessian, ggn or fisher")
    tol = DEFAULT_EIGEN_TOL if tol is None else tol
    resolved = method
    if method == "auto":  # dense only when Lanczos could take as many products
        cap = lanczos_cap(P, k, max_iters, restarts)
        tiny = resolve_method("auto", P, n) == "exact" and cap >= P
        resolved = "exact" if tiny else "lanczos"
    if resolved not in ("exact", "lanczos"):
        raise ConfigError(
            f"--method {method} does not compute eigenvalues",
            hint="use auto, exact or lanczos (and --curvature fisher for the Gram route)",
        )
    op = CurvatureOperator(objective, data, batch_size, kind, progress=progress)
    if resolved == "exact":
        graphs_first(op, announce)
        announce("dense matrix: products", P)
        A = dense_matrix(op, budget_bytes)
        w, V = torch.linalg.eigh(A)
        w, V = w.flip(0)[:k], V.flip(1)[:, :k]
        values = [
            Estimate(float(v), None, n, "exact(dense)", True, n_matvecs=P, residual=0.0) for v in w
        ]
        vecs = [_layout(op, V[:, j]) for j in range(len(w))] if vectors else None
        return EigenSummary(kind, "exact(dense)", values, vecs, P, op.n_matvecs)
    graphs_first(op, announce)
    announce("Lanczos: products", lanczos_cap(P, k, max_iters, restarts))
    values, res, random = lanczos_estimates(
        op, k, tol, max_iters, seed, vectors, restarts, budget_bytes
    )
    notes = ["products are random (train mode with Dropout): nothing converged"] if random else []
    vecs = None
    if vectors and res.vectors is not None:
        vecs = [_layout(op, v) for v in res.vectors]
    return EigenSummary(kind, "lanczos", values, vecs, P, op.n_matvecs, notes)


def _layout(op: CurvatureOperator, v: Tensor) -> dict[str, Tensor]:
    v = v / v.norm()
    return {
        k: t.to(op.objective.dtype).cpu().contiguous() for k, t in op.space.unflatten(v).items()
    }
