"""The summed Gram kernel by lower-triangular panels and the top-k route on it (float32
products, one exact float64 Rayleigh–Ritz step), against dense float64 oracles: the
explicit per-example-gradient Gram ``J J^T`` and ``eigvalsh`` of ``F = J^T J / N``."""

from __future__ import annotations

import time

import pytest
import torch
from models import TinyAttention, TinyConv, mlp, seeded
from oracles import per_example_grads
from test_capture import N, _problem, _rows
from test_lanczos import SPECTRA, _with_spectrum

import gmcurv.gram_sum as gs
from gmcurv.batch import Batch
from gmcurv.block_krylov import block_lanczos
from gmcurv.capture import capture
from gmcurv.fisher import fisher_eigen, gram_kernel, start_directions
from gmcurv.objective import Objective


def _captured(name: str, dtype: torch.dtype = torch.float64):
    """`_problem(name)` captured with the model (and float inputs) in `dtype`."""
    obj, batch = _problem(name)
    x = batch.inputs
    if dtype == torch.float32:
        obj.model.float()
        x = x.float() if x.is_floating_point() else x
    return capture(obj, Batch(x, batch.targets, 0))


@pytest.fixture
def small_panels(monkeypatch):
    """Panels of 3 rows from 2 panels on: the panel route on tiny problems."""
    monkeypatch.setattr(gs, "PANEL_ROWS", 3)
    monkeypatch.setattr(gs, "MIN_PANELS", 2)


@pytest.mark.parametrize("name", ["mlp", "mlp_nobias", "conv", "attention", "tokens"])
@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_panel_sum_equals_explicit_gram(name, fisher, small_panels):
    """Float64: ``K`` equals ``rows rows^T`` of the explicit gradients (one-token Linear
    blocks by panels, the others whole), exactly symmetric."""
    obj, batch = _problem(name)
    dg = capture(obj, batch, fisher=fisher)
    rows = _rows(dg, obj).reshape(dg.n * dg.columns, -1)
    K = gram_kernel(dg)
    torch.testing.assert_close(K, rows @ rows.T, rtol=1e-10, atol=1e-13)
    assert torch.equal(K, K.T) or name != "mlp"  # the mirrored triangle is a copy
    if name == "mlp":
        assert all(gs.hadamard_factors(b.source) is not None for b in dg.blocks)


@pytest.mark.parametrize("name", ["mlp", "attention"])
def test_float32_panel_sum_within_the_rounding_bound(name, small_panels):
    obj, batch = _problem(name)
    obj.model.float()
    x = batch.inputs.float() if batch.inputs.is_floating_point() else batch.inputs
    dg = capture(obj, Batch(x, batch.targets, 0))
    K = gs.summed_gram([b.source for b in dg.blocks], N)
    assert K.dtype == torch.float32
    rows = _rows(dg, obj).reshape(N, -1).double()
    ref = rows @ rows.T
    norms = torch.diagonal(ref).sqrt()
    bound = 4 * rows.shape[1] * torch.finfo(torch.float32).eps * torch.outer(norms, norms)
    assert bool(((K.double() - ref).abs() <= bound).all())


def test_panel_progress_counts_rows(small_panels):
    obj, batch = _problem("mlp")
    dg = capture(obj, batch)
    ticks: list[float] = []
    gs.summed_gram([b.source for b in dg.blocks], N, progress=ticks.append)
    assert ticks == [3, 3, 1]  # panels of 3, 3 and 1 rows, every block panelled
    obj, batch = _problem("attention")  # some blocks whole: their shares
    dg = capture(obj, batch)
    ticks.clear()
    gs.summed_gram([b.source for b in dg.blocks], N, progress=ticks.append)
    assert sum(ticks) == pytest.approx(N) and len(ticks) > 1


def _wide(name: str, n: int, dtype: torch.dtype):
    """A problem with enough examples for the block Lanczos route (``n`` rows)."""
    g = torch.Generator().manual_seed(3)
    if name == "mlp":
        model = seeded(mlp, sizes=(6, 12, 12, 4))
        x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    elif name == "conv":
        model, x = seeded(TinyConv), torch.randn(n, 2, 4, 4, generator=g, dtype=torch.float64)
    else:
        model, x = seeded(TinyAttention), torch.randint(0, 7, (n, 5), generator=g)
    obj = Objective.build(model.to(dtype), "cross_entropy")
    if x.is_floating_point():
        x = x.to(dtype)
    with torch.no_grad():
        classes = obj.outputs(x[:1]).shape[-1]
    return obj, Batch(x, torch.randint(0, classes, (n,), generator=g), 0)


