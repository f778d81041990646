"""Head v2's λ_max correction (`gmcurv.gradmetanet.ttop`): the cross-validated fit keeps
corrections that carry over across groups and drops those that do not; features are the
same from a captured set and from a cached training item; the CLI runs it on transformers'
GPT-2 / Llama checkpoints (learned and both) and still refuses the trace."""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings

import pytest
import torch
from safetensors.torch import save_file

from gmcurv.batch import Batch
from gmcurv.gradmetanet import ttop
from gmcurv.gradmetanet.tfeatures import extract, is_transformer
from gmcurv.gradmetanet.tlayers import HeadV2Input
from gmcurv.gradmetanet.tlm import make_task
from gmcurv.gradmetanet.ttrain import Item, item_top_features, load_top_correction
from gmcurv.io.data import load_data
from gmcurv.objective import Objective
from tests.test_gradmetanet_v2 import B, T, V, _model

F = len(ttop.FEATURES)


def _planted(noise: float, signal: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    groups = [f"task{k}" for k in range(5) for _ in range(30)]
    phi = torch.randn(len(groups), F, generator=g, dtype=torch.float64)
    y = signal * phi[:, 0] - 0.3 + noise * torch.randn(len(groups), generator=g).double()
    return phi.tolist(), y.tolist(), groups


def test_fit_keeps_a_correction_that_carries_over_across_groups():
    phi, y, groups = _planted(0.05, 0.8)
    c = ttop.fit_top_correction(phi, y, groups)
    assert c.shrink >= 0.9 and c.cv_error < 0.1 < c.cv_error_plugin
    pred = [c.log_ratio(p) for p in phi]
    assert max(abs(a - b) for a, b in zip(pred, y, strict=True)) < 0.35
    lo, hi = c.interval
    inside = sum(lo <= b - a <= hi for a, b in zip(pred, y, strict=True)) / len(y)
    assert lo < 0 < hi and 0.7 <= inside <= 0.95


def test_fit_shrinks_a_correction_that_does_not_carry_over():
    """Each group has its own offset and the features say nothing about it: the
    out-of-fold CV switches the correction (almost) off."""
    g = torch.Generator().manual_seed(3)
    groups = [f"task{k}" for k in range(5) for _ in range(30)]
    offsets = {f"task{k}": o for k, o in enumerate((-1.0, 1.0, -0.8, 0.9, 0.0))}
    phi = torch.randn(len(groups), F, generator=g, dtype=torch.float64).tolist()
    y = [offsets[k] + 0.01 * float(torch.randn(1, generator=g)) for k in groups]
    c = ttop.fit_top_correction(phi, y, groups)
    assert c.shrink <= 0.3
    assert c.cv_error <= c.cv_error_plugin + 1e-12  # α = 0 (the plug-in) is on the grid


def test_fit_needs_two_groups_and_round_trips_through_json():
    phi, y, groups = _planted(0.1, 0.5)
    with pytest.raises(ValueError, match="two groups"):
        ttop.fit_top_correction(phi, y, ["one"] * len(y))
    c = ttop.fit_top_correction(phi, y, groups, trained_on={"b": 16})
    back = ttop.TopCorrection.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back == c
    lam, lo, hi = back.predict(2.0, phi[0])
    assert lam == pytest.approx(2.0 * math.exp(c.log_ratio(phi[0])), rel=1e-14)
    assert lo < lam < hi
    bad = {**c.to_dict(), "features": ["other"]}
    with pytest.raises(ValueError, match="other features"):
        ttop.TopCorrection.from_dict(bad)


def test_features_of_a_set_equal_those_of_its_cached_item():
    model = _model()
    assert is_transformer(model)
    ids, _ = make_task("count", B, T, seed=0)
    s = extract(Objective.build(model, "next_token"), Batch(ids % V, None, 0))
    inp = HeadV2Input.from_tset(s)
    it = Item("g", "train", "tiny", "count", 0, 0, 100, inp, 1.0, 0.0, 1.0)
    phi = ttop.tset_features(s)
    assert len(phi) == F and all(math.isfinite(v) for v in phi)
    assert item_top_features(it) == pytest.approx(phi, rel=1e-12, abs=1e-12)
    assert phi[1] == pytest.approx(math.log(s.seq_top / s.plug_top), rel=1e-12)


def test_shipped_correction_loads_and_predicts_with_out_of_range_flags(tmp_path):
    corr, heldout = load_top_correction()
    assert heldout["all-test"]["sets"] > 0 and 0 <= corr.shrink <= 1
    model = _model()
    ids, _ = make_task("count", 20, T, seed=0)
    save_file({"inputs": (ids % V).contiguous()}, str(tmp_path / "d.safetensors"))
    obj = Objective.build(model, "next_token")
    tp = ttop.predict_top(obj, load_data(tmp_path / "d.safetensors"), corr, seed=1)
    assert tp.b == 16 and tp.n == 20 and tp.tokens == T - 1
    assert tp.interval[0] < tp.value < tp.interval[1] and tp.plugin_seq > 0
    # T = 6 tokens here, the zoo used 32: flagged, not silently trusted
    assert any(w == "predicted tokens per sequence" for w, _, _ in tp.out_of_range)


def _hf_dir(family: str, tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    if family == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=V, n_positions=T, n_embd=8, n_layer=1, n_head=2, bos_token_id=0,
            eos_token_id=0,
        )  # fmt: skip
        model = tf.GPT2LMHeadModel(cfg)
    else:
        cfg = tf.LlamaConfig(
            vocab_size=V, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=T,
        )  # fmt: skip
        model = tf.LlamaForCausalLM(cfg)
    with contextlib.redirect_stderr(io.StringIO()):
        model.save_pretrained(str(tmp_path / family))
    ids, _ = make_task("count", 24, T, seed=2)
    (tmp_path / "data").mkdir()
    save_file({"input_ids": (ids % V).contiguous()}, str(tmp_path / "data" / "d.safetensors"))
    return tmp_path / family, tmp_path / "data"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cli_eigen_learned_and_both_on_transformers(runner, tmp_path, family):
    from gmcurv.cli.app import app

    model, data = _hf_dir(family, tmp_path)
    base = ["eigen", str(model), str(data), "--curvature", "hessian", "--json", "-q"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = runner.invoke(app, [*base, "--method", "learned"])
        assert r.exit_code == 0, r.output
        doc = json.loads(r.stdout)["results"]
        top = doc["hessian"]["eigenvalues"][0]
        assert top["method"] == "learned-v2" and top["interval"][0] < top["value"]
        assert doc["learned"]["rows"][0]["plug_in"] > 0
        assert "predicted tokens per sequence" in doc["learned"]["rows"][0]["out_of_range"]
        r = runner.invoke(app, [*base, "--method", "both", "-k", "1"])
        assert r.exit_code == 0, r.output
        row = json.loads(r.stdout)["results"]["learned"]["comparison"][0]
        assert row["exact_in_interval"] in (True, False) and row["relative_error"] >= 0
        human = runner.invoke(app, [*base[:-2], "--method", "learned"])
        assert human.exit_code == 0 and "head v2" in human.output
        r = runner.invoke(
            app, ["trace", str(model), str(data), "--method", "learned", "-q", "--json"]
        )
    assert r.exit_code == 2 and "head v2" in r.output


def test_conformal_interval_is_the_finite_sample_order_statistic():
    r = torch.arange(1, 10, dtype=torch.float64)  # n = 9: ⌊0.1·10⌋ = 1st, ⌈0.9·10⌉ = 9th
    assert ttop.conformal_interval(r, 0.8) == (1.0, 9.0)
    r = torch.arange(1, 100, dtype=torch.float64)  # n = 99: 10th and 90th
    assert ttop.conformal_interval(r, 0.8) == (10.0, 90.0)


def test_nested_calibration_covers_new_groups_at_the_level():
    """Exchangeable groups: the whole fit (inner CV, shrink, quantiles) redone without each
    group covers about 80 % of that group's sets; the loss bins give each bin its own
    quantiles (wider where the noise is larger)."""
    g = torch.Generator().manual_seed(5)
    groups = [f"task{k}" for k in range(8) for _ in range(40)]
    phi = torch.randn(len(groups), F, generator=g, dtype=torch.float64)
    noise = 0.1 + 0.4 * (phi[:, ttop.BIN_FEATURE] > 0.5).double()
    y = 0.5 * phi[:, 0] + noise * torch.randn(len(groups), generator=g, dtype=torch.float64)
    for cal in ttop.CALIBRATIONS:
        s = ttop.nested_calibration(phi.tolist(), y.tolist(), groups, calibration=cal)
        assert 0.72 <= s.coverage <= 0.88 and s.error < 0.3 and set(s.per_group) == set(groups)
    c = ttop.fit_top_correction(phi.tolist(), y.tolist(), groups, calibration="loss-bins")
    assert len(c.bin_edges) == 2 and len(c.bin_intervals) == 3
    quiet, loud = list(phi[0]), list(phi[0])
    quiet[ttop.BIN_FEATURE], loud[ttop.BIN_FEATURE] = -2.0, 2.0
    w = lambda p: c.log_interval(p)[1] - c.log_interval(p)[0]  # noqa: E731
    assert w(loud) > 2 * w(quiet)
    back = ttop.TopCorrection.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back.log_interval(loud) == pytest.approx(c.log_interval(loud))
    with pytest.raises(ValueError, match="calibration"):
        ttop.fit_top_correction(phi.tolist(), y.tolist(), groups, calibration="other")


def test_clip_clamps_features_to_the_training_range():
    phi, y, groups = _planted(0.05, 0.8)
    c = ttop.fit_top_correction(phi, y, groups, clip=True)
    far = list(phi[0])
    far[0] = 1e6
    edge = list(phi[0])
    edge[0] = max(p[0] for p in phi)
    assert c.log_ratio(far) == pytest.approx(c.log_ratio(edge), rel=1e-12)
    assert ttop.TopCorrection.from_dict(json.loads(json.dumps(c.to_dict()))) == c


@pytest.mark.parametrize("n", [5, 9, 20, 37])
def test_conformal_coverage_is_the_exact_finite_sample_coverage(n):
    """A new residual exchangeable with ``n`` others falls in the conformal interval with
    probability ``(k_hi - k_lo) / (n + 1)``: Monte Carlo agrees within 4 standard errors,
    and the coverage is >= the level once ``n >= 9`` (too few residuals: below it)."""
    reps = 6000
    g = torch.Generator().manual_seed(n)
    x = torch.randn(reps, n + 1, generator=g, dtype=torch.float64)
    k_lo, k_hi = ttop.conformal_ranks(n, 0.8)
    ref = x[:, :n].sort(1).values
    inside = (ref[:, k_lo - 1] <= x[:, n]) & (x[:, n] <= ref[:, k_hi - 1])
    p = ttop.conformal_coverage(n, 0.8)
    assert abs(float(inside.double().mean()) - p) < 4 * math.sqrt(p * (1 - p) / reps)
    assert (p >= 0.8 - 1e-12) == (n >= 9)
    assert ttop.conformal_interval(x[0, :n], 0.8) == (float(ref[0, k_lo - 1]),
                                                     float(ref[0, k_hi - 1]))  # fmt: skip
    with pytest.raises(ValueError, match="at least one"):
        ttop.conformal_ranks(0, 0.8)


def _heteroscedastic(n_groups: int, per: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    groups = [f"task{k}" for k in range(n_groups) for _ in range(per)]
    phi = torch.randn(len(groups), F, generator=g, dtype=torch.float64)
    v = phi[:, ttop.BIN_FEATURE]
    noise = torch.where(v < -0.43, 0.05, torch.where(v > 0.43, 0.6, 0.2)).double()
    y = -0.3 + noise * torch.randn(len(groups), generator=g, dtype=torch.float64)
    return phi.tolist(), y.tolist(), groups


def test_loss_bins_cover_every_bin_where_the_pooled_interval_does_not():
    """Residual spread that depends on the loss feature (three tertiles): per-bin
    (Mondrian) conformal quantiles cover ~80 % of fresh sets in every bin; the pooled
    quantiles over-cover the quiet bin and under-cover the loud one."""
    phi, y, groups = _heteroscedastic(6, 60, 1)
    new_phi, new_y, _ = _heteroscedastic(6, 200, 2)
    cover: dict[str, list[list[float]]] = {}
    for cal in ttop.CALIBRATIONS:
        c = ttop.fit_top_correction(phi, y, groups, calibration=cal)
        per = [[], [], []]
        for p, t in zip(new_phi, new_y, strict=True):
            r = t - c.log_ratio(p)
            lo, hi = c.log_interval(p)
            per[(p[ttop.BIN_FEATURE] > -0.43) + (p[ttop.BIN_FEATURE] > 0.43)].append(lo <= r <= hi)
        cover[cal] = [sum(b) / len(b) for b in per]
    assert all(0.72 <= v <= 0.88 for v in cover["loss-bins"])
    quiet, _, loud = cover["global"]
    assert quiet > 0.95 and loud < 0.7


def test_huber_fit_resists_a_one_sided_tail():
    """Most residuals at -0.3, a sixth far below: least squares moves the intercept into
    the tail, Huber's loss keeps it near the bulk; the flag round-trips through JSON."""
    g = torch.Generator().manual_seed(4)
    X = torch.randn(300, F, generator=g, dtype=torch.float64)
    y = -0.3 + 0.05 * torch.randn(300, generator=g, dtype=torch.float64)
    y[::6] -= 3.0
    *_, c_ls = ttop._ridge(X, y, 1.0)
    *_, c_hub = ttop._ridge(X, y, 1.0, robust=True)
    assert c_ls < -0.7 and -0.45 < c_hub < -0.25
    groups = [f"t{k % 5}" for k in range(300)]
    c = ttop.fit_top_correction(X.tolist(), y.tolist(), groups, robust=True)
    assert c.robust and ttop.TopCorrection.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def _hf_model(family: str, model_type: str | None = None):
    import transformers as tf

    torch.manual_seed(0)
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=V, n_positions=T, n_embd=8, n_layer=1, n_head=2)
        model = tf.GPT2LMHeadModel(cfg)
    elif family == "llama":
        cfg = tf.LlamaConfig(
            vocab_size=V, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=T,
        )  # fmt: skip
        model = tf.LlamaForCausalLM(cfg)
    else:  # Qwen2: Llama-shaped (RMSNorm, gated MLP, q/k/v/o_proj), another model type
        cfg = tf.Qwen2Config(
            vocab_size=V, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=T,
        )  # fmt: skip
        model = tf.Qwen2ForCausalLM(cfg)
    if model_type is not None:
        model.config.model_type = model_type
    return model


def test_model_family_is_read_from_structure_and_config():
    """TinyLM, GPT-2 (Conv1D + LayerNorm) and Llama (RMSNorm + gated MLP) are recognised;
    a Llama-shaped Qwen2, a structure whose config names another type and an MLP are not
    (None: an unknown family, never a guess); the zoo's own builders give their family."""
    from gmcurv.gradmetanet import tzoo
    from gmcurv.gradmetanet.tfeatures import model_family

    assert model_family(_model()) == "tiny"
    assert model_family(_hf_model("gpt2")) == "gpt2"
    assert model_family(_hf_model("llama")) == "llama"
    assert model_family(_hf_model("qwen2")) is None
    assert model_family(_hf_model("gpt2", model_type="llama")) is None
    assert model_family(_hf_model("llama", model_type="mistral")) is None
    assert model_family(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))) is None
    for fam in ("gpt2", "llama"):
        spec = tzoo.LMGroupSpec("g", "copy", 1, 32, 2, 0, 1e-3, (0,), "train", 4, fam)
        assert model_family(tzoo.hf_model(spec, 16)) == fam


