"""Fisher closed forms on factors equal those of the dense J^T J / N (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from models import mlp, seeded
from oracles import dense_ggn, per_example_grads
from test_capture import N, _problem, _rows

from gmcurv.batch import Batch
from gmcurv.capture import DecomposedGradients, capture
from gmcurv.fisher import (
    FisherAccumulator,
    fisher_diagonal,
    fisher_eigen,
    fisher_matvec,
    fisher_quadratic_form,
    fisher_trace,
    gram_kernel,
)
from gmcurv.objective import Objective

CASES = ["mlp", "tokens", "custom", "attention", "conv", "tied"]


def _dense_fisher(obj, batch, fisher="empirical"):
    if fisher == "empirical":
        J = per_example_grads(obj, batch)
        return J.T @ J / len(batch), J
    dg = capture(obj, batch, fisher=fisher)
    rows = _rows(dg, obj).reshape(-1, obj.space.size)
    return rows.T @ rows / len(batch), rows


@pytest.mark.parametrize("name", CASES)
def test_trace_diag_eigen_match_dense(name):
    obj, batch = _problem(name)
    F, J = _dense_fisher(obj, batch)
    dg = capture(obj, batch)
    assert math.isclose(fisher_trace(dg), float(torch.trace(F)), rel_tol=1e-10)
    diag = obj.space.flatten(fisher_diagonal(dg))
    torch.testing.assert_close(diag, torch.diagonal(F), rtol=1e-10, atol=1e-14)
    ref = torch.linalg.eigvalsh(F).flip(0)[:4]
    res = fisher_eigen(dg, 4)
    torch.testing.assert_close(res.values, ref, rtol=1e-9, atol=1e-13)
    assert res.method == "gram" and res.rank == torch.linalg.matrix_rank(J).item()


@pytest.mark.parametrize("name", ["mlp", "tokens", "conv", "attention"])
def test_per_block_gram_and_trace(name):
    obj, batch = _problem(name)
    _, J = _dense_fisher(obj, batch)
    dg = capture(obj, batch)
    offsets = obj.space.offsets()
    for block in dg.blocks:
        cols = torch.cat([torch.arange(offsets[p].start, offsets[p].stop) for p in block.params])
        Jb = J[:, cols]
        torch.testing.assert_close(gram_kernel(dg, [block.name]), Jb @ Jb.T, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(
            block.source.sq_norms()[:, 0], (Jb**2).sum(1), rtol=1e-10, atol=1e-14
        )


@pytest.mark.parametrize("name", ["mlp", "attention", "conv"])
def test_eigenvectors_and_products(name):
    obj, batch = _problem(name)
    F, _ = _dense_fisher(obj, batch)
    dg = capture(obj, batch)
    res = fisher_eigen(dg, 3, vectors=True)
    for lam, vec in zip(res.values, res.vectors, strict=True):
        v = obj.space.flatten(vec)
        assert math.isclose(float(v.norm()), 1.0, rel_tol=1e-9)
        torch.testing.assert_close(F @ v, lam * v, rtol=1e-8, atol=1e-12)
    g = torch.Generator().manual_seed(3)
    v = torch.randn(obj.space.size, generator=g, dtype=torch.float64)
    fv = obj.space.flatten(fisher_matvec(dg, obj.space.unflatten(v)))
    torch.testing.assert_close(fv, F @ v, rtol=1e-10, atol=1e-13)
    q = fisher_quadratic_form(dg, obj.space.unflatten(v))
    assert math.isclose(q, float(v @ F @ v), rel_tol=1e-10)


def test_lanczos_gram_route_matches_dense_route():
    obj, batch = _problem("conv")
    dg = capture(obj, batch, fisher="exact")  # N * C = 21 rows
    dense = fisher_eigen(dg, 4)
    iterative = fisher_eigen(dg, 4, dense_limit=5, tol=1e-12)
    assert iterative.method == "gram-lanczos" and bool(iterative.converged.all())
    torch.testing.assert_close(iterative.values, dense.values, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_exact_fisher_equals_ggn_for_one_prediction_per_example(name):
    obj, batch = _problem(name)
    F, _ = _dense_fisher(obj, batch, "exact")
    torch.testing.assert_close(F, dense_ggn(obj, batch), rtol=1e-9, atol=1e-12)


def test_mc_fisher_is_unbiased_for_the_exact_fisher():
    obj, batch = _problem("mlp")
    exact = fisher_trace(capture(obj, batch, fisher="exact"))
    draws = torch.tensor(
        [fisher_trace(capture(obj, batch, fisher="mc", seed=s)) for s in range(200)],
        dtype=torch.float64,
    )
    se = float(draws.std()) / math.sqrt(len(draws))
    assert abs(float(draws.mean()) - exact) < 4 * se
    assert se > 0


def test_streaming_accumulator_equals_all_at_once():
    obj, batch = _problem("attention")
    dg = capture(obj, batch)
    acc = FisherAccumulator()
    for idx in (torch.arange(0, 3), torch.arange(3, N)):
        acc.add(dg.select(idx))
    value, se = acc.trace()
    assert acc.n == N
    assert math.isclose(value, fisher_trace(dg), rel_tol=1e-12)
    s = acc.per_example()
    assert math.isclose(se, float(s.std()) / math.sqrt(N), rel_tol=1e-12)
    for k, v in fisher_diagonal(dg).items():
        torch.testing.assert_close(acc.diag()[k], v, rtol=1e-12, atol=1e-15)


def test_cat_of_batches_gives_same_eigenvalues():
    obj, batch = _problem("tokens")
    dg = capture(obj, batch)
    parts = [dg.select(torch.arange(0, 4)), dg.select(torch.arange(4, N))]
    joined = DecomposedGradients.cat(parts)
    torch.testing.assert_close(fisher_eigen(joined, 3).values, fisher_eigen(dg, 3).values)


@pytest.mark.parametrize("name", CASES)
def test_gradient_rows_equal_the_cat_of_batches(name):
    """`GradientRows` (the batches copied into whole-sample tensors as they arrive) equals
    `DecomposedGradients.cat` bit for bit for Linear-only captures (several tokens and
    columns too), holds no batch, and refuses too many or too few rows; other sources
    are left to `cat` (`start` gives None)."""
    from gmcurv.capture import GradientRows
    from gmcurv.factors import LinearFactors

    obj, batch = _problem(name)
    dg = capture(obj, batch, fisher="exact")
    parts = [dg.select(torch.arange(0, 3)), dg.select(torch.arange(3, N))]
    rows = GradientRows.start(parts[0], N)
    if not all(isinstance(b.source, LinearFactors) for b in dg.blocks):
        assert rows is None
        return
    assert rows is not None
    with pytest.raises(ValueError, match="examples added"):
        rows.result()
    for p in parts:
        rows.add(p)
    with pytest.raises(ValueError, match="more than"):
        rows.add(parts[0])
    got, want = rows.result(), DecomposedGradients.cat(parts)
    assert got.fisher == want.fisher and torch.equal(got.losses, want.losses)
    for a, b in zip(got.blocks, want.blocks, strict=True):
        assert (a.name, a.kind, a.params) == (b.name, b.kind, b.params)
        assert torch.equal(a.source.delta, b.source.delta) and torch.equal(a.source.x, b.source.x)
        assert a.source.delta.data_ptr() != parts[0].blocks[0].source.delta.data_ptr()


@pytest.mark.parametrize("name", ["attention", "conv", "tied", "tokens"])
def test_exact_fisher_closed_forms_with_many_columns(name):
    obj, batch = _problem(name)
    F, rows = _dense_fisher(obj, batch, "exact")
    dg = capture(obj, batch, fisher="exact")
    assert dg.columns == obj.outputs(batch.inputs).shape[-1]
    assert math.isclose(fisher_trace(dg), float(torch.trace(F)), rel_tol=1e-10)
    diag = obj.space.flatten(fisher_diagonal(dg))
    torch.testing.assert_close(diag, torch.diagonal(F), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(gram_kernel(dg), rows @ rows.T, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_partial_eigensolver_on_formed_gram_matches_full_eigh(name):
    """Above eigh_limit rows the formed kernel goes to block Lanczos (bounds 1e-10)."""
    obj, batch = _problem(name)
    dg = capture(obj, batch, fisher="exact")
    dense = fisher_eigen(dg, 3)
    ticks = []
    part = fisher_eigen(dg, 3, eigh_limit=4, vectors=True, progress=ticks.append)
    assert dense.method == "gram" and part.method == "gram-block-lanczos"
    assert bool(part.converged.all()) and sum(ticks) == part.n_matvecs > 0
    gap = fisher_eigen(dg, 3, eigh_limit=4)  # eigenvalues only: the gap rule
    assert gap.method == "gram-block-lanczos" and bool(gap.converged.all())
    torch.testing.assert_close(gap.values, dense.values, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(part.values, dense.values, rtol=1e-9, atol=1e-13)
    F, _ = _dense_fisher(obj, batch, "exact")
    for lam, vec in zip(part.values, part.vectors, strict=True):
        v = obj.space.flatten(vec)
        torch.testing.assert_close(F @ v, lam * v, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("name", ["mlp", "mlp_nobias", "conv", "attention"])
@pytest.mark.parametrize("chunk", [1024, 3])
def test_float32_gram_products_within_the_rounding_bound(name, chunk, monkeypatch):
    """Float32 factors: Gram products in float32 (inner-dimension chunks summed in float64)
    and the sum over blocks in float32 stay within the error bound of `rows_gram` /
    `gram_kernel` against the float64 kernel of the same factors, and the top eigenvalues
    agree far beyond the 4 printed digits."""
    import gmcurv.factors.source as fa

    monkeypatch.setattr(fa, "GEMM_CHUNK", chunk)
    obj, batch = _problem(name)
    obj.model.float()
    x = batch.inputs.float() if batch.inputs.is_floating_point() else batch.inputs
    dg = capture(obj, type(batch)(x, batch.targets, 0))
    rows = _rows(dg, obj).reshape(N, -1).double()  # the same float32 gradients, in float64
    ref = rows @ rows.T
    K = gram_kernel(dg)
    assert K.dtype == torch.float64
    norms = torch.diagonal(ref).sqrt()
    bound = (
        4 * min(chunk, rows.shape[1]) * torch.finfo(torch.float32).eps * torch.outer(norms, norms)
    )
    assert bool(((K - ref).abs() <= bound + 1e-30).all())
    w, w_ref = torch.linalg.eigvalsh(K)[-4:], torch.linalg.eigvalsh(ref)[-4:]
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=0)


def _float32_mlp(n: int):
    g = torch.Generator().manual_seed(11)
    model = seeded(mlp, sizes=(6, 12, 12, 4)).float()
    x = torch.randn(n, 6, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return Objective.build(model, "cross_entropy"), x, y


def test_eigen_tolerance_rule():
    """Default: the kernel's own rounding, ``u tr K / N`` (``u`` of the factors' dtype) on
    top of the relative 1e-10; an explicit tolerance is relative alone."""
    from gmcurv.fisher import EIGEN_RTOL, eigen_tolerance

    obj, batch = _problem("mlp")
    dg = capture(obj, batch)
    rule = eigen_tolerance(dg, None, 8.0)
    assert rule["rtol"] == EIGEN_RTOL and rule["atol"] == pytest.approx(2.0**-53 * 8.0 / dg.n)
    assert eigen_tolerance(dg, 1e-4, 8.0) == {
        "rtol": 1e-4,
        "atol": 0.0,
        "rule": "requested: bound <= rtol λ_max",
    }


def test_float32_summary_first_product_and_precision_matched_tolerance(monkeypatch, tmp_path):
    """`fisher_summary` on float32 factors beyond the dense-eigh size: the block route's
    first product comes from the kernel's panels (`summed_gram_product` gets the block);
    the top-5 lie within the reported bound ``max(rtol λ_max, u tr F)`` of the formed
    kernel's exact spectrum, within 1e-5 of the float64 truth (vmap(grad) of the upcast
    weights: the float32 capture's own rounding), and an explicit tighter `tol` is met."""
    from safetensors.torch import save_file

    import gmcurv.gram_sum as gs
    from gmcurv.fisher import fisher_summary
    from gmcurv.io.data import load_data

    n = 320
    obj, x, y = _float32_mlp(n)
    save_file({"inputs": x, "targets": y}, str(tmp_path / "d.safetensors"))
    data = load_data(tmp_path / "d.safetensors", None)
    seen = []
    real = gs.summed_gram_product

    def spy(sources, size, device="cpu", progress=None, first=None, lower=False, diagonals=None):
        seen.append((first, lower))
        return real(sources, size, device, progress, first, lower, diagonals)

    monkeypatch.setattr(gs, "summed_gram_product", spy)
    s = fisher_summary(obj, data, batch_size=100, k=5)
    assert seen and seen[0][0] is not None and seen[0][0].shape[0] == n
    assert seen[0][1]  # the kernel stays as its lower panels (no mirroring)
    eig = [e.value for e in s.eigenvalues]
    assert s.eigenvalues[0].method == "gram-block-lanczos"
    assert all(e.converged for e in s.eigenvalues)
    rule = s.eigen_tolerance
    assert rule is not None and rule["atol"] == pytest.approx(2.0**-24 * s.trace.value, rel=1e-6)
    dg = capture(obj, Batch(x, y, 0))
    own = torch.linalg.eigvalsh(gram_kernel(dg).double()).flip(0)[:5] / n
    bound = max(rule["rtol"] * float(own[0]), rule["atol"])
    assert float((torch.tensor(eig, dtype=torch.float64) - own).abs().max()) <= bound
    obj64 = Objective.build(obj.model.double(), "cross_entropy")
    J = per_example_grads(obj64, Batch(x.double(), y, 0))
    truth = torch.linalg.eigvalsh(J @ J.T).flip(0)[:5] / n
    torch.testing.assert_close(torch.tensor(eig, dtype=torch.float64), truth, rtol=1e-5, atol=0)
    obj.model.float()
    tight = fisher_summary(obj, data, batch_size=100, k=5, tol=1e-12)
    assert tight.eigen_tolerance == {
        "rtol": 1e-12,
        "atol": 0.0,
        "rule": "requested: bound <= rtol λ_max",
    }
    got = torch.tensor([e.value for e in tight.eigenvalues], dtype=torch.float64)
    torch.testing.assert_close(got, own, rtol=1e-10, atol=0)


