"""Damped inverse Fisher via Woodbury equals the dense float64 inverse of F + eps I."""

from __future__ import annotations

import math

import pytest
import torch
from oracles import per_example_grads
from test_capture import _problem, _rows

import gmcurv.woodbury as wb
from gmcurv.capture import capture
from gmcurv.errors import ConfigError
from gmcurv.fisher import fisher_trace
from gmcurv.woodbury import DampedFisher, default_eps, param_columns, remaining_kernel

CASES = ["mlp", "tokens", "conv", "attention", "tied", "custom"]


def _dense(obj, batch, fisher="empirical"):
    """(dg, J [N C, P]) with J from vmap(grad) for the empirical Fisher, else the factors."""
    dg = capture(obj, batch, fisher=fisher, mc_samples=2, seed=3)
    if fisher == "empirical":
        J = per_example_grads(obj, batch)
    else:
        J = _rows(dg, obj).reshape(-1, obj.space.size)
    return dg, J


def _block_columns(obj, dg):
    off = obj.space.offsets()
    return [
        torch.cat([torch.arange(off[p].start, off[p].stop) for p in b.params]) for b in dg.blocks
    ]


def _dense_damped(obj, dg, J, eps, structure):
    F = J.T @ J / dg.n
    if structure == "block":
        Fb = torch.zeros_like(F)
        for cols in _block_columns(obj, dg):
            Fb[cols[:, None], cols] = F[cols[:, None], cols]
        F = Fb
    return F + eps * torch.eye(F.shape[0], dtype=F.dtype)


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    """Force several column chunks per parameter so the chunking is exercised."""
    monkeypatch.setattr(wb, "COLUMN_CHUNK", 64)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("structure", ["block", "global"])
def test_inverse_diagonal_and_column_match_dense(name, structure):
    obj, batch = _problem(name)
    dg, J = _dense(obj, batch)
    eps = default_eps(dg, 0.05)
    Hi = torch.linalg.inv(_dense_damped(obj, dg, J, eps, structure))
    D = DampedFisher(dg, eps, structure)
    diag = obj.space.flatten(D.inverse_diagonal())
    torch.testing.assert_close(diag, torch.diagonal(Hi), rtol=1e-9, atol=0)
    off = obj.space.offsets()
    for name_q in list(obj.params)[:3]:
        q = off[name_q].stop - off[name_q].start - 1
        col = obj.space.flatten(D.inverse_column(name_q, q))
        torch.testing.assert_close(col, Hi[:, off[name_q].start + q], rtol=1e-9, atol=1e-9 / eps)


@pytest.mark.parametrize("name", ["mlp", "tokens", "conv"])
def test_mc_fisher_columns(name):
    obj, batch = _problem(name)
    dg, J = _dense(obj, batch, "mc")
    assert dg.columns == 2
    eps = default_eps(dg, 0.1)
    Hi = torch.linalg.inv(_dense_damped(obj, dg, J, eps, "global"))
    diag = obj.space.flatten(DampedFisher(dg, eps, "global").inverse_diagonal())
    torch.testing.assert_close(diag, torch.diagonal(Hi), rtol=1e-9, atol=0)


@pytest.mark.parametrize("name", CASES)
def test_param_columns_are_columns_of_jacobian(name):
    obj, batch = _problem(name)
    dg, J = _dense(obj, batch)
    off = obj.space.offsets()
    for b in dg.blocks:
        for p in b.params:
            size = off[p].stop - off[p].start
            lo, hi = size // 3, max(size // 3 + 1, size - 1)
            got = param_columns(b.source, p, lo, hi).reshape(dg.n, -1).double()
            torch.testing.assert_close(got, J[:, off[p].start + lo : off[p].start + hi])