def _families(seed: int, per: int = 30):
    """Three families with their own offsets (tiny 0, gpt2 +0.8, llama -0.6) and noise
    (0.05, 0.4, 0.15), one planted slope on φ_0; tasks cross the families."""
    g = torch.Generator().manual_seed(seed)
    off = {"tiny": 0.0, "gpt2": 0.8, "llama": -0.6}
    sd = {"tiny": 0.05, "gpt2": 0.4, "llama": 0.15}
    fam = [f for f in ("tiny", "gpt2", "llama") for _ in range(4 * per)]
    groups = [f"task{k % 4}" for k in range(len(fam))]
    phi = torch.randn(len(fam), F, generator=g, dtype=torch.float64)
    noise = torch.randn(len(fam), generator=g, dtype=torch.float64)
    y = [
        0.5 * float(p[0]) + off[f] + sd[f] * float(e)
        for p, f, e in zip(phi, fam, noise, strict=True)
    ]
    return phi.tolist(), y, groups, fam


def test_family_term_learns_each_family_offset_and_falls_back_for_an_unknown_one():
    phi, y, groups, fam = _families(0)
    plain = ttop.fit_top_correction(phi, y, groups, family=fam)
    c = ttop.fit_top_correction(phi, y, groups, family=fam, family_term=True)
    assert c.families == ["tiny", "gpt2", "llama"] and len(c.weights) == F + 2
    assert c.cv_error < 0.6 * plain.cv_error  # the offsets carry over across tasks
    x = [0.0] * F
    for f, o in (("tiny", 0.0), ("gpt2", 0.8), ("llama", -0.6)):
        assert c.log_ratio(x, f) == pytest.approx(o, abs=0.15)
    # unknown family: indicators at their training means (z = 0), i.e. the average offset
    unknown = c.log_ratio(x, None)
    assert unknown == pytest.approx(c.log_ratio(x, "mistral"))
    z = [(p - m) / s for p, m, s in zip(x, c.mean[:F], c.scale[:F], strict=True)]
    avg = c.shrink * (c.intercept + sum(w * v for w, v in zip(c.weights[:F], z, strict=True)))
    assert unknown == pytest.approx(avg)
    assert c.knows("gpt2") and not c.knows(None) and not c.knows("mistral")
    assert plain.knows(None) and plain.log_ratio(x, "gpt2") == plain.log_ratio(x)
    back = ttop.TopCorrection.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back == c and back.log_ratio(x, "llama") == c.log_ratio(x, "llama")
    with pytest.raises(ValueError, match="family"):
        ttop.fit_top_correction(phi, y, groups, family_term=True)
    with pytest.raises(ValueError, match="among"):
        ttop.fit_top_correction(phi, y, groups, family=["opt"] * len(y), family_term=True)