def test_kernel_formed_while_capturing_on_two_threads(monkeypatch, tmp_path):
    """Two torch threads, enough batches, every block one-token Linear: `fisher_summary`
    forms ``K`` while capturing (`gmcurv.gram_sum.PanelStream`, the capture on one thread,
    the panels on another; not for two batches), restores the thread count, and gives
    the top-5 of the one-thread route within the reported bound and the float64 truth to
    1e-5."""
    from safetensors.torch import save_file

    import gmcurv.fisher as F
    import gmcurv.gram_sum as gs
    from gmcurv.fisher import fisher_summary
    from gmcurv.io.data import load_data

    n = 320
    obj, x, y = _float32_mlp(n)
    save_file({"inputs": x, "targets": y}, str(tmp_path / "d.safetensors"))
    data = load_data(tmp_path / "d.safetensors", None)
    one = fisher_summary(obj, data, batch_size=100, k=5)
    finished = []
    real = gs.PanelStream.finish
    monkeypatch.setattr(
        gs.PanelStream, "finish", lambda self, first=None: finished.append(1) or real(self, first)
    )
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert n >= F.STREAM_BATCHES * 64  # enough batches to stream
        two = fisher_summary(obj, data, batch_size=64, k=5)
        fisher_summary(obj, data, batch_size=n // 2, k=5)  # two batches: formed after
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)
    assert finished == [1]
    assert two.eigenvalues[0].method == "gram-block-lanczos"
    assert all(e.converged for e in two.eigenvalues)
    assert two.trace.value == one.trace.value
    rule = two.eigen_tolerance
    assert rule is not None and rule == one.eigen_tolerance
    a = torch.tensor([e.value for e in one.eigenvalues], dtype=torch.float64)
    b = torch.tensor([e.value for e in two.eigenvalues], dtype=torch.float64)
    bound = max(rule["rtol"] * float(a[0]), rule["atol"])
    assert float((a - b).abs().max()) <= 2 * bound
    obj64 = Objective.build(obj.model.double(), "cross_entropy")
    J = per_example_grads(obj64, Batch(x.double(), y, 0))
    truth = torch.linalg.eigvalsh(J @ J.T).flip(0)[:5] / n
    torch.testing.assert_close(b, truth, rtol=1e-5, atol=0)
