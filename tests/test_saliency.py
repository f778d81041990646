"""Saliency criteria and OBS pruning against dense float64 oracles and exact quadratic models."""

from __future__ import annotations

import math

import pytest
import torch
from oracles import per_example_grads
from safetensors.torch import save_file
from test_capture import _problem
from torch import nn

from gmcurv.capture import capture
from gmcurv.errors import ConfigError
from gmcurv.io.checkpoint import load_model
from gmcurv.io.data import load_data
from gmcurv.io.samples import sample_data, sample_model
from gmcurv.objective import Objective
from gmcurv.pruning import evaluate
from gmcurv.saliency import (
    Curvature,
    curvature_at,
    layer_statistics,
    prune_model,
    saliencies,
    saliency_analysis,
)
from gmcurv.woodbury import DampedFisher, default_eps


def _to_file(tmp_path, batch, name="data.safetensors"):
    path = tmp_path / name
    save_file({"inputs": batch.inputs.contiguous(), "targets": batch.targets.contiguous()}, path)
    return load_data(path)


def _dense_parts(obj, batch, eps, structure="block"):
    J = per_example_grads(obj, batch)
    F = J.T @ J / len(batch)
    if structure == "block":
        dg = capture(obj, batch)
        off = obj.space.offsets()
        Fb = torch.zeros_like(F)
        for b in dg.blocks:
            cols = torch.cat([torch.arange(off[p].start, off[p].stop) for p in b.params])
            Fb[cols[:, None], cols] = F[cols[:, None], cols]
        F_used = Fb
    else:
        F_used = F
    return F, F_used + eps * torch.eye(F.shape[0], dtype=F.dtype)


@pytest.mark.parametrize("name", ["mlp", "tokens", "conv"])
def test_obd_obs_saliencies_and_rankings_match_dense(tmp_path, name):
    obj, batch = _problem(name)
    data = _to_file(tmp_path, batch)
    curv = curvature_at(obj, data, {"fisher_diag", "inverse"}, damping=0.05)
    F, H = _dense_parts(obj, batch, curv.eps)
    w = obj.space.flatten({k: v.detach() for k, v in obj.params.items()}).double()
    names = list(obj.params)
    obd, se = saliencies("obd", obj.params, names, curv)
    obs, _ = saliencies("obs", obj.params, names, curv)
    mag, _ = saliencies("magnitude", obj.params, names, curv)
    assert se is None
    ref_obd = 0.5 * torch.diagonal(F) * w**2
    ref_obs = w**2 / (2 * torch.diagonal(torch.linalg.inv(H)))
    torch.testing.assert_close(obj.space.flatten(obd), ref_obd, rtol=1e-9, atol=1e-300)
    torch.testing.assert_close(obj.space.flatten(obs), ref_obs, rtol=1e-9, atol=1e-300)
    torch.testing.assert_close(obj.space.flatten(mag), w.abs())
    for got, ref in ((obs, ref_obs), (obd, ref_obd)):
        assert torch.equal(
            torch.argsort(obj.space.flatten(got), stable=True), torch.argsort(ref, stable=True)
        )
    # OBS ranks differently from magnitude (else the test would prove little)
    assert not torch.equal(torch.argsort(ref_obs), torch.argsort(w.abs()))


