"""Issue 14: the head's calibrated intervals, the exact engine beside it, out-of-range flags,
and learned pruning (head saliencies + the exact OBS update)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from gmcurv.cli.app import app
from gmcurv.cli.render import fmt_estimate
from gmcurv.estimate import Estimate
from gmcurv.gradmetanet import calibration as cal
from gmcurv.gradmetanet.baselines import same_set_baselines
from gmcurv.gradmetanet.features import check_supported, plug_in
from gmcurv.gradmetanet.pretrained import HEAD_FILE, load_head, read_head_metadata, save_head
from gmcurv.objective import Objective
from gmcurv.results import estimate_schema, to_jsonable
from tests.helpers import write_data, write_mlp
from tests.oracles import dense_ggn, dense_hessian
from tests.test_gradmetanet import _batch, _data_file, _mlp


# ---------------------------------------------------------------------------- calibration
def _samples(n: int, seed: int, sizes=(100, 1000, 10000)) -> list[cal.Sample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = sizes[i % len(sizes)]
        spread = {100: 0.2, 1000: 0.5, 10000: 1.0}[p]  # error grows with the size
        out.append(cal.Sample("hessian_trace", p, rng.gauss(0.1, spread)))
    return out


def test_quantile_matches_torch():
    v = [random.Random(1).random() for _ in range(37)]
    for q in (0.0, 0.1, 0.5, 0.9, 1.0):
        want = float(torch.quantile(torch.tensor(v, dtype=torch.float64), q))
        assert cal.quantile(v, q) == pytest.approx(want, rel=1e-12)


def test_calibration_covers_its_level_on_fresh_draws_and_per_bin():
    fitted = cal.fit(_samples(3000, seed=0))
    assert len(fitted.edges) == 2 and fitted.counts["hessian_trace"] == [1000, 1000, 1000]
    lo_small, hi_small = fitted.bounds("hessian_trace", 100)
    lo_big, hi_big = fitted.bounds("hessian_trace", 10000)
    assert hi_big - lo_big > 3 * (hi_small - lo_small)  # per-bin widths differ
    cover = cal.coverage(fitted, _samples(3000, seed=1))["hessian_trace"]
    assert cover["n"] == 3000 and 0.77 <= cover["coverage"] <= 0.83
    for share in cover["by_bin"]:
        assert 0.75 <= share <= 0.85
    # the interval of a prediction p holds the truth t exactly when q_lo <= ln(p/t) <= q_hi
    p = 7.0
    lo, hi = fitted.interval("hessian_trace", p, 1000)
    q_lo, q_hi = fitted.bounds("hessian_trace", 1000)
    assert lo == pytest.approx(p * math.exp(-q_hi)) and hi == pytest.approx(p * math.exp(-q_lo))
    assert fitted.interval("hessian_trace", -1.0, 1000) is None
    assert fitted.interval("nope", 1.0, 1000) is None
    again = cal.Calibration.from_dict(json.loads(json.dumps(fitted.to_dict())))
    assert again.interval("hessian_trace", p, 1000) == pytest.approx((lo, hi))


def test_small_bins_fall_back_to_pooled_quantiles():
    samples = _samples(300, 0, sizes=(100,)) + [cal.Sample("hessian_trace", 10**6, 5.0)] * 3
    fitted = cal.fit(samples, sizes=[100, 100, 10**6])
    assert fitted.quantiles["hessian_trace"][-1] is None
    assert fitted.bounds("hessian_trace", 10**6) == fitted.pooled["hessian_trace"]


# ------------------------------------------------------------------------- the estimate
def test_interval_estimates_are_not_exact_and_validate():
    import jsonschema

    e = Estimate(3.0, None, 128, "learned", True, interval=(2.0, 4.5), interval_level=0.8)
    assert not e.exact and Estimate(3.0, None, 1, "x").exact
    jsonschema.validate(to_jsonable(e), estimate_schema())
    text = fmt_estimate(to_jsonable(e))
    assert text.startswith("3 [2, 4.5]") and "±" not in text
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**to_jsonable(e), "interval": [1.0]}, estimate_schema())


# ---------------------------------------------------------------- the exact engine beside
def test_same_set_baselines_match_dense_oracles():
    model = _mlp(widths=(5,), act="tanh", seed=3)
    obj = Objective.build(model, "cross_entropy")
    batch = _batch(n=10, seed=4)
    from gmcurv.capture import Capturer

    dg = Capturer(obj, "empirical")(batch)
    chain = check_supported(obj)
    base = same_set_baselines(obj, batch, chain, plug_in(dg, chain))
    G, H = dense_ggn(obj, batch), dense_hessian(obj, batch)
    assert base.ggn_trace == pytest.approx(float(G.trace()), rel=1e-9)
    assert base.ggn_top == pytest.approx(float(torch.linalg.eigvalsh(G)[-1]), rel=1e-8)
    assert base.hessian_trace == pytest.approx(float(H.trace()), rel=1e-9)
    assert base.b == 10 and base.fisher_trace > 0


# ----------------------------------------------------------------- a calibrated test head
@pytest.fixture
def calibrated_head(tmp_path):
    """The shipped head's weights with a known calibration and narrow training ranges."""
    shipped = load_head()
    meta = json.loads(json.dumps(read_head_metadata(HEAD_FILE)))
    fitted = cal.fit(
        [cal.Sample(t, p, r) for t in ("fisher_trace", "hessian_trace", "hessian_top")
         for p in (50, 500) for r in (-0.3, -0.1, 0.0, 0.1, 0.4) * 10],
        source="test",
    )  # fmt: skip
    meta["metrics"]["intervals"] = fitted.to_dict()
    meta["metrics"]["ranges"] = {"loss": [0.0, 50.0]}
    meta["supported"]["trained_widths"] = [8, 16]
    path = tmp_path / "head.safetensors"
    save_head(path, shipped.model, meta)
    return path, fitted


