"""Curvature along a LoRA update against dense float64 oracles.

``J`` (rows ``∇L_n``, ``vmap(grad)``), the dense Hessian (double backward) and the dense GGN
on tiny models: an MLP, a conv net, an attention model with an embedding adapter and a
GPT-2 with a tied-embedding adapter. Checked: ``J dθ`` from the low-rank factor form,
``dθᵀF dθ``, ``dθᵀH dθ``, ``gᵀdθ``, per-parameter parts, the measured loss change against an
independently merged copy of the model, the quadratic model's O(α³) error, GL(r)
invariance of every number, the exact/MC Fisher, and that the model is never modified.
"""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
from lora_fixtures import random_factors, write_peft_adapter
from models import TinyAttention, TinyConv, seeded, tiny_gpt2
from models import mlp as mlp_model
from oracles import dense_ggn, dense_hessian, per_example_grads
from safetensors.torch import save_file
from torch.nn.attention import SDPBackend, sdpa_kernel

from gmcurv.batch import Batch
from gmcurv.capture import Capturer
from gmcurv.errors import ConfigError, GmcurvWarning
from gmcurv.fisher import jvp
from gmcurv.io.adapter import read_adapter
from gmcurv.io.data import load_data
from gmcurv.lora.curvature import along_objective, curvature_along, update_jvp
from gmcurv.lora.mapping import attach, update_direction
from gmcurv.objective import Objective

N = 10
pytestmark = pytest.mark.filterwarnings("ignore::gmcurv.errors.GmcurvWarning")

CASES = {
    "mlp": (["0", "4"], 3),
    "conv": (["c1", "c2", "head"], 2),
    "attention": (["q", "v", "fc.0", "tok"], 2),
    "gpt2": (["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_proj", "transformer.wte"], 2),
}


def _model_and_data(name: str):
    g = torch.Generator().manual_seed(3)
    if name == "mlp":
        model, loss = seeded(mlp_model), "cross_entropy"
        x, y = torch.randn(N, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (N,))
    elif name == "conv":
        model, loss = seeded(TinyConv), "cross_entropy"
        x = torch.randn(N, 2, 4, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (N,), generator=g)
    elif name == "attention":
        model, loss = seeded(TinyAttention), "cross_entropy"
        x, y = torch.randint(0, 7, (N, 5), generator=g), torch.randint(0, 3, (N,), generator=g)
    else:
        model, loss = seeded(tiny_gpt2), "next_token"
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        x = torch.randint(0, 9, (N, 6), generator=g)
        y = x.clone()
    return model, loss, x, y


def _adapter(tmp_path, model, modules, r, seed=0, scale=0.3, name="ad"):
    embeddings = tuple(m for m in modules if m in ("tok", "transformer.wte"))
    factors = random_factors(model, modules, r, seed=seed, scale=scale, dtype=torch.float64)
    path = write_peft_adapter(tmp_path / name, factors, r, 2 * r, embeddings=embeddings)
    return factors, read_adapter(path)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    model, loss, x, y = _model_and_data(name)
    save_file({"inputs": x.contiguous(), "targets": y.contiguous()}, str(tmp / "data.safetensors"))
    data = load_data(tmp / "data.safetensors")
    modules, r = CASES[name]
    factors, ad = _adapter(tmp, model, modules, r)
    ups = attach(ad, model)
    full = Objective.build(model, loss)
    obj = along_objective(full, {"a": ups})
    batch = Batch(x, y, 0)
    with sdpa_kernel([SDPBackend.MATH]):  # differentiable twice, with vmap batching rules
        J = per_example_grads(obj, batch).detach()
        H = dense_hessian(obj, batch).detach()
    v = obj.space.flatten(update_direction(ups, torch.float64))
    before = {k: t.clone() for k, t in model.state_dict().items()}
    res = curvature_along(full, data, {"a": ups}, batch_size=4, scales=(0.5, 1.0))["a"]
    return {
        "name": name, "tmp": tmp, "model": model, "loss": loss, "data": data, "batch": batch,
        "full": full, "obj": obj, "ups": ups, "factors": factors, "ad": ad, "J": J, "H": H,
        "v": v, "res": res, "before": before, "modules": modules, "r": r,
    }  # fmt: skip


def test_low_rank_jvp_equals_dense_jacobian(case):
    obj, batch, ups = case["obj"], case["batch"], case["ups"]
    dg = Capturer(obj)(batch)
    jv, parts = update_jvp(dg, ups)
    ref = case["J"] @ case["v"]
    torch.testing.assert_close(jv[:, 0], ref, rtol=1e-10, atol=1e-12)
    # the generic route (dense ΔW through each block's own J v) agrees
    generic = jvp(dg, update_direction(ups, torch.float64))
    torch.testing.assert_close(generic, jv, rtol=1e-10, atol=1e-12)
    assert sum(parts.values()).sub(jv).abs().max() < 1e-12
    assert float(ref.abs().max()) > 1e-3  # not a vacuous comparison


