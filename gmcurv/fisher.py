"""Closed forms for the Fisher on decomposed gradients.

With ``J`` the ``[N C, P]`` matrix whose rows are the gradients ``g[n,c]``,
``F = (1/N) J^T J`` and:

- trace: ``tr F = (1/N) Σ_{n,c} ||g[n,c]||^2`` (per block: the same sum over its parameters);
- diagonal: ``diag F = (1/N) Σ_{n,c} g[n,c]^2``;
- Gram kernel: ``K = J J^T = Σ_blocks K_block`` (``[N C, N C]``, float64); the nonzero
  eigenvalues of ``F`` are ``eig(K) / N`` and for ``K u = μ u`` the unit eigenvector is
  ``v = J^T u / sqrt(μ)`` — exact top-k for any ``P`` at cost ``O((N C)^2 Σ(I+O) + (N C)^3)``;
- products: ``F v = (1/N) J^T (J v)``.

Streaming: `FisherAccumulator` sums traces and diagonals batch by batch, keeping only the
per-example squared norms (``[N]`` per block), which also give the standard error of the
trace as an estimate of the population Fisher.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gmcurv.block_krylov import default_max_basis as block_budget
from gmcurv.capture import DecomposedGradients
from gmcurv.estimate import Estimate
from gmcurv.memory import DENSE_GRAM_LIMIT

if TYPE_CHECKING:
    from gmcurv.capture import GradientRows
    from gmcurv.gram_sum import LowerGram, PanelStream


def _blocks(dg: DecomposedGradients, names: Iterable[str] | None):
    if names is None:
        return dg.blocks
    wanted = set(names)
    return tuple(b for b in dg.blocks if b.name in wanted)


def per_example_sq_norms(dg: DecomposedGradients) -> dict[str, Tensor]:
    """``s[n] = Σ_c ||g[n,c]||^2`` restricted to each block, ``{block: [N]}``."""
    return {b.name: b.source.sq_norms().sum(1) for b in dg.blocks}


def fisher_trace(dg: DecomposedGradients) -> float:
    """``tr F`` over all captured parameters."""
    return float(sum(v.sum() for v in per_example_sq_norms(dg).values())) / dg.n


def fisher_diagonal(dg: DecomposedGradients) -> dict[str, Tensor]:
    """``diag F`` in parameter layout, ``{param: tensor}``."""
    out: dict[str, Tensor] = {}
    for b in dg.blocks:
        for k, v in b.source.diag().items():
            out[k] = v / dg.n
    return out


def gram_kernel(dg: DecomposedGradients, blocks: Iterable[str] | None = None) -> Tensor:
    """``K = J J^T`` (float64, ``[N C, N C]``), optionally over a subset of blocks.

    Formed by `gmcurv.gram_sum.summed_gram`: when every block's factors are float32, the
    blocks' kernels are summed in float32 and converted once (float64 conversions and
    mixed-precision sums of ``(N C)^2`` entries otherwise cost more than the products):
    each entry then carries at most ``B`` more float32 roundings (``B`` blocks) on top of
    `gmcurv.factors.source.rows_gram`'s bound, ``|ΔK_ij| <= (GEMM_CHUNK + B) eps |g_i|
    |g_j|`` (``Σ_b |g_{b,i}| |g_{b,j}| <= |g_i| |g_j|``), the order of the rounding the
    float32 factors carry already.
    """
    from gmcurv.gram_sum import summed_gram

    chosen = _blocks(dg, blocks)
    size = dg.n * dg.columns
    return summed_gram([b.source for b in chosen], size, dg.losses.device).double()


def jvp(dg: DecomposedGradients, vector: Mapping[str, Tensor]) -> Tensor:
    """``J v`` as ``[N, C]`` for a direction in parameter layout (missing params are 0)."""
    out = None
    for b in dg.blocks:
        if not any(k in vector for k in b.params):
            continue
        full = {
            k: vector[k]
            if k in vector
            else torch.zeros(s, dtype=dg.losses.dtype, device=dg.losses.device)
            for k, s in zip(b.params, b.shapes, strict=True)
        }
        part = b.source.jvp(full)
        out = part if out is None else out + part
    if out is None:
        return torch.zeros(dg.n, dg.columns, dtype=dg.losses.dtype, device=dg.losses.device)
    return out


def vjp(dg: DecomposedGradients, u: Tensor) -> dict[str, Tensor]:
    """``J^T u`` in parameter layout for ``u: [N, C]``."""
    out: dict[str, Tensor] = {}
    for b in dg.blocks:
        out.update(b.source.vjp(u))
    return out


def fisher_matvec(dg: DecomposedGradients, vector: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``F v = (1/N) J^T (J v)``."""
    return {k: v / dg.n for k, v in vjp(dg, jvp(dg, vector)).items()}