def test_predict_curvature_reports_calibrated_intervals(tmp_path, calibrated_head):
    from gmcurv.gradmetanet.predict import predict_curvature

    path, fitted = calibrated_head
    head = load_head(path)
    obj = Objective.build(_mlp(widths=(12,), seed=23), "cross_entropy")
    lc = predict_curvature(obj, _data_file(tmp_path, n=200, d=5), b=64, seed=0, head=head)
    n_params = sum(p.numel() for p in obj.params.values())
    for key in ("fisher_trace", "hessian_trace", "hessian_top"):
        e = getattr(lc, key)
        assert e.stderr is None and not e.exact and e.interval_level == pytest.approx(0.8)
        assert e.interval == pytest.approx(fitted.interval(key, e.value, n_params))
        assert e.interval[0] < e.value < e.interval[1]
    assert lc.out_of_range == ()  # width 12 within 8-16, loss within 0-50
    assert lc.same_set is not None and lc.same_set.b == 64
    wide = Objective.build(_mlp(widths=(40,), seed=23), "cross_entropy")
    with pytest.warns(UserWarning, match="hidden width 40"):
        lc2 = predict_curvature(wide, _data_file(tmp_path, n=200, d=5), b=64, head=head)
    assert [f.what for f in lc2.out_of_range] == ["width"]


def test_uncalibrated_head_gives_no_interval_and_says_so(tmp_path):
    from gmcurv.gradmetanet.predict import predict_curvature

    meta = json.loads(json.dumps(read_head_metadata(HEAD_FILE)))
    meta["metrics"].pop("intervals", None)
    path = tmp_path / "raw.safetensors"
    save_head(path, load_head().model, meta)
    obj = Objective.build(_mlp(widths=(12,), seed=23), "cross_entropy")
    lc = predict_curvature(obj, _data_file(tmp_path, n=200), b=64, head=load_head(path))
    assert lc.hessian_trace.interval is None and lc.hessian_trace.converged is False
    assert lc.hessian_trace.method.endswith("uncalibrated")