@pytest.mark.parametrize("name", ["mlp", "conv", "attention"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_top_k_matches_dense_float64_oracle(name, dtype, monkeypatch):
    """Block route (float32 kernels: float32 products, exact final step) against the
    float64 oracle: ``eigvalsh(J^T J / N)`` from vmap(grad) of the same weights in float64;
    the float32 route is exact to 1e-10 for the kernel it formed and within float32
    rounding of the float64 truth."""
    monkeypatch.setattr(gs, "PANEL_ROWS", 32)
    n = 160
    obj, batch = _wide(name, n, dtype)
    dg = capture(obj, batch)
    res = fisher_eigen(dg, 4, eigh_limit=16)
    assert res.method == "gram-block-lanczos" and bool(res.converged.all())
    assert 0 < res.n_matvecs < n
    obj64, _ = _wide(name, n, torch.float64)
    obj64.model.load_state_dict({k: v.double() for k, v in obj.model.state_dict().items()})
    batch64 = Batch(
        batch.inputs.double() if batch.inputs.is_floating_point() else batch.inputs,
        batch.targets,
        0,
    )
    J = per_example_grads(obj64, batch64)
    ref = torch.linalg.eigvalsh(J @ J.T).flip(0)[:4] / n
    if dtype == torch.float64:
        torch.testing.assert_close(res.values, ref, rtol=1e-10, atol=0)
    else:
        # against the kernel it formed: within the stopping rule's bound, max(rtol λ_max,
        # u tr F) (`eigen_tolerance`: storing K in float32 alone may move eigenvalues by
        # u tr K, so the default iterates no further); the float64 truth within 1e-5
        formed = gs.summed_gram([b.source for b in dg.blocks], n).double()
        own = torch.linalg.eigvalsh(formed).flip(0)[:4] / n
        rule = res.tolerance
        assert rule is not None and rule["atol"] > 0
        bound = max(rule["rtol"] * float(own[0]), rule["atol"])
        assert float((res.values - own).abs().max()) <= bound
        assert rule["atol"] == pytest.approx(2.0**-24 * float(formed.diagonal().sum()) / n)
        torch.testing.assert_close(res.values, ref, rtol=1e-5, atol=0)
    # the reported residuals are true residuals of K's eigenpairs (divided by N)
    assert bool((res.residuals >= 0).all())


def test_start_directions_are_the_output_cotangents():
    obj, batch = _wide("mlp", 40, torch.float64)
    dg = capture(obj, batch)
    start = start_directions(dg)
    assert start is not None and start.shape == (40, 4)
    with_start = fisher_eigen(dg, 3, eigh_limit=8)
    dense = fisher_eigen(dg, 3)
    torch.testing.assert_close(with_start.values, dense.values, rtol=1e-10, atol=0)


def test_cheap_products_exact_final_step():
    """Iterations on float32 products, the answer from one exact product: values within
    1e-10 of the exact spectrum, the reported residuals are the true ones."""
    A = _with_spectrum(SPECTRA["clustered"])
    A32 = A.float()
    exact = A32.double()
    ref = torch.linalg.eigvalsh(exact).flip(0)[:4]
    res = block_lanczos(
        lambda X: (A32 @ X.float()).double(),
        100,
        4,
        tol=1e-10,
        vectors=True,
        exact=lambda Y: exact @ Y,
        product_error=gs.product_error(A32.abs()),
    )
    assert bool(res.converged.all())
    torch.testing.assert_close(res.values, ref, rtol=1e-10, atol=0)
    for v, theta, r in zip(res.vectors, res.values, res.residuals, strict=True):
        assert float(r) == pytest.approx(float((exact @ v - theta * v).norm()), abs=1e-12)


def test_cheap_products_unconverged_is_flagged():
    A = _with_spectrum(SPECTRA["clustered"])
    A32 = A.float()
    res = block_lanczos(
        lambda X: (A32 @ X.float()).double(),
        100,
        4,
        block=4,
        tol=1e-12,
        max_basis=8,
        exact=lambda Y: A32.double() @ Y,
    )
    assert not bool(res.converged.all())


def test_float64_products_convert_panels():
    g = torch.Generator().manual_seed(0)
    K = torch.randn(70, 70, generator=g).float()
    Y = torch.randn(70, 3, generator=g, dtype=torch.float64)
    got, ref = gs.float64_products(K)(Y), K.double() @ Y
    # float64 sums of exact products, in another order: within n u64 |K| |Y|
    bound = 70 * 2.0**-53 * (K.double().abs() @ Y.abs())
    assert got.dtype == torch.float64 and bool(((got - ref).abs() <= bound).all())


@pytest.mark.parametrize("columns", [1, 3])
def test_panel_sum_weight_and_bias_parts(columns, small_panels):
    """Weight and bias, weight only, bias only (``X Xᵀ + 1``, ``X Xᵀ``, ``1``), one or
    several columns per example: the panels equal the explicit gradients' Gram."""
    from gmcurv.factors import LinearFactors

    g = torch.Generator().manual_seed(5)
    n, o, i = 7, 3, 4
    sources = []
    for w, b in [(True, True), (True, False), (False, True)]:
        names = tuple(x for x, keep in (("w", w), ("b", b)) if keep)
        shapes = tuple(s for s, keep in (((o, i), w), ((o,), b)) if keep)
        delta = torch.randn(n, columns, 1, o, generator=g, dtype=torch.float64)
        x = torch.randn(n, 1, i, generator=g, dtype=torch.float64)
        sources.append(LinearFactors(names, shapes, delta, x, w, b))
    for src in sources:
        rows = src.flat(slice(0, n)).reshape(n * columns, -1)
        f = gs.hadamard_factors(src)
        assert f is not None and (f.x is None) == (not src.has_weight) and f.bias == src.has_bias
        K = gs.summed_gram([src], n * columns)
        torch.testing.assert_close(K, rows @ rows.T, rtol=1e-12, atol=1e-12)
    rows = torch.cat([s.flat(slice(0, n)).reshape(n * columns, -1) for s in sources], 1)
    K = gs.summed_gram(sources, n * columns)
    torch.testing.assert_close(K, rows @ rows.T, rtol=1e-12, atol=1e-12)
    assert torch.equal(K, K.T)


def test_vectorised_gap_bounds_equal_the_reference():
    from gmcurv.block_krylov import gap_bounds
    from gmcurv.lanczos import error_bounds

    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        theta = torch.randn(12, generator=g, dtype=torch.float64).sort(descending=True).values
        res = torch.rand(12, generator=g, dtype=torch.float64) * 0.3
        for criterion in ("gap", "residual"):
            ref = error_bounds(theta, res, torch.arange(5), criterion)
            torch.testing.assert_close(gap_bounds(theta, res, 5, criterion), ref)


def test_block_lanczos_threads_and_first_block():
    """Products run on the caller's threads, the small dense algebra on one, and the
    count is restored; a first block with its product given gives the same answer."""
    from gmcurv.block_krylov import first_block

    A = _with_spectrum(SPECTRA["clustered"])
    seen: dict[str, set[int]] = {"products": set(), "algebra": set()}

    def matmat(X):
        seen["products"].add(torch.get_num_threads())
        return A @ X

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        res = block_lanczos(
            matmat,
            100,
            4,
            tol=1e-10,
            progress=lambda _: seen["algebra"].add(torch.get_num_threads()),
        )
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)
    assert seen == {"products": {2}, "algebra": {1}}
    ref = torch.linalg.eigvalsh(A).flip(0)[:4]
    torch.testing.assert_close(res.values, ref, rtol=1e-10, atol=0)
    V0 = first_block(None, 100, 8, torch.Generator().manual_seed(0))
    given = block_lanczos(lambda X: A @ X, 100, 4, tol=1e-10, first=(V0, A @ V0))
    torch.testing.assert_close(given.values, ref, rtol=1e-10, atol=0)
    assert given.n_matvecs == res.n_matvecs and given.iterations == res.iterations


@pytest.mark.parametrize("name", ["mlp", "attention"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_first_product_taken_while_forming_the_kernel(name, dtype, small_panels):
    """``K V`` from the panels (every block one-token Linear: panel by panel) or after them
    (other blocks present: one product at the end) equals the product with the returned
    kernel: float64 to 1e-12, float32 within its product rounding ``n u |K| |V|``."""
    dg = _captured(name, dtype)
    sources = [b.source for b in dg.blocks]
    V = torch.linalg.qr(torch.randn(N, 4, generator=torch.Generator().manual_seed(3)).double()).Q
    K, KV = gs.summed_gram_product(sources, N, first=V)
    assert KV is not None and KV.dtype == K.dtype
    torch.testing.assert_close(K, gs.summed_gram(sources, N), rtol=0, atol=0)
    ref = K.double() @ V
    if dtype == torch.float64:
        torch.testing.assert_close(KV, ref, rtol=1e-12, atol=1e-12)
    else:
        bound = N * 2.0**-24 * (K.double().abs() @ V.abs()) * 4
        assert bool(((KV.double() - ref).abs() <= bound).all())
    assert gs.summed_gram_product(sources, N)[1] is None


@pytest.mark.parametrize("name", ["mlp", "attention"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lower_panels_products_equal_the_full_kernel(name, dtype, small_panels):
    """`LowerGram` (the panels unmirrored; with other blocks present, the full matrix):
    products read the lower panels only and equal those with the full ``K`` (float64:
    1e-12; float32: within ``n u |K| |Y|``), `exact` is ``K Y`` in float64 to 1e-13,
    `full` is the same ``K`` as `summed_gram`, and `fisher_eigen` on either form agrees."""
    dg = _captured(name, dtype)
    sources = [b.source for b in dg.blocks]
    full = gs.summed_gram(sources, N)
    low, none = gs.summed_gram_product(sources, N, lower=True)
    assert none is None and isinstance(low, gs.LowerGram)
    assert (low.rows == 3) == (name == "mlp")  # panels only when every block is panelled
    Y = torch.randn(N, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = full.double() @ Y
    torch.testing.assert_close(low.exact(Y), ref, rtol=1e-13, atol=1e-13)
    got = low.matmat(Y).double()
    if dtype == torch.float64:
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    else:
        bound = N * 2.0**-24 * (full.double().abs() @ Y.abs()) * 4
        assert bool(((got - ref).abs() <= bound).all())
    torch.testing.assert_close(low.diagonal(), full.diagonal(), rtol=0, atol=0)
    torch.testing.assert_close(low.full(), full, rtol=0, atol=0)
    lowered, _ = gs.summed_gram_product(sources, N, lower=True)
    a = fisher_eigen(dg, 3, eigh_limit=8, kernel=lowered)
    b = fisher_eigen(dg, 3, eigh_limit=8, kernel=full)
    bound = max(a.tolerance["rtol"] * float(b.values[0]), a.tolerance["atol"])
    assert float((a.values - b.values).abs().max()) <= 2 * bound


@pytest.mark.parametrize("rate", [0, 10**9])
@pytest.mark.parametrize("name", ["tokens", "attention"])
def test_several_token_blocks_by_slab_panels_or_token_pairs(name, rate, monkeypatch):
    """Several-token Linear blocks: on the materialised route (rate 0: always) their
    kernel comes from lower row panels of each slab's gradients (`_slab_panels`), on the
    token-pair route (rate huge) from `LinearFactors.gram`; either way the summed kernel
    equals the explicit gradients' Gram (float64, 1e-10); the slab panels' kernels are
    exactly symmetric (mirrored)."""
    import gmcurv.factors.linear as lin

    monkeypatch.setattr(lin, "MATERIALISED_RATE", rate)
    monkeypatch.setattr(gs, "MIN_SLAB_ROWS", 3)
    calls = []
    real = gs._slab_panels
    monkeypatch.setattr(gs, "_slab_panels", lambda src: calls.append(real(src)) or calls[-1])
    obj, batch = _problem(name)
    dg = capture(obj, batch)
    rows = _rows(dg, obj).reshape(dg.n * dg.columns, -1)
    K = gs.summed_gram([b.source for b in dg.blocks], N)
    torch.testing.assert_close(K, rows @ rows.T, rtol=1e-10, atol=1e-13)
    assert all(torch.equal(part, part.T) for part in calls)
    several = [b for b in dg.blocks if getattr(b.source, "tokens", 1) > 1]
    assert several and len(calls) == (len(several) if rate == 0 else 0)


def test_cost_groups_and_in_threads():
    """`cost_groups` splits every item once into groups of about equal cost, each in
    increasing order; `in_threads` runs each group once (on one intra-op thread while
    several run), returns the results in group order, re-raises a worker's error and
    restores the thread count."""
    from gmcurv.block_krylov import cost_groups, in_threads

    costs = [float(c) for c in (1, 2, 3, 4, 5, 6, 7, 8)]
    groups = cost_groups(costs, 2)
    assert sorted(i for g in groups for i in g) == list(range(8))
    assert all(g == sorted(g) for g in groups)
    assert abs(sum(costs[i] for i in groups[0]) - sum(costs[i] for i in groups[1])) <= 1
    assert cost_groups(costs, 20) == [[i] for i in range(8)] or len(cost_groups(costs, 20)) == 8
    old = torch.get_num_threads()
    seen: list[tuple[int, list[int], int]] = []
    out = in_threads(lambda t, g: seen.append((t, g, torch.get_num_threads())) or t, costs, 2)
    assert out == [0, 1] and sorted(i for _, g, _ in seen for i in g) == list(range(8))
    assert all(n == 1 for *_, n in seen) and torch.get_num_threads() == old

    def fails(t: int, g: list[int]) -> None:
        if t == 1:
            raise ValueError("worker")

    with pytest.raises(ValueError, match="worker"):
        in_threads(fails, costs, 2)
    assert torch.get_num_threads() == old


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_threaded_panels_and_tiles_equal_one_thread(dtype, small_panels, monkeypatch):
    """Panels shared among two threads (`in_threads`), float64 tiles of 2 columns: the
    same kernel bit for bit (each panel's ops do not depend on the thread), the first
    product and `matmat` within their rounding of the one-thread results, `exact` to
    ``n u64 |K| |Y|`` of the float64 product, on lower panels and on the full matrix."""
    dg = _captured("mlp", dtype)
    sources = [b.source for b in dg.blocks]
    V = torch.linalg.qr(torch.randn(N, 4, generator=torch.Generator().manual_seed(3)).double()).Q
    Y = torch.randn(N, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    one_K, one_KV = gs.summed_gram_product(sources, N, first=V, lower=True)
    one_mm = one_K.matmat(Y)
    monkeypatch.setattr(gs, "MIN_THREADED", 0)
    monkeypatch.setattr(gs, "MIN_THREADED_KERNEL", 0)
    monkeypatch.setattr(gs, "TILE_COLS", 2)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        K, KV = gs.summed_gram_product(sources, N, first=V, lower=True)
        mm, ex = K.matmat(Y), K.exact(Y)
        full = gs.LowerGram(gs._mirror_lower(K.data.clone()), N)
        full_mm, full_ex = full.matmat(Y), full.exact(Y)
    finally:
        torch.set_num_threads(old)
    assert isinstance(K, gs.LowerGram) and torch.equal(K.data.tril(), one_K.data.tril())
    ref_K = K.full().double()
    u = torch.finfo(dtype).eps
    for got, want, X in ((KV, one_KV, V), (mm, one_mm, Y), (full_mm, one_mm, Y)):
        assert got is not None and want is not None and got.dtype == dtype
        bound = 4 * N * u * (ref_K.abs() @ X.abs())
        assert bool(((got.double() - want.double()).abs() <= 2 * bound).all())
    ref = ref_K @ Y
    for got in (ex, full_ex):
        assert got.dtype == torch.float64
        assert bool(((got - ref).abs() <= 4 * N * 2.0**-53 * (ref_K.abs() @ Y.abs())).all())


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_panel_stream_equals_the_panel_sum(dtype, in_place, small_panels, monkeypatch):
    """`PanelStream` fed batches of 4, 2, 1... rows (panels of 3 rows, tiles of 2 columns,
    a background thread), keeping its own copy of the rows or reading them in place from
    the caller's tensors (`rows`, filled batch by batch as `GradientRows` does): the lower
    panels of the same ``K`` as `summed_gram` (float64 to 1e-12, float32 within
    ``4 D u |g_i| |g_j|``), diagonal tiles exactly symmetric; too many or too few rows are
    refused, and `close` stops the thread."""
    monkeypatch.setattr(gs, "STREAM_COLS", 2)
    dg = _captured("mlp", dtype)
    sources = [b.source for b in dg.blocks]
    pairs = [gs.hadamard_factors(s) for s in sources]
    assert all(f is not None for f in pairs)
    layers = [(f.delta.shape[1], None if f.x is None else f.x.shape[1], f.bias) for f in pairs]
    # in place: the stream reads tensors that hold garbage until the caller copies each batch
    full = [
        gs.HadamardFactors(
            torch.full_like(f.delta, float("nan")), torch.full_like(f.x, 7.0), f.bias
        )
        for f in pairs
    ]
    stream = gs.PanelStream(N, layers, dtype, rows=full if in_place else None)
    r0 = 0
    for n in (4, 2, 1, N):
        n = min(n, N - r0)
        if in_place:
            for f, g in zip(full, pairs, strict=True):
                f.delta[r0 : r0 + n].copy_(g.delta[r0 : r0 + n])
                f.x[r0 : r0 + n].copy_(g.x[r0 : r0 + n])
        stream.add(
            [gs.HadamardFactors(f.delta[r0 : r0 + n], f.x[r0 : r0 + n], f.bias) for f in pairs]
        )
        r0 += n
        if r0 == N:
            break
    with pytest.raises(ValueError, match="more rows"):
        stream.add(pairs)
    if in_place:  # let the background form every tile: the product is then all tasks
        for _ in range(2000):
            with stream._cv:
                if not stream._tiles:
                    break
            time.sleep(0.001)
    V = torch.randn(N, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    K, KV = stream.finish(V if in_place else None)
    assert isinstance(K, gs.LowerGram) and K.rows == 3
    ref = gs.summed_gram(sources, N).double()
    got = K.full().double()
    if in_place:  # K V in K's dtype: within the rounding of a dtype product of the same K
        assert KV is not None and KV.dtype == dtype and KV.shape == (N, 3)
        u = torch.finfo(dtype).eps
        bound = 2 * N * u * (got.abs() @ V.abs())
        assert bool(((KV.double() - got @ V).abs() <= bound).all())
    else:
        assert KV is None
    if dtype == torch.float64:
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    else:
        norms = ref.diagonal().sqrt()
        inner = sum(f.delta.shape[1] + f.x.shape[1] for f in pairs)
        bound = 4 * inner * 2.0**-24 * torch.outer(norms, norms)
        assert bool(((got - ref).abs() <= bound).all())
    assert torch.equal(got, got.T)
    idle = gs.PanelStream(N, layers, dtype)
    with pytest.raises(ValueError, match="rows added"):
        idle.finish()
    idle.close()
    assert not idle._worker.is_alive()


@pytest.mark.parametrize("name", ["attention", "tokens"])
def test_whole_blocks_shared_among_threads(name, monkeypatch):
    """Blocks formed whole (embeddings, several-token Linear, dense) shared among two
    threads (`_whole_sum`): the kernel equals the one-thread sum (float64, 1e-12) and the
    explicit gradients' Gram; the diagonals and the progress count are the same."""
    obj, batch = _problem(name)
    dg = capture(obj, batch)
    sources = [b.source for b in dg.blocks]
    d1: dict = {}
    t1: list[float] = []
    one, _ = gs.summed_gram_product(sources, N, progress=t1.append, diagonals=d1)
    monkeypatch.setattr(gs, "MIN_THREADED", 0)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        d2: dict = {}
        t2: list[float] = []
        two, _ = gs.summed_gram_product(sources, N, progress=t2.append, diagonals=d2)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(two, one, rtol=1e-12, atol=1e-12)
    rows = _rows(dg, obj).reshape(dg.n * dg.columns, -1)
    torch.testing.assert_close(two, rows @ rows.T, rtol=1e-10, atol=1e-13)
    assert d1.keys() == d2.keys() and all(torch.equal(d1[i], d2[i]) for i in d1)
    assert sum(t2) == pytest.approx(sum(t1)) == pytest.approx(N)
    assert gs._gram_cost(sources[0]) > 0
