"""Hutchinson, Hutch++, shared-product block traces, the diagonal: unbiased, calibrated."""

from __future__ import annotations

import math

import pytest
import torch
from oracles import dense_hessian

from gmcurv.errors import ConfigError
from gmcurv.operator import CurvatureOperator
from gmcurv.params import ParamSpace
from gmcurv.stochastic import (
    MIN_ADAPTIVE_PROBES,
    diagonal,
    exact_trace,
    hessian_diagonal,
    hutchinson,
    hutchpp,
    shared_block_traces,
    trace,
)


def _matrix(n=60, decay=0.9, seed=0, negative=True):
    """Symmetric, indefinite, decaying spectrum (Hutch++'s favourable case)."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    w = decay ** torch.arange(n, dtype=torch.float64) * 10
    if negative:
        w[1::7] *= -1
    return Q @ torch.diag(w) @ Q.T


def _check_unbiased_and_calibrated(estimates, truth):
    values = torch.tensor([e.value for e in estimates], dtype=torch.float64)
    ses = torch.tensor([e.stderr for e in estimates], dtype=torch.float64)
    m = len(values)
    mean_se = float(values.std()) / math.sqrt(m)
    assert abs(float(values.mean()) - truth) <= 3 * mean_se  # unbiased
    # calibrated: the reported stderr matches the spread over seeds
    ratio = float(ses.pow(2).mean().sqrt()) / float(values.std())
    assert 0.8 < ratio < 1.25, ratio
    z = (values - truth) / ses
    assert float((z.abs() < 2).double().mean()) > 0.85  # t-tails with few probes


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp"])
def test_trace_estimators_unbiased_and_calibrated(method):
    A = _matrix()
    truth = float(torch.trace(A))
    if method == "hutchinson":
        ests = [hutchinson(lambda v: A @ v, 60, 30, seed=s) for s in range(300)]
    else:
        ests = [hutchpp(lambda v: A @ v, 60, 30, seed=s) for s in range(300)]
    assert all(e.n_matvecs == 30 for e in ests)
    _check_unbiased_and_calibrated(ests, truth)


def test_hutchpp_beats_hutchinson_on_decaying_spectrum():
    A = _matrix(decay=0.8)
    truth = float(torch.trace(A))
    err = {}
    for name, fn in (("h", hutchinson), ("pp", hutchpp)):
        vals = torch.tensor([fn(lambda v: A @ v, 60, 30, seed=s).value for s in range(50)])
        err[name] = float((vals - truth).pow(2).mean().sqrt())
    assert err["pp"] < err["h"] / 3, err


def test_exact_and_small_blocks():
    A = _matrix(n=12)
    e = exact_trace(lambda v: A @ v, 12)
    assert e.value == pytest.approx(float(torch.trace(A)), rel=1e-12) and e.exact
    assert e.estimate().stderr is None and e.estimate().n_matvecs == 12
    auto = trace(lambda v: A @ v, 12, 20, "hutchpp")
    assert auto.exact and auto.n_matvecs == 12
    with pytest.raises(ConfigError):
        trace(lambda v: A @ v, 12, 20, "bogus")
    with pytest.raises(ConfigError):
        hutchinson(lambda v: A @ v, 12, 1)


def test_hutchinson_stops_early_at_rtol():
    A = torch.eye(50, dtype=torch.float64) * 3.0  # z^T A z = 150 for every Rademacher z
    e = hutchinson(lambda v: A @ v, 50, 100, rtol=1e-3)
    assert e.n_probes == 8 and e.value == pytest.approx(150.0) and e.stderr == 0.0


def test_diagonal_unbiased_and_calibrated():
    A = _matrix(n=40, decay=0.95)
    truth = torch.diagonal(A)
    runs = [diagonal(lambda v: A @ v, 40, 20, seed=s) for s in range(200)]
    values = torch.stack([r.value for r in runs])  # [seeds, n]
    ses = torch.stack([r.stderr for r in runs])
    mean_se = values.std(0) / math.sqrt(len(runs))
    assert bool(((values.mean(0) - truth).abs() <= 3.5 * mean_se).all())
    ratio = ses.pow(2).mean(0).sqrt() / values.std(0)
    assert 0.8 < float(ratio.median()) < 1.2
    z = (values - truth) / ses
    assert float((z.abs() < 2).double().mean()) > 0.9
    D = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    d = diagonal(lambda v: D @ v, 5, 3)
    torch.testing.assert_close(d.value, torch.diagonal(D))
    torch.testing.assert_close(d.stderr, torch.zeros(5, dtype=torch.float64))


def test_hessian_diagonal_on_operator(tmp_path):
    from test_hessian import problem

    obj, batch, data = problem("attention", tmp_path)
    H = dense_hessian(obj, batch)
    op = CurvatureOperator(obj, data, batch_size=4)
    res = hessian_diagonal(op, probes=60, seed=3)
    assert res.n_matvecs == 60 == op.n_matvecs and res.value.shape == (obj.space.size,)
    z = (res.value - torch.diagonal(H)) / res.stderr.clamp_min(1e-300)
    assert float((z.abs() < 3).double().mean()) > 0.97
    value, stderr = res.as_dicts(obj.space)
    assert stderr["q.weight"].shape == obj.params["q.weight"].shape
    assert (
        set(value) == set(obj.params) and value["ln.weight"].shape == obj.params["ln.weight"].shape
    )


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp"])
def test_shared_block_traces_unbiased_calibrated_per_block(method):
    """Every block's trace from the same full-space products: unbiased, and its standard
    error covers the truth as often as it should (coverage over 1,000 seeds: with 200, one
    block of the bit-drawn probes' seeds 0-199 sat 3.1 standard errors off, a 1-in-500
    draw; 5,000 other seeds put it within 1.6)."""
    A = _matrix(n=30)
    space = ParamSpace(("a", "b", "c"), ((4, 2), (10,), (3, 4)))
    blocks = {"ac": ["a", "c"], "b": ["b"]}
    d = torch.diagonal(A)
    truth = {"ac": float(d[:8].sum() + d[18:].sum()), "b": float(d[8:18].sum())}
    runs = [
        shared_block_traces(lambda v: A @ v, space, blocks, 15, method, seed=s) for s in range(1000)
    ]
    for name in blocks:
        _check_unbiased_and_calibrated([r.blocks[name] for r in runs], truth[name])
    _check_unbiased_and_calibrated([r.total for r in runs], float(torch.trace(A)))
    for r in runs[:5]:  # the blocks partition the space: they sum to the total exactly
        assert sum(e.value for e in r.blocks.values()) == pytest.approx(r.total.value)
        assert r.total.n_matvecs == 15 and r.stopped == "probes"


def test_shared_block_traces_stop_at_tolerance():
    A = torch.eye(40, dtype=torch.float64) * 2.0  # every probe gives exactly 80
    space = ParamSpace(("a", "b"), ((10,), (30,)))
    r = shared_block_traces(
        lambda v: A @ v, space, {"a": ["a"], "b": ["b"]}, 100, "hutchinson", rtol=0.01
    )
    assert r.stopped == "tol" and r.total.n_matvecs == MIN_ADAPTIVE_PROBES
    assert r.total.value == pytest.approx(80.0) and r.blocks["a"].value == pytest.approx(20.0)
    capped = shared_block_traces(
        lambda v: _matrix(n=40) @ v, space, {}, 12, "hutchinson", rtol=1e-6
    )
    assert capped.stopped == "probes" and capped.total.n_matvecs == 12 and capped.blocks == {}


def test_lanczos_deflated_traces_unbiased_calibrated_and_exact_eigenvalues():
    """The eigenvalues' Lanczos basis as the trace's sketch: per block and in total the
    estimate is unbiased with a calibrated standard error (200 seeds), its products include
    the Lanczos ones, and the eigenvalues are those of the dense matrix."""
    from gmcurv.lanczos_trace import METHOD, lanczos_block_traces

    A = _matrix(n=30, decay=0.8)
    space = ParamSpace(("a", "b", "c"), ((4, 2), (10,), (3, 4)))
    blocks = {"ac": ["a", "c"], "b": ["b"]}
    d = torch.diagonal(A)
    truth = {"ac": float(d[:8].sum() + d[18:].sum()), "b": float(d[8:18].sum())}
    runs = [
        lanczos_block_traces(lambda v: A @ v, space, blocks, 2, 24, tol=1e-3, seed=s)
        for s in range(200)
    ]
    for name in blocks:
        _check_unbiased_and_calibrated([r.blocks[name] for _, r in runs], truth[name])
    _check_unbiased_and_calibrated([r.total for _, r in runs], float(torch.trace(A)))
    top = torch.linalg.eigvalsh(A).flip(0)[:2]
    for lz, r in runs[:5]:
        m = lz.basis.shape[0]
        assert 2 <= m < 16 and r.total.n_matvecs == 24 and r.total.n_probes == 24 - m
        assert r.total.method == METHOD and r.stopped == "probes"
        assert sum(e.value for e in r.blocks.values()) == pytest.approx(r.total.value)
        torch.testing.assert_close(lz.values, top, atol=1e-3 * float(top[0]), rtol=0)
        eye = torch.eye(m, dtype=torch.float64)
        torch.testing.assert_close(lz.basis @ lz.basis.T, eye, atol=1e-12, rtol=0)
    # a basis spanning the whole space: the trace is exact, no residual probes
    lz, r = lanczos_block_traces(lambda v: A @ v, space, blocks, 2, 40, tol=0.0, seed=0)
    assert lz.basis.shape[0] == 30 and r.total.exact and r.total.n_matvecs == 30
    assert r.total.value == pytest.approx(float(torch.trace(A)), rel=1e-10)
    assert r.blocks["b"].value == pytest.approx(truth["b"], rel=1e-9)
    # adaptive: stops once the relative standard error is within rtol
    D = torch.diag(torch.cat([torch.tensor([50.0, 40.0]), torch.ones(28)])).double()
    lz, r = lanczos_block_traces(lambda v: D @ v, space, blocks, 1, 100, tol=1e-6, rtol=0.01)
    assert r.stopped == "tol" and r.total.n_matvecs < 100
    assert r.total.stderr <= 0.01 * r.total.value and abs(r.total.value - 118) <= 4 * r.total.stderr


def test_rademacher_bits_signs_shapes_and_stream():
    """±1 in the asked dtype; the same generator state gives the same signs; ``count``
    rows are fresh draws; signs are balanced and uncorrelated (4,000 probes of 70)."""
    from gmcurv.stochastic import _generator, rademacher_bits

    for n in (1, 63, 64, 65, 300):
        z = rademacher_bits(n, _generator(5, "cpu"), torch.float32)
        assert z.shape == (n,) and z.dtype == torch.float32 and bool((z.abs() == 1).all())
        torch.testing.assert_close(z, rademacher_bits(n, _generator(5, "cpu"), torch.float32))
        rows = rademacher_bits(n, _generator(5, "cpu"), torch.float64, count=3)
        assert rows.shape == (3, n) and rows.is_contiguous()
        torch.testing.assert_close(rows[0], z.double())
    gen = _generator(0, "cpu")
    Z = torch.cat([rademacher_bits(70, gen, count=100) for _ in range(40)])  # [4000, 70]
    C = Z.T @ Z / Z.shape[0]
    assert float((C - torch.eye(70, dtype=torch.float64)).abs().max()) < 5 / Z.shape[0] ** 0.5
    assert float(Z.mean(0).abs().max()) < 5 / Z.shape[0] ** 0.5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hutchinson_samples_are_the_dense_hessians_on_the_same_probes(dtype, tmp_path):
    """Total and per-layer Hutchinson traces through the operator (kept graph, bit-drawn
    probes, float64 sums of the products in the model's precision) equal the means and
    standard errors of ``z_b^T (H z)_b`` computed with the double-backward float64 Hessian
    on the same probes."""
    from test_hessian import problem

    from gmcurv.hessian import capture_blocks, curvature_summary
    from gmcurv.stochastic import _generator, block_slices, rademacher_bits

    obj, batch, data = problem("attention", tmp_path)
    obj.model.to(dtype).double()  # the oracle at the model's own (rounded) weights
    H = dense_hessian(type(obj).build(obj.model, "cross_entropy"), batch)
    obj = type(obj).build(obj.model.to(dtype), "cross_entropy")
    probes = 9
    s = curvature_summary(
        obj, data, "hessian", method="hutchinson", probes=probes, k=0, per_layer=True,
        seed=4, rtol=0.0,
    )  # fmt: skip
    blocks = {b: p for b, (p, _) in capture_blocks(obj).items()}
    slices = block_slices(obj.space, blocks)
    gen = _generator(4, "cpu")
    Z = torch.stack([rademacher_bits(obj.space.size, gen, dtype) for _ in range(probes)])
    Z = Z.double()
    rtol = 1e-10 if dtype == torch.float64 else 2e-5

    def check(est, samples):
        assert est.n_matvecs == probes and est.method == "hutchinson"
        assert est.value == pytest.approx(float(samples.mean()), rel=rtol)
        se = float(samples.std()) / probes**0.5
        assert est.stderr == pytest.approx(se, rel=10 * rtol)

    HZ = Z @ H  # [probes, P]: the products, exactly
    check(s.trace, (Z * HZ).sum(1))
    for b, sls in slices.items():  # shared products: z_b^T (H z)_b, unbiased for tr H_bb
        idx = torch.cat([torch.arange(sl.start, sl.stop) for sl in sls])
        check(s.per_layer[b].trace, (Z[:, idx] * HZ[:, idx]).sum(1))