@pytest.mark.parametrize("name", ["mlp", "tokens", "attention"])
def test_single_weight_obs_update_equals_dense_formula(name):
    obj, batch = _problem(name)
    dg = capture(obj, batch)
    eps = default_eps(dg, 0.05)
    _, H = _dense_parts(obj, batch, eps)
    Hi = torch.linalg.inv(H)
    w = obj.space.flatten({k: v.detach() for k, v in obj.params.items()}).double()
    off = obj.space.offsets()
    pname = next(k for k, v in obj.params.items() if v.ndim >= 2)
    q_local = 3
    q = off[pname].start + q_local
    ref = -(w[q] / Hi[q, q]) * Hi[:, q]  # Hassibi & Stork: dw = -(w_q/[H⁻¹]_qq) H⁻¹ e_q
    removed = {pname: torch.zeros_like(obj.params[pname], dtype=torch.bool)}
    removed[pname].view(-1)[q_local] = True
    D = DampedFisher(dg, eps, "block", removed=removed)
    delta, increase = D.remove(obj.space.unflatten(w))
    torch.testing.assert_close(obj.space.flatten(delta), ref, rtol=1e-9, atol=1e-12)
    # the same update from the Woodbury column H⁻¹ e_q and the diagonal
    D0 = DampedFisher(dg, eps, "block")
    col = obj.space.flatten(D0.inverse_column(pname, q_local))
    dq = D0.inverse_diagonal()[pname].view(-1)[q_local]
    torch.testing.assert_close(-(w[q] / dq) * col, ref, rtol=1e-9, atol=1e-12)
    # predicted loss change = OBS saliency = ½ dwᵀ H dw (the quadratic model)
    sal = 0.5 * w[q] ** 2 / Hi[q, q]
    assert math.isclose(increase, float(sal), rel_tol=1e-9)
    assert math.isclose(increase, float(0.5 * ref @ H @ ref), rel_tol=1e-9)


def _least_squares_problem(seed=0, n=24, d=5, e=2):
    """A linear model fitted exactly under MSE: the loss is its own quadratic model."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, e, generator=g, dtype=torch.float64)
    model = nn.Linear(d, e).double()
    X = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(X, y).solution  # [d+1, e]
    with torch.no_grad():
        model.weight.copy_(sol[:-1].T)
        model.bias.copy_(sol[-1])
    return Objective.build(model, "mse"), x, y


def test_obs_prediction_is_the_actual_loss_change_of_a_quadratic_loss(tmp_path):
    """Linear model + MSE at its least-squares optimum: exact Fisher = GGN = Hessian, so the
    OBS update's predicted increase minus the damping term is the true loss increase."""
    obj, x, y = _least_squares_problem()
    path = tmp_path / "ls.safetensors"
    save_file({"inputs": x, "targets": y}, path)
    data = load_data(path)
    base = evaluate(obj, data).loss.value
    for removed_idx in ([7], [0, 3, 8]):
        curv = curvature_at(
            obj, data, {"inverse"}, fisher="exact", damping=1e-9, structure="global"
        )
        mask = {"weight": torch.zeros(2, 5, dtype=torch.bool)}
        mask["weight"].view(-1)[removed_idx] = True
        delta, pred = curv.inverse.without(mask).remove(obj.params)
        new = {k: v.detach() + delta[k] for k, v in obj.params.items()}
        assert bool((new["weight"][mask["weight"]] == 0).all())
        actual = evaluate(obj, data, params=new).loss.value - base
        damping_term = 0.5 * curv.eps * sum(float(d.pow(2).sum()) for d in delta.values())
        assert actual > 0
        assert math.isclose(actual, pred - damping_term, rel_tol=1e-6)


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("fraction", [0.0, 0.33, 0.5, 0.9])
def test_prune_model_removes_exactly_round_fraction(tmp_path, scope, fraction):
    obj, batch = _problem("mlp")
    data = _to_file(tmp_path, batch)
    before = {k: v.detach().clone() for k, v in obj.params.items()}
    res = prune_model(obj, data, fraction, scope=scope, rounds=2, damping=0.05)
    n_prunable = sum(v.numel() for v in obj.params.values() if v.ndim >= 2)
    assert res.n_prunable == n_prunable
    assert (
        res.n_removed
        == round(fraction * n_prunable)
        == sum(int(m.sum()) for m in res.masks.values())
    )
    assert set(res.masks) == {k for k, v in obj.params.items() if v.ndim >= 2}
    for k, m in res.masks.items():
        assert bool((res.weights[k][m] == 0).all())
        if scope == "layer":
            n = m.numel()
            assert math.floor(fraction * n) <= int(m.sum()) <= math.ceil(fraction * n)
    for k, v in obj.params.items():  # the objective is restored
        assert torch.equal(v.detach(), before[k])
    assert res.update and res.rounds == 2 and len(res.eps) == 2