def fisher_quadratic_form(dg: DecomposedGradients, vector: Mapping[str, Tensor]) -> float:
    """``v^T F v = (1/N) ||J v||^2`` without forming ``F``."""
    return float(jvp(dg, vector).double().pow(2).sum()) / dg.n


@dataclass(frozen=True)
class FisherEigen:
    """Top eigenpairs of ``F`` from the Gram kernel (dense ``eigh``, or Lanczos on ``K``)."""

    values: Tensor  # [k], descending
    vectors: list[dict[str, Tensor]] | None  # unit eigenvectors in parameter layout
    residuals: Tensor  # [k] residuals of K's eigenpairs, divided by N (0 for dense eigh)
    converged: Tensor  # [k] bool
    rank: int | None  # numerical rank of K (dense route only)
    method: str  # 'gram' (dense eigh of K), 'gram-block-lanczos' (formed K), 'gram-lanczos'
    n_matvecs: int = 0
    tolerance: dict | None = None  # the stopping rule of the iterative routes (`eigen_tolerance`)


EIGH_LIMIT = 256  # up to N*C = this (or k >= N*C / 4) a full eigh of K is cheapest
SMALL_EIGH = 512  # up to this many rows a full eigh runs on one thread
EIGEN_RTOL = (
    1e-10  # default relative bound; the kernel's own rounding floors it (`eigen_tolerance`)
)


def eigen_tolerance(dg: DecomposedGradients, tol: float | None, trace_k: float) -> dict:
    """The stopping rule of `fisher_eigen`'s iterative routes: every top-k eigenvalue's
    error bound at most ``max(rtol λ_max, atol)`` (in ``F``'s units, ``K``'s divided by N).

    `tol` None (the default) matches the precision of the kernel: ``rtol = EIGEN_RTOL`` and
    ``atol = u tr K / N`` with ``u`` the unit roundoff of the factors' dtype. Storing the
    entries of ``K`` in that dtype alone moves them by ``|ΔK_ij| <= u |K_ij| <= u |g_i|
    |g_j|``, so by up to ``||ΔK||_2 <= u Σ_i |g_i|^2 = u tr K`` in eigenvalue (Weyl): a
    tighter bound would refine the rounding, not the Fisher (float32: ~2e-6 λ_max on the
    benchmark MLPs; float64: below ``rtol``). An explicit `tol` is the relative bound alone."""
    if tol is not None:
        return {"rtol": float(tol), "atol": 0.0, "rule": "requested: bound <= rtol λ_max"}
    u = torch.finfo(dg.losses.dtype).eps / 2
    return {
        "rtol": EIGEN_RTOL,
        "atol": u * trace_k / dg.n,
        "rule": f"bound <= max(rtol λ_max, atol), atol = u tr F with u = {u:.3g}, the "
        f"rounding of a {str(dg.losses.dtype).removeprefix('torch.')} kernel",
    }


def eigen_products(n_rows: int, k: int) -> int | None:
    """The most kernel-vector products `fisher_eigen` spends on ``n_rows`` rows (None: a
    full ``eigh``, no products) — a progress bar's total."""
    if n_rows <= EIGH_LIMIT or 4 * k >= n_rows:
        return None
    if n_rows <= DENSE_GRAM_LIMIT:
        return block_budget(n_rows, k)
    return min(n_rows, max(4 * k + 20, 60)) * 2  # Lanczos and one restart


