"""Lanczos on matrices with known spectra and on tiny-model Hessians."""

from __future__ import annotations

import pytest
import torch
from oracles import dense_hessian

from gmcurv.block_krylov import block_lanczos
from gmcurv.lanczos import dense_topk, error_bounds, lanczos, lanczos_tridiagonal
from gmcurv.operator import CurvatureOperator


def _with_spectrum(w: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = len(w)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    return Q @ torch.diag(w.double()) @ Q.T


SPECTRA = {
    # well separated top, bulk near zero
    "decaying": torch.cat([torch.tensor([50.0, 30, 20, 12, 8]), torch.linspace(0, 1, 95)]),
    # clustered top eigenvalues (relative gaps 1e-3)
    "clustered": torch.cat([10 - 1e-2 * torch.arange(6.0), torch.linspace(-1, 2, 94)]),
    # negative eigenvalues, largest magnitude negative
    "negative": torch.cat([torch.tensor([-40.0, -25, 9, 7, 5]), torch.linspace(-3, 3, 95)]),
}


@pytest.mark.parametrize(
    ("name", "which"),
    [
        ("decaying", "LA"),
        ("decaying", "LM"),
        ("clustered", "LA"),
        ("clustered", "LM"),
        ("negative", "LA"),
        ("negative", "SA"),
        ("negative", "LM"),
    ],
)
def test_known_spectra(name, which):
    w = SPECTRA[name]
    A = _with_spectrum(w)
    ref, _ = dense_topk(A, 4, which)
    res = lanczos(lambda v: A @ v, 100, 4, which=which, tol=1e-12, max_iters=100, vectors=True)
    torch.testing.assert_close(res.values, ref, rtol=0, atol=1e-8 * float(w.abs().max()))
    assert bool(res.converged.all())
    for v, theta, r in zip(res.vectors, res.values, res.residuals, strict=True):
        true = float((A @ v - theta * v).norm())
        assert float(r) == pytest.approx(true, abs=1e-9)  # the reported residual is real
    assert res.n_matvecs == res.iterations


def test_degenerate_spectrum_with_restarts():
    w = torch.cat([torch.tensor([5.0, 5.0, 5.0, 3.0]), torch.linspace(0, 1, 56)])
    A = _with_spectrum(w, seed=1)
    res = lanczos(lambda v: A @ v, 60, 4, tol=1e-10, max_restarts=4)
    torch.testing.assert_close(res.values, torch.tensor([5.0, 5, 5, 3], dtype=torch.float64))
    assert bool(res.converged.all())


def test_non_convergence_is_reported():
    A = _with_spectrum(SPECTRA["clustered"])
    res = lanczos(lambda v: A @ v, 100, 4, tol=1e-12, max_iters=8, max_restarts=0)
    assert res.iterations == 8 and not bool(res.converged.all())


def test_gap_criterion_stops_earlier_with_accurate_values():
    A = _with_spectrum(SPECTRA["decaying"])
    ref, _ = dense_topk(A, 3)
    strict = lanczos(lambda v: A @ v, 100, 3, tol=1e-6, max_restarts=0)
    gap = lanczos(lambda v: A @ v, 100, 3, tol=1e-6, max_restarts=0, criterion="gap")
    assert gap.n_matvecs <= strict.n_matvecs
    assert float(((gap.values - ref).abs() / ref.abs()).max()) <= 1e-6
    theta = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    res = torch.tensor([1e-3, 1e-3, 1e-3], dtype=torch.float64)
    b = error_bounds(theta, res, torch.tensor([0]), "gap")
    assert float(b[0]) == pytest.approx(1e-6 / (1 - 1e-3))  # r^2 / (gap - r_neighbour)


def test_tridiagonal_is_projection():
    A = _with_spectrum(SPECTRA["negative"])
    g = torch.Generator().manual_seed(0)
    z = torch.randn(100, generator=g, dtype=torch.float64)
    alpha, beta = lanczos_tridiagonal(lambda v: A @ v, z, 100)
    T = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    torch.testing.assert_close(
        torch.linalg.eigvalsh(T), torch.linalg.eigvalsh(A), atol=1e-9, rtol=0
    )
    # an invariant subspace stops the recurrence early
    D = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    a, b = lanczos_tridiagonal(
        lambda v: D @ v, torch.tensor([1.0, 1.0, 0, 0], dtype=torch.float64), 4
    )
    assert len(a) == 2 and len(b) == 1


@pytest.mark.parametrize("name", ["mlp", "attention", "conv"])
def test_top_k_of_tiny_model_hessians(name, tmp_path):
    from test_hessian import problem

    obj, batch, data = problem(name, tmp_path)
    H = dense_hessian(obj, batch)
    op = CurvatureOperator(obj, data, batch_size=4)
    for which in ("LA", "SA"):
        res = lanczos(op.matvec, op.size, 3, which=which, tol=1e-12, max_restarts=0)
        ref, _ = dense_topk(H, 3, which)
        torch.testing.assert_close(res.values, ref, rtol=0, atol=1e-8)


# ----------------------------------------------------------------- block Lanczos (formed K)
@pytest.mark.parametrize("name", ["decaying", "clustered"])
@pytest.mark.parametrize("criterion", ["gap", "residual"])
def test_block_lanczos_known_spectra(name, criterion):
    w = SPECTRA[name]
    A = _with_spectrum(w)
    ref, _ = dense_topk(A, 4)
    ticks = []
    res = block_lanczos(
        lambda X: A @ X, 100, 4, tol=1e-12, vectors=True, criterion=criterion,
        progress=ticks.append,
    )  # fmt: skip
    torch.testing.assert_close(res.values, ref, rtol=0, atol=1e-9 * float(w.abs().max()))
    assert bool(res.converged.all()) and sum(ticks) == res.n_matvecs
    assert res.n_matvecs < 100  # a partial solve, not the whole space
    for v, theta, r in zip(res.vectors, res.values, res.residuals, strict=True):
        assert float(v.norm()) == pytest.approx(1.0, abs=1e-12)
        true = float((A @ v - theta * v).norm())
        assert float(r) == pytest.approx(true, abs=1e-9)  # the reported residual is real


def test_block_lanczos_sees_multiplicities_and_low_rank():
    """A triple top eigenvalue (inside one block) and a rank-6 matrix (the basis reaches
    an invariant subspace: vanishing directions are replaced, the pairs are exact)."""
    w = torch.cat([torch.tensor([5.0, 5.0, 5.0, 3.0]), torch.linspace(0, 1, 56)])
    A = _with_spectrum(w, seed=1)
    res = block_lanczos(lambda X: A @ X, 60, 4, tol=1e-10)
    torch.testing.assert_close(res.values, torch.tensor([5.0, 5, 5, 3], dtype=torch.float64))
    assert bool(res.converged.all())
    g = torch.Generator().manual_seed(2)
    J = torch.randn(6, 40, generator=g, dtype=torch.float64)
    K = J.T @ J  # rank 6
    ref = torch.linalg.eigvalsh(K).flip(0)[:5]
    res = block_lanczos(lambda X: K @ X, 40, 5, block=4, tol=1e-12)
    torch.testing.assert_close(res.values, ref, rtol=1e-10, atol=1e-10)
    assert bool(res.converged.all())


def test_block_lanczos_unconverged_is_reported():
    """A basis cap too small for the tolerance: not converged, and the bounds say so."""
    A = _with_spectrum(SPECTRA["clustered"])
    res = block_lanczos(lambda X: A @ X, 100, 4, block=2, tol=1e-14, max_basis=4)
    assert not bool(res.converged.all()) and res.n_matvecs == 4


@pytest.mark.parametrize("solver", ["lanczos", "block"])
def test_absolute_floor_stops_at_the_operator_precision(solver):
    """``atol`` floors the stopping bound (``max(tol max|θ|, atol)``): with the floor at
    1e-6 λ_max the solve takes fewer products than to 1e-12, and every value is still
    within its floor of the dense float64 spectrum (the gap bound is rigorous)."""
    A = _with_spectrum(SPECTRA["clustered"])
    ref, _ = dense_topk(A, 4)
    floor = 1e-6 * float(ref[0])

    def solve(**kw):
        if solver == "block":
            return block_lanczos(lambda X: A @ X, 100, 4, block=4, tol=1e-12, **kw)
        return lanczos(lambda v: A @ v, 100, 4, tol=1e-12, criterion="gap", **kw)

    tight, floored = solve(), solve(atol=floor)
    assert bool(tight.converged.all()) and bool(floored.converged.all())
    assert floored.n_matvecs < tight.n_matvecs
    assert float((floored.values - ref).abs().max()) <= floor
    torch.testing.assert_close(tight.values, ref, rtol=1e-10, atol=0)