def test_family_bins_give_each_family_its_own_interval():
    """Mondrian conformal per family covers ~80 % of fresh sets of every family; the pooled
    interval over-covers the quiet family and under-covers the loud one; an unknown family
    gets the pooled interval."""
    phi, y, groups, fam = _families(1)
    new_phi, new_y, _, new_fam = _families(2, per=100)
    cover = {}
    for cal in ("global", "family-bins"):
        c = ttop.fit_top_correction(phi, y, groups, calibration=cal, family=fam, family_term=True)
        per: dict[str, list[bool]] = {}
        for p, t, f in zip(new_phi, new_y, new_fam, strict=True):
            lo, hi = c.log_interval(p, f)
            per.setdefault(f, []).append(lo <= t - c.log_ratio(p, f) <= hi)
        cover[cal] = {f: sum(v) / len(v) for f, v in per.items()}
    assert all(0.7 <= v <= 0.9 for v in cover["family-bins"].values())
    assert cover["global"]["tiny"] > 0.95 and cover["global"]["gpt2"] < 0.7
    assert set(c.family_intervals) == {"tiny", "gpt2", "llama"}
    assert c.log_interval(phi[0], None) == c.interval == c.log_interval(phi[0], "opt")
    back = ttop.TopCorrection.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back.log_interval(phi[0], "gpt2") == pytest.approx(c.log_interval(phi[0], "gpt2"))
    with pytest.raises(ValueError, match="family"):
        ttop.fit_top_correction(phi, y, groups, calibration="family-bins")