# ------------------------------------------------------------------------------- the CLI
@pytest.fixture
def problem(tmp_path):
    model = write_mlp(tmp_path / "m.safetensors", sizes=(6, 12, 3), activation="tanh")
    data = write_data(tmp_path / "d.safetensors", n=200, d=6, classes=3)
    return model, data


def test_trace_learned_prints_interval_and_the_engine_beside_it(
    runner, problem, calibrated_head, monkeypatch
):
    path, _ = calibrated_head
    monkeypatch.setenv("GMCURV_HEAD", str(path))
    model, data = problem
    args = ["trace", str(model), str(data), "--method", "learned", "--curvature", "all"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    out = r.stdout
    for col in ("head [lo, hi]", "plug-in F", "GGN", "Hessian", "range"):
        assert col in out
    assert "nominal 80 % interval" in out and "coverage" in out and "±" not in out
    assert r.output.count("answered by the pretrained GradMetaNet head") == 1
    doc = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    rows = doc["results"]["learned"]["rows"]
    assert [x["quantity"] for x in rows] == [
        "Fisher trace (empirical)",
        "Hessian trace",
        "Hessian λ_max",
    ]
    h = rows[1]
    assert h["learned"]["stderr"] is None and len(h["learned"]["interval"]) == 2
    assert h["ggn"] > 0 and h["hessian_same_set"] is not None and h["plug_in"] > 0
    assert doc["results"]["fisher"]["trace"]["interval"] is not None


def test_out_of_range_is_flagged_in_the_table(runner, tmp_path, calibrated_head, monkeypatch):
    path, _ = calibrated_head
    monkeypatch.setenv("GMCURV_HEAD", str(path))
    model = write_mlp(tmp_path / "w.safetensors", sizes=(6, 48, 3), activation="tanh")
    data = write_data(tmp_path / "d.safetensors", n=200, d=6, classes=3)
    r = runner.invoke(app, ["trace", str(model), str(data), "--method", "learned"])
    assert r.exit_code == 0, r.output
    assert "out: width" in r.stdout and "hidden width 48 (head trained on 8-16)" in r.stdout
    both = runner.invoke(app, ["eigen", str(model), str(data), "--method", "both", "--json"])
    row = json.loads(both.stdout)["results"]["learned"]["comparison"][0]
    assert row["out_of_range"] == ["width"] and row["exact_in_interval"] in (True, False)


def test_method_auto_never_runs_the_head(runner, problem, monkeypatch):
    import gmcurv.gradmetanet.predict as predict

    def boom(*a, **k):
        raise AssertionError("auto ran the head")

    monkeypatch.setattr(predict, "predict_curvature", boom)
    model, data = problem
    for cmd in (["trace"], ["eigen"], ["saliency"]):
        r = runner.invoke(app, [*cmd, str(model), str(data), "--json"])
        assert r.exit_code == 0, r.output


# ------------------------------------------------------------------------ learned pruning
def test_prune_with_a_ranker_equal_to_exact_obs_reproduces_exact_obs(tmp_path):
    from gmcurv.saliency import curvature_at, prune_model, saliencies

    data = _data_file(tmp_path, n=40, d=5)
    obj = Objective.build(_mlp(widths=(6,), seed=8), "cross_entropy")

    def ranker(weights, r, removed):
        curv = curvature_at(obj, data, {"inverse"}, seed=r - 1, removed=removed)
        names = [k for k in obj.params if k.endswith("weight")]
        return saliencies("obs", weights, names, curv)[0]

    a = prune_model(obj, data, 0.5, rounds=3)
    b = prune_model(obj, data, 0.5, rounds=3, ranker=ranker, ranker_name="same")
    assert b.criterion == "same" and a.n_removed == b.n_removed
    for k in a.masks:
        assert torch.equal(a.masks[k], b.masks[k])
        torch.testing.assert_close(a.weights[k], b.weights[k])


def test_saliency_prune_method_learned(runner, problem, tmp_path):
    model, data = problem
    out = tmp_path / "p.safetensors"
    args = ["saliency", str(model), str(data), "--method", "learned", "--prune", "0.5"]
    r = runner.invoke(
        app, [*args, "--save-pruned", str(out), "--rounds", "2", "-o", str(tmp_path / "r.json")]
    )
    assert r.exit_code == 0, r.output
    assert out.exists() and "Pruned" in r.stdout and "learned obs" in r.stdout
    doc = json.loads((tmp_path / "r.json").read_text())
    res = doc["results"]
    assert res["prune"]["criterion"].startswith("learned obs") and res["prune"]["update"]
    assert res["prune"]["n_removed"] == round(0.5 * res["prune"]["n_prunable"])
    sweep = res["learned"]["sweep"]
    assert {"obd", "obs", "obs+update", "exact obs+update", "magnitude"} <= set(sweep)
    bad = runner.invoke(app, [*args, "--criterion", "obd"])
    assert bad.exit_code == 2 and "--criterion obs" in bad.output


# ------------------------------------------------------------------------------ the card
def _ec(head_mean, base_mean, win):
    est = {
        "head": {"mean": head_mean, "median": head_mean, "head_win_rate": math.nan, "n": 9},
        "ggn_eq": {"mean": base_mean, "median": base_mean, "head_win_rate": win, "n": 9},
    }
    return {"estimators": est, "interval_coverage": None}


def test_card_verdicts_and_generated_section():
    from gmcurv.gradmetanet.card import END, START, measured_section, update_card, verdicts

    ec = {
        "summary": {
            "test-arch": {"hessian_trace": _ec(0.3, 0.2, 0.4), "fisher_diag": _ec(0.1, 0.2, 0.8)}
        },
        "n_models": {"test-arch": 9},
        "load": 3.0,
    }
    v = verdicts(ec)
    assert v["hessian_trace"]["test-arch"] == {"wins": False, "beaten_by": ["ggn_eq"]}
    assert v["fisher_diag"]["test-arch"]["wins"]
    fitted = cal.fit([cal.Sample("hessian_trace", 10, r / 10) for r in range(-30, 31)])
    meta = {"metrics": {"equal_cost": ec, "intervals": fitted.to_dict()}}
    text = measured_section(meta)
    assert "| Hessian trace | test-arch | no (not better than ggn_eq) |" in text
    card = update_card(f"intro\n{START}\nold\n{END}\nrest", meta)
    assert "old" not in card and card.startswith("intro") and card.endswith("rest")


def test_card_and_head_info_cite_no_unshipped_files(runner):
    """The cards ship with the package (sample_models/): they cite no repository-only file
    (bench/, tests/, docs/, scripts/ or a gmcurv/ path) except under an explicit "in the
    gmcurv source repository"; `head info` names the installed head and card, which exist."""
    import re

    from gmcurv.gradmetanet.pretrained import CARD_FILE, HEAD_FILE
    from gmcurv.io.samples import SAMPLE_ROOT

    repo_path = re.compile(r"(?<![\w./~-])(bench|tests|docs|gmcurv)/")  # a relative path
    cards = sorted(SAMPLE_ROOT.rglob("*.md"))
    assert CARD_FILE in cards and len(cards) >= 3
    for card in cards:
        for line in card.read_text().splitlines():
            assert not repo_path.search(line), (card, line)
            if re.search(r"\bscripts/", line):
                assert "source repository" in line, (card, line)
    r = runner.invoke(app, ["head", "info", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)["results"]
    assert Path(res["card_file"]) == CARD_FILE and Path(res["path"]) == HEAD_FILE
    assert CARD_FILE.is_file() and HEAD_FILE.is_file() and res["card"] == CARD_FILE.read_text()
    r = runner.invoke(app, ["head", "info"])
    assert (
        r.exit_code == 0 and f"card: {CARD_FILE}" in r.stdout and f"head: {HEAD_FILE}" in r.stdout
    )
    text = r.stdout.replace(str(CARD_FILE), "").replace(str(HEAD_FILE), "")
    assert not repo_path.search(text)