def fisher_eigen(
    dg: DecomposedGradients,
    k: int = 5,
    blocks: Iterable[str] | None = None,
    vectors: bool = False,
    tol: float | None = None,
    dense_limit: int = DENSE_GRAM_LIMIT,
    seed: int = 0,
    eigh_limit: int = EIGH_LIMIT,
    progress=None,
    kernel: Tensor | LowerGram | None = None,
    first: tuple[Tensor, Tensor] | None = None,
) -> FisherEigen:
    """The `k` largest eigenvalues of ``F`` (restricted to `blocks`) and optionally vectors.

    Up to `dense_limit` rows of ``J`` the kernel ``K`` is formed
    (`gmcurv.gram_sum.summed_gram`); a full ``eigh`` runs when ``K`` is small (at most
    `eigh_limit` rows, or ``k`` a quarter of them), otherwise block Lanczos on the formed
    ``K`` (`gmcurv.block_krylov`: a product with a block of ``b`` vectors is one pass over
    ``K``, a few passes instead of a full ``eigh``'s ``O((N C)^3)``), with a full ``eigh`` as
    fallback should it not meet the tolerance (`eigen_tolerance`: `tol` relative to
    ``λ_max``, or by default the kernel's own rounding; bounds from true residuals). A
    float32 ``K`` (float32 factors) is iterated on with float32 products
    and the answer comes from one exact float64 block product (`block_lanczos`'s `exact`);
    the first block holds the output layer's cotangent rows (`start_directions`). Beyond
    `dense_limit`, Lanczos on ``u -> J (J^T u)`` (never forming ``K``). `progress(i)` is
    called after products with ``i`` vectors. `kernel`: ``K`` of `blocks` when the caller
    formed it already (a tensor, or its lower panels, `gmcurv.gram_sum.LowerGram`);
    `first`: ``(V_0, K V_0)`` with ``V_0 = first_block(...)`` of the same arguments, the
    block route's first product taken while forming ``K`` (`formed_kernel_product`).
    """
    from gmcurv.lanczos import lanczos

    sub = DecomposedGradients(_blocks(dg, blocks), dg.fisher, dg.losses)
    size = dg.n * dg.columns
    if kernel is None and size <= dense_limit:
        from gmcurv.gram_sum import summed_gram

        kernel = summed_gram([b.source for b in sub.blocks], size, dg.losses.device)
    from gmcurv.gram_sum import LowerGram

    K = LowerGram(kernel, kernel.shape[0]) if isinstance(kernel, Tensor) else kernel
    res = None
    rule = None
    blocked = K is not None and size > eigh_limit and 4 * k < size
    if blocked:
        assert K is not None
        rule = eigen_tolerance(dg, tol, float(K.diagonal().double().sum()))
        res = _block_route(K, sub, k, rule, seed, vectors, progress, first)
        if not bool(res.converged.all()):
            res = None  # rare: fall back to the exact full eigendecomposition
    if K is not None and res is None:
        from gmcurv.block_krylov import intra_op_threads

        # threaded LAPACK only pays for itself on large kernels (`intra_op_threads`)
        with intra_op_threads(1 if size <= SMALL_EIGH else torch.get_num_threads()):
            mu, U = torch.linalg.eigh(K.full().double())
        mu, U = mu.flip(0), U.flip(1)
        tol_rank = mu[0].abs() * size * torch.finfo(torch.float64).eps if size else 0.0
        rank: int | None = int((mu > tol_rank).sum())
        take = min(k, size)
        mu, U = mu[:take], U[:, :take]
        residuals = torch.zeros(take, dtype=torch.float64)
        converged = torch.ones(take, dtype=torch.bool)
        method, n_mv = "gram", 0
        rule = {"rtol": 0.0, "atol": 0.0, "rule": "dense eigh of the formed kernel (no iteration)"}
    else:
        if res is None:
            dtype = dg.losses.dtype
            trace_k = float(sum(b.source.sq_norms().double().sum() for b in sub.blocks))
            rule = eigen_tolerance(dg, tol, trace_k)

            def kmv(u: Tensor) -> Tensor:
                if progress:
                    progress(1)
                uu = u.to(dtype).reshape(dg.n, dg.columns)
                return jvp(sub, vjp(sub, uu)).reshape(-1).double()

            res = lanczos(
                kmv, size, k, tol=rule["rtol"], atol=rule["atol"] * dg.n, seed=seed,
                vectors=vectors, device=dg.losses.device,
                criterion="residual" if vectors else "gap",
            )  # fmt: skip
        mu, U = res.values, (res.vectors.T if res.vectors is not None else None)
        residuals, converged, rank = res.residuals, res.converged, None
        method = "gram-block-lanczos" if blocked else "gram-lanczos"
        n_mv = res.n_matvecs
    values = (mu / dg.n).clamp_min(0.0)
    vecs = None
    if vectors and U is not None:
        vecs = []
        for j in range(len(mu)):
            u = U[:, j].reshape(dg.n, dg.columns).to(dg.losses.dtype)
            scale = math.sqrt(max(float(mu[j]), 1e-300))
            vecs.append({name: t / scale for name, t in vjp(sub, u).items()})
    return FisherEigen(values, vecs, residuals / dg.n, converged, rank, method, n_mv, rule)


