"""LoRA features: singular values from QRs vs the dense product, GL(r) invariance, ranks,
the canonical (SVD) factorisation."""

from __future__ import annotations

import math

import pytest
import torch

from gmcurv.lora.adapter import LoraLayer
from gmcurv.lora.features import (
    canonical_factors,
    effective_rank,
    layer_features,
    singular_values,
    stable_rank,
    update_svd,
)

TOL = 1e-8


def _layer(B, A, scale=0.7, kind="linear"):
    return LoraLayer("m", kind, A, B, alpha=scale * B.shape[1], scale=scale)


def _random(gen, m, k, r, kind="linear"):
    if kind == "conv2d":
        A = torch.randn(r, 3, 2, 2, generator=gen, dtype=torch.float64)
        B = torch.randn(m, r, 1, 1, generator=gen, dtype=torch.float64)
    else:
        A = torch.randn(r, k, generator=gen, dtype=torch.float64)
        B = torch.randn(m, r, generator=gen, dtype=torch.float64)
    return B, A


def _invertible(gen, r):
    """A random R with condition number below ~50 (so 1e-8 is a fair tolerance)."""
    while True:
        R = torch.randn(r, r, generator=gen, dtype=torch.float64)
        if torch.linalg.cond(R) < 50:
            return R


def _features_vector(f) -> list[float]:
    return [
        *(e.value for e in f.singular_values),
        f.frobenius.value,
        f.spectral.value,
        f.nuclear.value,
        f.effective_rank.value,
        f.stable_rank.value,
        float(f.numerical_rank),
    ]


@pytest.mark.parametrize(
    ("m", "k", "r", "kind"),
    [(7, 5, 3, "linear"), (4, 9, 6, "linear"), (6, 3, 5, "linear"), (5, 12, 2, "conv2d"),
     (1, 8, 2, "linear")],
)  # fmt: skip
def test_singular_values_equal_the_dense_product(gen, m, k, r, kind):
    B, A = _random(gen, m, k, r, kind)
    layer = _layer(B, A, scale=-1.3, kind=kind)  # |s| enters, not s
    dense = 1.3 * (B.reshape(m, r) @ A.reshape(r, -1))
    ref = torch.linalg.svdvals(dense)
    got = singular_values(layer)
    assert got.shape[0] == min(m, A.reshape(r, -1).shape[1], r)
    torch.testing.assert_close(got, ref[: got.shape[0]], rtol=1e-12, atol=1e-12)
    assert float(ref[got.shape[0] :].abs().sum()) < 1e-12  # the rest are zero
    f = layer_features(layer)
    assert f.frobenius.value == pytest.approx(float(torch.linalg.norm(dense)), rel=1e-12)
    assert f.spectral.value == pytest.approx(float(torch.linalg.matrix_norm(dense, 2)), rel=1e-12)
    assert f.nuclear.value == pytest.approx(
        float(torch.linalg.matrix_norm(dense, "nuc")), rel=1e-12
    )
    assert f.numerical_rank == int(torch.linalg.matrix_rank(dense))
    assert f.shape == tuple(dense.shape)


def test_svd_factors_reconstruct_the_product(gen):
    B, A = _random(gen, 9, 6, 4)
    svd = update_svd(B, A)
    torch.testing.assert_close(svd.U @ torch.diag(svd.S) @ svd.V.T, B @ A, rtol=0, atol=1e-12)
    eye = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(svd.U.T @ svd.U, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(svd.V.T @ svd.V, eye, rtol=0, atol=1e-12)


@pytest.mark.parametrize("group", ["GL", "O"])
@pytest.mark.parametrize(
    ("m", "k", "r", "kind"), [(8, 6, 3, "linear"), (5, 5, 5, "linear"), (6, 12, 4, "conv2d")]
)
def test_every_feature_is_invariant_under_the_symmetry(gen, group, m, k, r, kind):
    B, A = _random(gen, m, k, r, kind)
    ref = _features_vector(layer_features(_layer(B, A, kind=kind)))
    B2, A2 = B.reshape(m, r), A.reshape(r, -1)
    for _ in range(5):
        R = _invertible(gen, r) if group == "GL" else torch.linalg.qr(_invertible(gen, r))[0]
        Bt = (B2 @ R).reshape(B.shape)
        At = torch.linalg.solve(R, A2).reshape(A.shape)
        assert not torch.allclose(Bt, B)  # the factors did change
        got = _features_vector(layer_features(_layer(Bt, At, kind=kind)))
        assert got == pytest.approx(ref, rel=TOL, abs=TOL)


def test_invariance_is_not_vacuous(gen):
    """Changing B alone (not a symmetry) changes the features."""
    B, A = _random(gen, 6, 5, 3)
    ref = _features_vector(layer_features(_layer(B, A)))
    other = _features_vector(layer_features(_layer(B * torch.tensor([1.0, 2.0, 1.0]), A)))
    assert other != pytest.approx(ref, rel=1e-3)


def test_effective_and_stable_rank_on_known_spectra():
    flat = torch.ones(4, dtype=torch.float64) * 3.0
    assert effective_rank(flat) == pytest.approx(4.0, rel=1e-14)
    assert stable_rank(flat) == pytest.approx(4.0, rel=1e-14)
    one = torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64)
    assert effective_rank(one) == pytest.approx(1.0) and stable_rank(one) == pytest.approx(1.0)
    s = torch.tensor([3.0, 1.0], dtype=torch.float64)
    p = s / s.sum()
    assert effective_rank(s) == pytest.approx(math.exp(-float((p * p.log()).sum())), rel=1e-14)
    assert stable_rank(s) == pytest.approx(10 / 9, rel=1e-14)


def test_zero_update_has_zero_features(gen):
    """A freshly initialised PEFT adapter (B = 0) is the zero update."""
    A = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    f = layer_features(_layer(torch.zeros(4, 3, dtype=torch.float64), A))
    assert all(v == 0.0 for v in _features_vector(f))


def test_numerical_rank_sees_a_rank_deficient_update(gen):
    B, A = _random(gen, 8, 7, 4)
    B[:, 3] = B[:, 0] + 2 * B[:, 1]  # rank 3 product
    f = layer_features(_layer(B, A))
    assert f.numerical_rank == 3
    assert f.singular_values[3].value < 1e-12 * f.singular_values[0].value


@pytest.mark.parametrize(("m", "k", "r"), [(7, 5, 3), (3, 8, 5)])
def test_canonical_factors_are_a_factorisation_and_invariant(gen, m, k, r):
    B, A = _random(gen, m, k, r)
    Bc, Ac = canonical_factors(B, A)
    assert Bc.shape == B.shape and Ac.shape == A.shape
    torch.testing.assert_close(Bc @ Ac, B @ A, rtol=0, atol=1e-12)
    # balanced: B'ᵀB' = A'A'ᵀ = diag(σ)
    torch.testing.assert_close(Bc.T @ Bc, Ac @ Ac.T, rtol=0, atol=1e-12)
    for _ in range(3):
        R = _invertible(gen, r)
        Bt, At = canonical_factors(B @ R, torch.linalg.solve(R, A))
        torch.testing.assert_close(Bt, Bc, rtol=0, atol=1e-9)
        torch.testing.assert_close(At, Ac, rtol=0, atol=1e-9)
    B2, A2 = canonical_factors(Bc, Ac)  # idempotent
    torch.testing.assert_close(B2, Bc, rtol=0, atol=1e-12)
    torch.testing.assert_close(A2, Ac, rtol=0, atol=1e-12)