def test_fisher_hessian_and_first_order_equal_dense(case):
    res, J, H, v = case["res"], case["J"], case["H"], case["v"]
    jv = J @ v
    assert res.fisher_qf.value == pytest.approx(float(jv.pow(2).mean()), rel=1e-10)
    assert res.fisher_qf.stderr is None  # exact on the sample (empirical Fisher)
    se = float(jv.pow(2).std()) / N**0.5
    assert res.fisher_qf.data_stderr == pytest.approx(se, rel=1e-8)
    assert res.hessian_qf.value == pytest.approx(float(v @ H @ v), rel=1e-9)
    assert res.hessian_qf.n_matvecs == 1
    assert res.first_order.value == pytest.approx(float(J.mean(0) @ v), rel=1e-9, abs=1e-14)
    assert res.update_norm.value == pytest.approx(float(v.norm()), rel=1e-12)
    assert res.hessian_rayleigh.value == pytest.approx(float(v @ H @ v) / float(v @ v), rel=1e-9)
    with torch.no_grad():
        loss = float(case["obj"].per_example_loss(case["batch"]).mean())
    assert res.loss.value == pytest.approx(loss, rel=1e-12)
    assert res.fisher_qf.n_samples == N and res.fisher == "empirical"


def test_per_parameter_parts(case):
    res, obj, H, v = case["res"], case["obj"], case["H"], case["v"]
    offsets = obj.space.offsets()
    Hv = H @ v
    total_share = 0.0
    for key, part in res.per_param.items():
        idx = torch.cat([torch.arange(offsets[p].start, offsets[p].stop) for p in key.split(",")])
        vp = torch.zeros_like(v)
        vp[idx] = v[idx]
        jvp_p = case["J"] @ vp
        assert part.fisher_block.value == pytest.approx(float(jvp_p.pow(2).mean()), rel=1e-9)
        assert part.hessian_share.value == pytest.approx(float(vp @ Hv), rel=1e-9, abs=1e-13)
        assert part.first_order.value == pytest.approx(float(jvp_p.mean()), rel=1e-9, abs=1e-14)
        total_share += part.hessian_share.value
    assert total_share == pytest.approx(res.hessian_qf.value, rel=1e-9)
    assert {p for key in res.per_param for p in key.split(",")} == set(obj.params)


def test_measured_change_equals_an_independently_merged_model(case):
    model, batch, res = case["model"], case["batch"], case["res"]
    with torch.no_grad():
        base_loss = case["full"].per_example_loss(batch).mean()
    for point in res.points:
        merged = copy.deepcopy(model)
        params = dict(merged.named_parameters())
        with torch.no_grad():  # PEFT's merge: W += α s B A (transposed for embeddings)
            for module in case["factors"]:
                layer = case["ad"].layers[module]
                B2, A2 = layer.matrices()
                target = next(u for u in case["ups"] if u.module == module)
                delta = layer.scale * (B2 @ A2)
                if layer.kind == "embedding" or target.kind == "matrix":  # Conv1D [in, out]
                    delta = delta.T
                params[target.param].add_(point.scale * delta.reshape(params[target.param].shape))
        obj = Objective.build(merged, case["loss"])
        with torch.no_grad():
            change = float(obj.per_example_loss(batch).mean() - base_loss)
        assert point.measured.value == pytest.approx(change, rel=1e-9, abs=1e-13)
        assert point.predicted.value == pytest.approx(
            point.scale * res.first_order.value + 0.5 * point.scale**2 * res.hessian_qf.value
        )
        assert point.predicted_fisher.value == pytest.approx(
            point.scale * res.first_order.value + 0.5 * point.scale**2 * res.fisher_qf.value
        )
        assert point.measured.data_stderr is not None and point.measured.data_stderr > 0


def test_model_is_never_modified(case):
    after = case["model"].state_dict()
    assert all(torch.equal(case["before"][k], after[k]) for k in after)


def test_every_number_is_invariant_under_gl_r(case):
    """(B, A) -> (B R, R⁻¹ A) with a random invertible R per layer: same results (1e-8)."""
    g = torch.Generator().manual_seed(99)
    transformed = {}
    for module, layer in case["ad"].layers.items():
        B2, A2 = layer.matrices()
        while True:
            R = torch.randn(layer.rank, layer.rank, generator=g, dtype=torch.float64)
            if torch.linalg.cond(R) < 30:
                break
        transformed[module] = (B2 @ R, torch.linalg.solve(R, A2))
    ad2 = case["ad"].with_factors(transformed)
    assert not torch.equal(
        ad2.layers[case["modules"][0]].B, case["ad"].layers[case["modules"][0]].B
    )
    ups2 = attach(ad2, case["model"])
    res2 = curvature_along(
        case["full"], case["data"], {"a": ups2}, batch_size=4, scales=(0.5, 1.0)
    )["a"]

    def numbers(r):
        out = [r.loss, r.update_norm, r.first_order, r.fisher_qf, r.hessian_qf, r.hessian_rayleigh]
        out += [e for p in r.points for e in (p.predicted, p.predicted_fisher, p.measured)]
        out += [e for part in r.per_param.values() for e in (part.fisher_block, part.hessian_share)]
        return [e.value for e in out]

    assert numbers(res2) == pytest.approx(numbers(case["res"]), rel=1e-8, abs=1e-12)