MAX_START = 32  # at most this many output units give start directions


def start_directions(dg: DecomposedGradients) -> Tensor | None:
    """Start directions for block Lanczos on ``K``: the cotangent rows ``Δ`` (``[N C, O]``)
    of the last one-token Linear block when it has at most `MAX_START` outputs — a
    classifier's output layer, whose ``Δ = ∂L/∂logits`` spans the directions that carry
    most of ``K`` (``K ⊇ (Δ Δ^T) ⊙ (A A^T)``). Only a start: the bounds do not use it."""
    from gmcurv.gram_sum import hadamard_factors

    for b in reversed(dg.blocks):
        f = hadamard_factors(b.source)
        if f is not None:
            return f.delta if f.delta.shape[1] <= MAX_START else None
    return None


def block_route(n_rows: int, k: int, eigh_limit: int = EIGH_LIMIT) -> bool:
    """Whether `fisher_eigen` runs block Lanczos on a formed kernel of `n_rows` rows."""
    return eigh_limit < n_rows <= DENSE_GRAM_LIMIT and 4 * k < n_rows


def first_block(sub: DecomposedGradients, k: int, seed: int = 0) -> Tensor:
    """The block route's first block ``V_0`` (``[N C, b]``, float64, orthonormal): the
    `start_directions` completed with random ones (`gmcurv.block_krylov.first_block`)."""
    from gmcurv.block_krylov import default_block
    from gmcurv.block_krylov import first_block as complete

    size = sub.n * sub.columns
    start = start_directions(sub)
    b = default_block(size, k)
    if start is not None:
        b = min(size, max(b, start.shape[1] + 2))  # the start plus random directions
    gen = torch.Generator(device=sub.losses.device).manual_seed(seed)
    return complete(start, size, b, gen, torch.float64, sub.losses.device)


def _block_route(
    K: LowerGram, sub: DecomposedGradients, k: int, rule, seed, vectors, progress, first=None
):
    """Block Lanczos on the formed ``K`` (`fisher_eigen`) to `rule` (`eigen_tolerance`)."""
    from gmcurv.block_krylov import block_lanczos
    from gmcurv.gram_sum import product_error

    size = K.shape[0]
    fast = K.dtype != torch.float64 and not vectors  # vectors want float64 residuals
    if fast:
        matmat, exact, err = K.matmat, K.exact, product_error(K)
    else:
        K64 = K.full().double()
        matmat, exact, err = (lambda X: K64 @ X), None, 0.0
        first = None  # a float32 first product would not be this route's
    if first is None:
        V = first_block(sub, k, seed)
        first = (V, matmat(V))
    return block_lanczos(
        matmat,
        size,
        k,
        block=first[0].shape[1],
        tol=rule["rtol"],
        atol=rule["atol"] * sub.n,
        seed=seed,
        vectors=vectors,
        device=K.device,
        max_basis=block_budget(size, k),
        criterion="residual" if vectors else "gap",  # vectors need small residuals
        progress=progress,
        exact=exact,
        product_error=err,
        first=first,
    )