def test_nested_folds_hold_out_only_the_named_groups():
    phi, y, groups, fam = _families(3, per=10)
    gid = [f"{f}-{k % 3}" for k, f in enumerate(fam)]
    folds = {g for g in gid if not g.startswith("tiny")}
    s = ttop.nested_calibration(
        phi, y, groups, outer=gid, family=fam, family_term=True, folds=folds
    )
    assert set(s.per_group) == folds
    assert {fam[i] for i in s.per_set} == {"gpt2", "llama"} and len(s.per_set) == 80


def test_predict_flags_a_family_the_correction_never_saw(tmp_path):
    """A correction with a family term on a TinyLM (a family it knows) is not flagged;
    fitted on GPT-2 / Llama only, the same TinyLM is flagged, with the fallback named."""
    phi, y, groups, fam = _families(4, per=10)
    model = _model()
    ids, _ = make_task("count", 20, T, seed=0)
    save_file({"inputs": (ids % V).contiguous()}, str(tmp_path / "d.safetensors"))
    obj = Objective.build(model, "next_token")
    data = load_data(tmp_path / "d.safetensors")
    c = ttop.fit_top_correction(phi, y, groups, family=fam, family_term=True,
                                calibration="family-bins", trained_on={"b": 16})  # fmt: skip
    tp = ttop.predict_top(obj, data, c, seed=1)
    assert tp.family == "tiny" and not any("family" in w for w, _, _ in tp.out_of_range)
    keep = [i for i, f in enumerate(fam) if f != "tiny"]
    c2 = ttop.fit_top_correction(
        [phi[i] for i in keep], [y[i] for i in keep], [groups[i] for i in keep],
        family=[fam[i] for i in keep], family_term=True, calibration="family-bins",
        trained_on={"b": 16},
    )  # fmt: skip
    tp2 = ttop.predict_top(obj, data, c2, seed=1)
    flag = [w for w, v, _ in tp2.out_of_range if "family" in w]
    assert flag and "tiny" in flag[0] and "gpt2, llama" in flag[0] and "pooled" in flag[0]
    assert tp2.interval[0] < tp2.value < tp2.interval[1]


def test_shipped_correction_flags_a_transformer_of_another_family(tmp_path):
    """A Llama-shaped Qwen2 saved by `transformers` runs, with its family flagged."""
    from gmcurv.io.checkpoint import load_model

    model = _hf_model("qwen2")
    with contextlib.redirect_stderr(io.StringIO()):
        model.save_pretrained(str(tmp_path / "q"))
    ids, _ = make_task("count", 20, T, seed=0)
    save_file({"input_ids": (ids % V).contiguous()}, str(tmp_path / "d.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = load_model(tmp_path / "q", dtype=torch.float64)
    corr, _ = load_top_correction()
    tp = ttop.predict_top(
        Objective.build(lm.model, lm.loss), load_data(tmp_path / "d.safetensors"), corr
    )
    flag = [w for w, v, _ in tp.out_of_range if w.startswith("model family")]
    assert tp.family is None and flag and "unknown" in flag[0] and "gpt2" in flag[0]
    assert tp.interval[0] < tp.value < tp.interval[1]
