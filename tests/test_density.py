"""Stochastic Lanczos quadrature and the smoothed spectral density."""

from __future__ import annotations

import math

import pytest
import torch
from oracles import dense_hessian

from gmcurv.density import (
    Quadrature,
    density_from,
    exact_quadrature,
    gaussian_density,
    slq,
    spectrum_summary,
)
from gmcurv.stochastic import rademacher


def _matrix(n=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    w = torch.cat([torch.tensor([20.0, 12.0, 7.0]), torch.randn(n - 3, generator=g).double()])
    return Q @ torch.diag(w) @ Q.T, w


def test_weights_are_first_ritz_components_squared():
    """Σ_j w_j θ_j^k = z^T A^k z / n exactly for k <= 2m - 1 (catches ``b**2`` bugs)."""
    A, _ = _matrix()
    steps = 6
    q = slq(lambda v: A @ v, 80, 3, steps, seed=5)
    gen = torch.Generator().manual_seed(5)
    assert torch.allclose(q.weights.sum(1), torch.ones(3, dtype=torch.float64))
    for i in range(3):
        z = rademacher(80, gen)
        alpha_probe = z / z.norm()
        Ak = alpha_probe.clone()
        for k in range(1, 2 * steps):
            Ak = A @ Ak
            exact = float(alpha_probe @ Ak)
            quad = float((q.weights[i] * q.nodes[i].pow(k)).sum())
            assert quad == pytest.approx(exact, rel=1e-8, abs=1e-8 * 20.0**k)
    assert q.n_matvecs == 3 * steps and q.steps == [steps] * 3


def test_moments_unbiased_against_dense_spectrum():
    A, w = _matrix()
    q = slq(lambda v: A @ v, 80, 40, 10, seed=0)
    for k in (1, 2, 3, 4):
        mean, se = q.moment(k)
        truth = float(w.pow(k).mean())
        assert abs(mean - truth) <= 3.5 * se, (k, mean, truth, se)


def test_full_lanczos_recovers_the_spectrum():
    A, w = _matrix(n=30)
    q = slq(lambda v: A @ v, 30, 1, 30, seed=2)
    torch.testing.assert_close(q.nodes[0], w.sort().values, atol=1e-9, rtol=0)


def test_density_integrates_to_one_and_peaks_at_outliers():
    A, w = _matrix()
    q = slq(lambda v: A @ v, 80, 4, 30, seed=1)
    spec = density_from(q, "hessian", 80, points=4000, rel_sigma=0.005)
    dx = float(spec.grid[1] - spec.grid[0])
    assert float(spec.density.sum()) * dx == pytest.approx(1.0, abs=1e-3)
    near_top = spec.density[(spec.grid - 20.0).abs() < 3 * spec.sigma].max()
    between = spec.density[(spec.grid - 16.0).abs() < 3 * spec.sigma].max()
    assert float(near_top) > 100 * float(between)
    assert spec.trace.value == pytest.approx(80 * q.moment(1)[0])
    exact = density_from(exact_quadrature(w), "hessian", 80)
    assert exact.moments[1].stderr is None
    assert exact.moments[1].value == pytest.approx(float(w.pow(2).mean()))


def test_gaussian_density_formula():
    q = Quadrature(
        torch.tensor([[0.0, 1.0]], dtype=torch.float64),
        torch.tensor([[0.25, 0.75]], dtype=torch.float64),
        [2],
        2,
    )
    x = torch.tensor([0.0, 1.0], dtype=torch.float64)
    got = gaussian_density(q, x, 0.5)
    phi = lambda d: math.exp(-0.5 * (d / 0.5) ** 2) / (0.5 * math.sqrt(2 * math.pi))  # noqa: E731
    torch.testing.assert_close(
        got, torch.tensor([0.25 * phi(0) + 0.75 * phi(1), 0.25 * phi(1) + 0.75 * phi(0)]).double()
    )


def test_spectrum_summary_slq_matches_exact_moments(tmp_path):
    from test_hessian import problem

    obj, batch, data = problem("attention", tmp_path)
    H = dense_hessian(obj, batch)
    w = torch.linalg.eigvalsh(H)
    exact = spectrum_summary(obj, data, "hessian", method="exact", batch_size=4)
    assert exact.method == "exact(dense)"
    assert exact.trace.value == pytest.approx(float(w.sum()), rel=1e-9)
    s = spectrum_summary(obj, data, "hessian", method="lanczos", probes=8, steps=12, seed=0)
    assert s.method == "slq" and s.n_matvecs == 8 * 12
    for k in (1, 2):
        m = s.moments[k - 1]
        assert abs(m.value - float(w.pow(k).mean())) <= 4 * m.stderr