def test_obs_update_lowers_the_loss_on_the_sample_model():
    loaded = load_model(sample_model(), dtype=torch.float32)
    obj = Objective.build(loaded.model, loaded.loss)
    data = load_data(sample_data(), samples=256)
    test = load_data(sample_data().parent / "test")
    kw = {"eval_data": test, "damping": 1e-2}
    plain = prune_model(obj, data, 0.8, update=False, **kw)
    once = prune_model(obj, data, 0.8, update=True, rounds=1, **kw)
    iterated = prune_model(obj, data, 0.8, update=True, rounds=3, **kw)
    assert plain.before.loss.value == once.before.loss.value
    assert once.after.loss.value < 0.8 * plain.after.loss.value
    assert iterated.after.loss.value < plain.after.loss.value
    assert once.after.accuracy.value > plain.after.accuracy.value
    assert plain.predicted_increase is not None and not plain.update


def test_existing_masks_stay_pruned(tmp_path):
    obj, batch = _problem("mlp")
    data = _to_file(tmp_path, batch)
    first = prune_model(obj, data, 0.3, damping=0.05)
    keep = {k: ~m for k, m in first.masks.items()}
    with torch.no_grad():
        for k, p in obj.params.items():
            p.copy_(first.weights[k])
    second = prune_model(obj, data, 0.6, masks=keep, damping=0.05)
    assert second.n_already_pruned == first.n_removed
    for k, m in first.masks.items():
        assert bool(second.masks[k][m].all())
    with pytest.raises(ConfigError, match="already"):
        prune_model(obj, data, 0.1, masks=keep)


def test_analysis_sweep_and_statistics(tmp_path):
    obj, batch = _problem("tokens")
    data = _to_file(tmp_path, batch)
    a = saliency_analysis(obj, data, levels=[0.0, 0.5], damping=0.05)
    assert set(a.sweep) == {"magnitude", "obd", "obs", "obs+update"}
    for points in a.sweep.values():
        assert points[0].n_removed == 0 and points[0].loss.value == a.baseline.loss.value
        assert points[1].n_removed == round(0.5 * a.n_prunable)
    assert a.sweep["obs+update"][1].loss.value < a.sweep["obs"][1].loss.value
    assert set(a.layers) == {"inp.weight", "mix.weight", "head.weight"}  # no bias, no norm
    st = a.layers["mix.weight"].stats["obs"]
    assert st["min"].value <= st["median"].value <= st["max"].value and st["mean"].stderr is None


def test_layer_statistics_quantiles_and_stderr():
    v = torch.arange(101, dtype=torch.float64).flip(0)
    st = layer_statistics(v, "x")
    assert st["min"].value == 0 and st["max"].value == 100 and st["median"].value == 50
    assert st["p05"].value == 5 and st["p95"].value == 95 and st["mean"].value == 50
    se = torch.full_like(v, 2.0)
    st = layer_statistics(v, "x", se)
    assert math.isclose(st["mean"].stderr, 2.0 / math.sqrt(101)) and st["p25"].stderr == 2.0


def test_unknown_criterion_and_bad_damping(tmp_path):
    obj, batch = _problem("mlp")
    data = _to_file(tmp_path, batch)
    with pytest.raises(ConfigError):
        prune_model(obj, data, 0.5, criterion="random")
    with pytest.raises(ConfigError):
        prune_model(obj, data, 0.5, damping=-1.0)
    with pytest.raises(ConfigError):
        prune_model(obj, data, 1.0)


def test_obd_hessian_matches_dense_diagonal(tmp_path):
    pytest.importorskip("gmcurv.stochastic")
    from oracles import dense_hessian

    obj, batch = _problem("mlp")
    data = _to_file(tmp_path, batch)
    curv = curvature_at(obj, data, {"hessian"}, probes=120, seed=0)
    names = list(obj.params)
    sal, se = saliencies("obd-hessian", obj.params, names, curv)
    w = obj.space.flatten({k: v.detach() for k, v in obj.params.items()}).double()
    ref = 0.5 * torch.diagonal(dense_hessian(obj, batch)) * w**2
    got, err = obj.space.flatten(sal), obj.space.flatten(se)
    z = (got - ref).abs() / err.clamp_min(1e-300)
    assert float((z < 4).double().mean()) > 0.97


def test_curvature_bundle_defaults():
    c = Curvature()
    assert c.dg is None and c.inverse is None and c.probes == 0