@dataclass
class FisherAccumulator:
    """Streams traces and diagonals over batches of decomposed gradients."""

    diagonal: bool = True
    sq_norms: dict[str, list[Tensor]] = field(default_factory=dict)
    diag_sums: dict[str, Tensor] = field(default_factory=dict)
    losses: list[Tensor] = field(default_factory=list)
    block_params: dict[str, tuple[str, ...]] = field(default_factory=dict)
    block_kinds: dict[str, str] = field(default_factory=dict)

    def add(self, dg: DecomposedGradients, sq_norms: Mapping[str, Tensor] | None = None) -> None:
        """Add a batch; `sq_norms`: ``{block: [N, C]}`` squared norms already computed
        (e.g. the diagonal of the block's Gram kernel); blocks it lacks compute theirs."""
        for b in dg.blocks:
            self.block_params[b.name] = b.params
            self.block_kinds[b.name] = b.kind
            known = None if sq_norms is None else sq_norms.get(b.name)
            sq = b.source.sq_norms() if known is None else known
            self.sq_norms.setdefault(b.name, []).append(sq.sum(1).double())
            if self.diagonal:
                for k, v in b.source.diag().items():
                    v = v.double()
                    self.diag_sums[k] = v if k not in self.diag_sums else self.diag_sums[k] + v
        self.losses.append(dg.losses.double())

    @property
    def n(self) -> int:
        return sum(len(x) for x in self.losses)

    def per_example(self, block: str | None = None) -> Tensor:
        """``s[n]``: the example's contribution to the trace (one block or all)."""
        names = [block] if block else list(self.sq_norms)
        return sum(torch.cat(self.sq_norms[b]) for b in names)  # type: ignore[return-value]

    def trace(self, block: str | None = None) -> tuple[float, float]:
        """(``tr F`` on the sample, its standard error as an estimate of the population trace)."""
        s = self.per_example(block)
        n = s.numel()
        stderr = float(s.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
        return float(s.mean()), stderr

    def diag(self) -> dict[str, Tensor]:
        return {k: v / self.n for k, v in self.diag_sums.items()}

    def gathered(self, comm=None) -> FisherAccumulator:
        """All ranks' contributions (per-example values gathered in order, sums reduced)."""
        from gmcurv.distributed import current

        comm = comm or current()
        if not comm.active:
            return self
        return FisherAccumulator(
            diagonal=self.diagonal,
            sq_norms={k: [comm.all_gather_rows(torch.cat(v))] for k, v in self.sq_norms.items()},
            diag_sums={k: comm.all_reduce(v) for k, v in self.diag_sums.items()},
            losses=[comm.all_gather_rows(torch.cat(self.losses))],
            block_params=self.block_params,
            block_kinds=self.block_kinds,
        )

    def mean_loss(self) -> float:
        return float(torch.cat(self.losses).mean())


# --------------------------------------------------------------------------- command level
@dataclass(frozen=True)
class LayerCurvature:
    """One block's share: its trace, size, capture kind and top eigenvalues."""

    trace: Estimate
    n_params: int
    kind: str
    eigenvalues: list[Estimate] = field(default_factory=list)


@dataclass(frozen=True)
class FisherSummary:
    """Fisher trace (total, per layer), top eigenvalues and the mean loss, on a sample."""

    fisher: str
    trace: Estimate
    eigenvalues: list[Estimate]
    per_layer: dict[str, LayerCurvature]
    loss: Estimate
    rank: int | None
    n_params: int
    self_check: dict | None = None  # what the capture's one-off self-check compared
    eigen_tolerance: dict | None = None  # the eigenvalues' stopping rule (iterative routes)


def factor_bytes(dg: DecomposedGradients) -> int:
    """Bytes held by a batch of decomposed gradients."""
    return sum(b.source.nbytes() for b in dg.blocks)


def _trace_estimate(
    acc: FisherAccumulator,
    fisher: str,
    block: str | None,
    columns: int,
    col_norms: dict[str, list[Tensor]],
) -> Estimate:
    value, data_se = acc.trace(block)
    n = acc.n
    if fisher != "mc":
        return Estimate.exact_value(value, n, "exact", data_stderr=data_se)
    # Monte Carlo noise: spread across the sampled columns of each example
    names = [block] if block else list(col_norms)
    per_col = sum(torch.cat(col_norms[b]) for b in names) * columns  # [N, C]
    if columns > 1:
        var = per_col.var(dim=1, unbiased=True) / columns
        se = float(var.sum().sqrt()) / n
    else:
        se = data_se
    return Estimate(value, se, n, f"mc({columns} per example)", True, data_stderr=data_se)


def fisher_summary(
    objective,
    data,
    *,
    batch_size: int = 256,
    fisher: str = "empirical",
    mc_samples: int = 1,
    seed: int = 0,
    k: int = 5,
    per_layer: bool = True,
    budget_bytes: int | None = None,
    progress=None,
    per_layer_eigen: bool = False,
    eigen_progress=None,
    phase=None,
    tol: float | None = None,
) -> FisherSummary:
    """Everything ``gmcurv trace --curvature fisher`` reports, streamed over the data.

    Factors are kept (memory O(N (I+O)) per layer) only when eigenvalues are requested
    (``k > 0``); each block's own top-k eigenvalues only with `per_layer_eigen` (one more
    eigenproblem per block). `eigen_progress(i)`: per Lanczos product of the Gram route.
    `tol`: the eigenvalues' relative error bound (None: the kernel's precision,
    `eigen_tolerance`). With several torch threads and batches, and every block one-token
    Linear, the Gram kernel is formed while the data is captured (`_panel_stream`): the
    capture on one thread, the kernel's panels on another, the thread count restored after.
    """
    from gmcurv.capture import Capturer, CaptureSteps, GradientRows, capture_stream
    from gmcurv.distributed import current, gather_decomposed

    comm = current()
    gather_rows = comm.all_gather_rows

    # capture_stream's memory preflight sizes activations, columns and factors from one
    # example's forward and, when eigenvalues are wanted, all N examples' factors + kernel
    one = phase and progress and data.n <= batch_size  # one batch: progress inside it
    steps = CaptureSteps(phase, progress, "Fisher: ") if one else None
    cap = Capturer(objective, fisher, mc_samples, seed, steps=steps)
    acc = FisherAccumulator(diagonal=False)
    col_norms: dict[str, list[Tensor]] = {}
    kept: list[DecomposedGradients] = []
    rows: GradientRows | None = None  # the factors of all N examples, filled batch by batch
    # one batch holds the whole sample and each layer's own eigenvalues are wanted: each
    # block's Gram kernel is formed once, right after the capture, and gives its trace (the
    # diagonal), its eigenvalues and its share of K (otherwise K is summed by panels)
    one_batch = k > 0 and per_layer and per_layer_eigen and not comm.active
    one_batch = one_batch and data.n <= batch_size
    # eigenvalues wanted (one process): the blocks' squared norms wait for the summed kernel,
    # whose blocks formed whole give them as their diagonals (`_sq_from_kernel`)
    defer = k > 0 and not comm.active and not one_batch
    grams: dict[str, Tensor] = {}
    stream = capture_stream(
        objective,
        data,
        batch_size,
        progress=progress,
        capturer=cap,
        budget_bytes=budget_bytes,
        keep=k > 0,
    )
    # several batches, every block panelled, the block route ahead: K's panels are formed
    # on a second core while the next batches are captured on the first (`_panel_stream`)
    panels: PanelStream | None = None
    streamed: LowerGram | None = None
    V0 = KV0 = None  # the block route's first block and its product (`PanelStream.finish`)
    full: DecomposedGradients | None = None  # all N examples' factors (eigenvalues wanted)
    threads = torch.get_num_threads()
    try:
        for dg in stream:
            sq = None
            one_batch = one_batch and dg.n * dg.columns <= DENSE_GRAM_LIMIT
            if one_batch:
                grams = _block_grams(dg, phase, eigen_progress)
                sq = {name: K.diagonal().reshape(dg.n, dg.columns) for name, K in grams.items()}
            if not defer:
                _add_batch(acc, dg, sq, col_norms if fisher == "mc" else None)
            if k > 0 and not kept and rows is None and defer:  # the first batch
                rows = GradientRows.start(dg, data.n)
                if rows is not None and threads > 1:
                    panels = _panel_stream(dg, data.n, k, rows)
                    if panels is not None:
                        torch.set_num_threads(1)  # the capture on one core
            if rows is not None:
                rows.add(dg)  # this batch's factors copied: its memory is reused
                if panels is not None:
                    panels.add(_hadamard_pairs(dg))
            elif k > 0:
                kept.append(dg)
            del sq
        if panels is not None and panels.ready == panels.size:  # else: formed after all
            if phase:
                phase("Fisher: Gram kernel (rows, formed while capturing)", None)
            assert rows is not None
            full = rows.result()
            V0 = first_block(full, k, seed)  # its product taken while finishing K
            streamed, KV0 = panels.finish(V0)
    finally:
        if panels is not None:
            panels.close()
            torch.set_num_threads(threads)
    diagonals: dict[int, Tensor] | None = {} if defer else None
    if k > 0 and full is None:
        full = (
            rows.result() if rows is not None else gather_decomposed(DecomposedGradients.cat(kept))
        )
    del kept, rows
    total = first = None
    if streamed is not None:  # every block panelled: no diagonals of whole blocks
        total, first = streamed, (V0, KV0)
    elif k > 0 and not one_batch:
        assert full is not None
        n_rows = full.n * full.columns
        # the block route's first product is taken while the kernel is formed
        V0 = first_block(full, k, seed) if block_route(n_rows, k) else None
        label = "Fisher: Gram kernel (rows)"
        total, KV0 = formed_kernel_product(full, label, phase, eigen_progress, V0, True, diagonals)
        first = None if V0 is None or KV0 is None else (V0, KV0)
    if defer:
        assert full is not None and diagonals is not None
        sq = _sq_from_kernel(full, diagonals)
        _add_batch(acc, full, sq, col_norms if fisher == "mc" else None)
    acc = acc.gathered()
    col_norms = {k: [gather_rows(torch.cat(v))] for k, v in col_norms.items()}
    columns = full.columns if full is not None else mc_samples if fisher == "mc" else 1
    trace = _trace_estimate(acc, fisher, None, columns, col_norms)
    eigenvalues: list[Estimate] = []
    rank = rule = None
    layer_eigs: dict[str, list[Estimate]] = {}
    if k > 0:
        assert full is not None
        n_rows = acc.n * columns
        if one_batch:
            total = sum(grams.values())
        if phase:
            phase("Fisher: Gram eigenvalues (kernel products)", eigen_products(n_rows, k))
        res = fisher_eigen(
            full, k, seed=seed, progress=eigen_progress, kernel=total, tol=tol, first=first
        )
        rank, rule = res.rank, res.tolerance
        eigenvalues = _eigen_estimates(res, full.n, fisher)
        if per_layer and per_layer_eigen:
            for b in full.blocks:
                layer_eigs[b.name] = _eigen_estimates(
                    fisher_eigen(
                        full,
                        k,
                        blocks=[b.name],
                        seed=seed,
                        progress=eigen_progress,
                        kernel=grams.get(b.name),
                        tol=tol,
                    ),
                    full.n,
                    fisher,
                )
    layers = (
        {
            name: LayerCurvature(
                _trace_estimate(acc, fisher, name, columns, col_norms),
                sum(math.prod(s) for s in _shapes_of(objective, params)),
                acc.block_kinds[name],
                layer_eigs.get(name, []),
            )
            for name, params in acc.block_params.items()
        }
        if per_layer
        else {}
    )
    losses = torch.cat(acc.losses)
    loss_se = float(losses.std()) / math.sqrt(len(losses)) if len(losses) > 1 else None
    return FisherSummary(
        fisher=fisher,
        trace=trace,
        eigenvalues=eigenvalues,
        per_layer=layers,
        loss=Estimate.exact_value(float(losses.mean()), len(losses), "mean", data_stderr=loss_se),
        rank=rank,
        n_params=objective.space.size,
        self_check=cap.check_report.as_dict() if cap.check_report else None,
        eigen_tolerance=rule,
    )


def _hadamard_pairs(dg: DecomposedGradients) -> list:
    """Every block's `gmcurv.gram_sum.HadamardFactors` (None where a block has none)."""
    from gmcurv.gram_sum import hadamard_factors

    return [hadamard_factors(b.source) for b in dg.blocks]


def _panel_stream(
    dg: DecomposedGradients, n_examples: int, k: int, rows: GradientRows
) -> PanelStream | None:
    """A `gmcurv.gram_sum.PanelStream` for ``K`` of `n_examples` examples, given the first
    batch `dg`, when it pays: at least `STREAM_BATCHES` batches, every block panelled
    (one-token Linear), the block route ahead on the formed ``K`` (`block_route`), and the
    stream's copy of the factors small (`STREAM_COPY`); else None. The stream reads the
    factors in place from `rows` when they are its rows already (one column, the kernel's
    dtype); else it keeps its own copy."""
    from gmcurv.gram_sum import MIN_PANELS, PANEL_ROWS, PanelStream

    size = n_examples * dg.columns
    if n_examples < STREAM_BATCHES * dg.n or not block_route(size, k):
        return None
    if -(-size // PANEL_ROWS) < MIN_PANELS:
        return None
    from gmcurv.gram_sum import hadamard_factors

    pairs = _hadamard_pairs(dg)
    if not pairs or any(f is None for f in pairs):
        return None
    low = all(b.source.dtype == torch.float32 for b in dg.blocks)
    dtype = torch.float32 if low else torch.float64
    layers = [(f.delta.shape[1], None if f.x is None else f.x.shape[1], f.bias) for f in pairs]
    if dg.columns == 1 and all(b.source.dtype == dtype for b in dg.blocks):  # read in place
        full = [hadamard_factors(s) for s in rows.sources]
        return PanelStream(size, layers, dtype, dg.losses.device, rows=full)  # type: ignore[arg-type]
    # the stream keeps its own copy of the factors: at most the kernel's size, or STREAM_COPY
    width = sum(o + (i or 0) for o, i, _ in layers)
    if size * width > max(size * size, STREAM_COPY // dtype.itemsize):
        return None
    return PanelStream(size, layers, dtype, dg.losses.device)


STREAM_COPY = 32 << 20  # bytes of factor copies `_panel_stream` may hold beyond the kernel's
# batches from which forming K while capturing pays: with B batches the panels of the last
# one (about 2/B of K) are left for after the capture, and the capture runs on one thread
STREAM_BATCHES = 4


def _add_batch(acc: FisherAccumulator, dg: DecomposedGradients, sq, col_norms) -> None:
    """`FisherAccumulator.add`, and each block's per-column squared norms into `col_norms`
    (Monte Carlo Fisher; None otherwise)."""
    acc.add(dg, sq)
    if col_norms is not None:
        for b in dg.blocks:
            part = b.source.sq_norms() if sq is None or b.name not in sq else sq[b.name]
            col_norms.setdefault(b.name, []).append(part.double())


def _sq_from_kernel(dg: DecomposedGradients, diagonals: dict[int, Tensor]) -> dict[str, Tensor]:
    """``{block: [N, C]}`` squared norms from the diagonals of the blocks' kernels formed
    whole by `formed_kernel_product` (indexed by block; the others compute their own)."""
    return {dg.blocks[i].name: d.reshape(dg.n, dg.columns) for i, d in diagonals.items()}


def formed_kernel(dg: DecomposedGradients, label: str, phase, progress) -> Tensor | None:
    """``K`` by `gmcurv.gram_sum.summed_gram` when `fisher_eigen` would form it (at most
    ``DENSE_GRAM_LIMIT`` rows), announced as phase `label` counted in rows; else None."""
    return formed_kernel_product(dg, label, phase, progress)[0]


def formed_kernel_product(
    dg: DecomposedGradients,
    label: str,
    phase,
    progress,
    first: Tensor | None = None,
    lower: bool = False,
    diagonals: dict[int, Tensor] | None = None,
):
    """`formed_kernel` and ``K first`` taken while forming it (None without `first`;
    `gmcurv.gram_sum.summed_gram_product`, whose `lower` gives ``K`` as its lower
    panels, a `gmcurv.gram_sum.LowerGram`, and `diagonals` the kernel diagonals of the
    blocks it forms whole)."""
    from gmcurv.gram_sum import summed_gram_product

    rows = dg.n * dg.columns
    if rows > DENSE_GRAM_LIMIT:
        return None, None
    if phase:
        phase(label, rows)
    sources = [b.source for b in dg.blocks]
    return summed_gram_product(sources, rows, dg.losses.device, progress, first, lower, diagonals)


def _block_grams(dg: DecomposedGradients, phase, progress) -> dict[str, Tensor]:
    """Each block's Gram kernel (float64), announced as a phase counted in blocks."""
    if phase:
        phase("Fisher: Gram kernels (blocks)", len(dg.blocks))
    grams = {}
    for b in dg.blocks:
        grams[b.name] = b.source.gram()
        if progress:
            progress(1)
    return grams


def _eigen_estimates(res: FisherEigen, n: int, fisher: str) -> list[Estimate]:
    method = res.method + ("(mc)" if fisher == "mc" else "")
    return [
        Estimate(
            float(v), None, n, method, bool(c), n_matvecs=res.n_matvecs or None, residual=float(r)
        )
        for v, r, c in zip(res.values, res.residuals, res.converged, strict=True)
    ]


def _shapes_of(objective, params: tuple[str, ...]):
    return [tuple(objective.params[p].shape) for p in params]