@pytest.mark.parametrize("name", ["mlp", "tokens", "conv", "attention", "tied"])
@pytest.mark.parametrize("structure", ["block", "global"])
def test_multi_weight_removal_is_the_constrained_minimiser(name, structure):
    """δw_Q = -w_Q, H_RR δw_R = -H_RQ δw_Q, and the increase is ½ δwᵀ H δw."""
    obj, batch = _problem(name)
    dg, J = _dense(obj, batch)
    eps = default_eps(dg, 0.05)
    H = _dense_damped(obj, dg, J, eps, structure)
    P = H.shape[0]
    g = torch.Generator().manual_seed(1)
    Q = torch.rand(P, generator=g) < 0.4
    R = ~Q
    w = obj.space.flatten({k: v.detach() for k, v in obj.params.items()})
    D = DampedFisher(dg, eps, structure, removed=obj.space.unflatten(Q))
    delta, increase = D.remove(obj.space.unflatten(w))
    dw = obj.space.flatten(delta)
    ref = torch.zeros(P, dtype=torch.float64)
    ref[Q] = -w[Q]
    ref[R] = torch.linalg.solve(H[R][:, R], H[R][:, Q] @ w[Q])
    torch.testing.assert_close(dw, ref, rtol=1e-8, atol=1e-10 * float(w.abs().max()))
    assert math.isclose(increase, float(0.5 * ref @ H @ ref), rel_tol=1e-9)
    # Schur form: ½ w_Qᵀ ([H⁻¹]_QQ)⁻¹ w_Q
    Hi = torch.linalg.inv(H)
    schur = 0.5 * w[Q] @ torch.linalg.solve(Hi[Q][:, Q], w[Q])
    assert math.isclose(increase, float(schur), rel_tol=1e-8)
    # the constrained inverse diagonal is that of H_RR
    diag_R = obj.space.flatten(D.inverse_diagonal())[R]
    torch.testing.assert_close(
        diag_R, torch.diagonal(torch.linalg.inv(H[R][:, R])), rtol=1e-9, atol=0
    )


@pytest.mark.parametrize("name", ["mlp", "attention"])
def test_without_downdates_like_a_fresh_build(name):
    obj, batch = _problem(name)
    dg, _ = _dense(obj, batch)
    eps = default_eps(dg, 0.05)
    P = obj.space.size
    g = torch.Generator().manual_seed(2)
    first = torch.rand(P, generator=g) < 0.3
    more = first | (torch.rand(P, generator=g) < 0.3)
    D = DampedFisher(dg, eps, "block", removed=obj.space.unflatten(first))
    chained = D.without(obj.space.unflatten(more))
    fresh = DampedFisher(dg, eps, "block", removed=obj.space.unflatten(more))
    for a, b in zip(chained.groups, fresh.groups, strict=True):
        torch.testing.assert_close(a.A, b.A, rtol=1e-12, atol=1e-12 * float(b.A.abs().max()))
    w = obj.space.unflatten(obj.space.flatten({k: v.detach() for k, v in obj.params.items()}))
    d1, i1 = chained.remove(w)
    d2, i2 = fresh.remove(w)
    torch.testing.assert_close(obj.space.flatten(d1), obj.space.flatten(d2))
    assert math.isclose(i1, i2, rel_tol=1e-10)


def test_remaining_kernel_both_sides():
    obj, batch = _problem("mlp")
    dg, J = _dense(obj, batch)
    off = obj.space.offsets()
    b = dg.blocks[0]
    cols = torch.cat([torch.arange(off[p].start, off[p].stop) for p in b.params])
    for share in (0.2, 0.8):  # K - J_Q J_Qᵀ, or the sum over the remaining columns
        g = torch.Generator().manual_seed(4)
        Q = torch.rand(obj.space.size, generator=g) < share
        keep = cols[~Q[cols]]
        K = remaining_kernel(b, obj.space.unflatten(Q))
        torch.testing.assert_close(K, J[:, keep] @ J[:, keep].T, rtol=1e-10, atol=1e-13)


def test_default_eps_is_relative_and_scale_free():
    obj, batch = _problem("mlp")
    dg = capture(obj, batch)
    eps = default_eps(dg, 0.01)
    assert math.isclose(eps, 0.01 * fisher_trace(dg) / dg.n_params, rel_tol=1e-12)
    with pytest.raises(ConfigError):
        default_eps(dg, 0.0)
    with pytest.raises(ConfigError):
        default_eps(dg, float("nan"))
    with pytest.raises(ConfigError):
        DampedFisher(dg, eps, "diagonal")


def test_diagonal_respects_bounds():
    """1/(F_qq + eps) <= [H⁻¹]_qq <= 1/eps."""
    obj, batch = _problem("tokens")
    dg, J = _dense(obj, batch)
    eps = default_eps(dg, 1e-4)
    d = obj.space.flatten(DampedFisher(dg, eps, "global").inverse_diagonal())
    fqq = (J**2).sum(0) / dg.n
    assert bool((d <= 1 / eps * (1 + 1e-12)).all()) and bool(
        (d >= 1 / (fqq + eps) * (1 - 1e-9)).all()
    )