def test_quadratic_model_error_is_third_order(tmp_path):
    """Smooth (tanh) model, float64: measured - predicted = O(α³)."""
    model, loss, x, y = _model_and_data("mlp")
    save_file({"inputs": x, "targets": y}, str(tmp_path / "d.safetensors"))
    data = load_data(tmp_path / "d.safetensors")
    _, ad = _adapter(tmp_path, model, ["0", "2", "4"], 2, scale=1.0)
    ups = attach(ad, model)
    scales = (0.02, 0.01, 0.005)
    res = curvature_along(Objective.build(model, loss), data, {"a": ups}, scales=scales)["a"]
    err = [abs(p.measured.value - p.predicted.value) for p in res.points]
    quad = [abs(p.measured.value - p.scale * res.first_order.value) for p in res.points]
    assert err[0] < 0.05 * quad[0]  # the quadratic term is captured ...
    for a, b in itertools.pairwise(err):
        assert 6.0 < a / b < 10.0  # ... and what is left shrinks like α³


def test_exact_fisher_equals_dense_ggn_and_mc_is_unbiased(tmp_path):
    model, loss, x, y = _model_and_data("mlp")
    save_file({"inputs": x, "targets": y}, str(tmp_path / "d.safetensors"))
    data = load_data(tmp_path / "d.safetensors")
    _, ad = _adapter(tmp_path, model, ["0", "4"], 2, scale=1.0)
    ups = attach(ad, model)
    full = Objective.build(model, loss)
    obj = along_objective(full, {"a": ups})
    v = obj.space.flatten(update_direction(ups, torch.float64))
    G = dense_ggn(obj, Batch(x, y, 0)).detach()
    exact = curvature_along(full, data, {"a": ups}, fisher="exact", scales=(1.0,))["a"]
    assert exact.fisher_qf.value == pytest.approx(float(v @ G @ v), rel=1e-9)
    assert exact.fisher_qf.stderr is None
    draws, ses = [], []
    for seed in range(24):
        mc = curvature_along(
            full, data, {"a": ups}, fisher="mc", mc_samples=3, seed=seed, scales=(1.0,)
        )["a"]
        draws.append(mc.fisher_qf.value)
        ses.append(mc.fisher_qf.stderr)
    d = torch.tensor(draws, dtype=torch.float64)
    spread = float(d.std()) / len(draws) ** 0.5
    assert abs(float(d.mean()) - exact.fisher_qf.value) < 3 * spread
    # calibrated: the reported stderr matches the spread over seeds
    assert 0.5 < float(torch.tensor(ses).mean()) / float(d.std()) < 2.0


def test_several_adapters_share_one_pass(tmp_path):
    model, loss, x, y = _model_and_data("mlp")
    save_file({"inputs": x, "targets": y}, str(tmp_path / "d.safetensors"))
    data = load_data(tmp_path / "d.safetensors")
    full = Objective.build(model, loss)
    ups = {
        "a": attach(_adapter(tmp_path, model, ["0"], 2, seed=1, name="a")[1], model),
        "b": attach(_adapter(tmp_path, model, ["2", "4"], 3, seed=2, name="b")[1], model),
    }
    both = curvature_along(full, data, ups, batch_size=3, scales=(1.0,))
    for name in ups:
        alone = curvature_along(full, data, {name: ups[name]}, batch_size=7, scales=(1.0,))[name]
        for attr in ("fisher_qf", "hessian_qf", "first_order"):
            assert getattr(both[name], attr).value == pytest.approx(
                getattr(alone, attr).value, rel=1e-10
            )
        assert set(both[name].per_param) == {u.param for u in ups[name]}


def test_frozen_parameter_is_refused(tmp_path):
    model, loss, *_ = _model_and_data("mlp")
    _, ad = _adapter(tmp_path, model, ["0"], 2)
    ups = attach(ad, model)
    model[0].weight.requires_grad_(False)
    with pytest.raises(ConfigError, match="not trainable"):
        along_objective(Objective.build(model, loss), {"a": ups})


def test_tied_weight_warning(tmp_path):
    model = tiny_gpt2().double()
    _, ad = _adapter(tmp_path, model, ["lm_head"], 2)
    with pytest.warns(GmcurvWarning, match="lm_head shares its weight"):
        (u,) = attach(ad, model)
    assert u.param == "transformer.wte.weight"  # the tied parameter's one name


def test_no_stray_warnings(tmp_path):
    """The engine detaches what it reports (no 'requires_grad to scalar' warnings)."""
    model, loss, x, y = _model_and_data("mlp")
    save_file({"inputs": x, "targets": y}, str(tmp_path / "d.safetensors"))
    data = load_data(tmp_path / "d.safetensors")
    ups = attach(_adapter(tmp_path, model, ["0", "2"], 2)[1], model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        curvature_along(Objective.build(model, loss), data, {"a": ups}, scales=(1.0,))
    stray = [w for w in caught if not issubclass(w.category, GmcurvWarning | DeprecationWarning)]
    assert not stray, [str(w.message) for w in stray]
