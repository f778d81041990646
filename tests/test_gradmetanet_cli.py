"""GradMetaNet head from the command line, and the shipped head (regression guard)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from gmcurv.cli.app import app
from gmcurv.gradmetanet.pretrained import load_head
from gmcurv.results import report_schema
from tests.helpers import write_data, write_mlp


def _ok(result, code=0):
    assert result.exit_code == code, result.output
    return result


def _json(result):
    doc = json.loads(result.stdout)
    jsonschema.validate(doc, report_schema())
    return doc


def test_head_zoo_train_eval_info_on_a_tiny_zoo(runner, tmp_path):
    cache = tmp_path / "zoo"
    zoo = _json(
        _ok(
            runner.invoke(
                app, ["head", "zoo", "--size", "tiny", "--cache-dir", str(cache), "--json"]
            )
        )
    )
    assert zoo["results"]["splits"]["train"] == {"runs": 2, "models": 4}
    head = tmp_path / "h.safetensors"
    args = [
        "head",
        "train",
        "--cache-dir",
        str(cache),
        "--epochs",
        "3",
        "--max-steps",
        "2",
        "--save",
        str(head),
        "--json",
    ]
    trained = _json(_ok(runner.invoke(app, args)))
    assert trained["results"]["steps"] == 2 and head.exists()
    assert "gmcurv head train --epochs 3" in trained["results"]["commands"][1]
    ev = _json(
        _ok(
            runner.invoke(
                app,
                [
                    "head",
                    "eval",
                    "--cache-dir",
                    str(cache),
                    "--head",
                    str(head),
                    "--record",
                    "--json",
                ],
            )
        )
    )
    fd = ev["results"]["all"]["fisher_diag.nmae"]
    assert fd["n_draws"] == 12 and fd["head"] > 0 and fd["plug"] > 0
    assert load_head(head).meta["metrics"]["all"]["fisher_diag.nmae"]["n_draws"] == 12
    iv = ev["results"]["intervals"]  # fitted on val, coverage measured on the other splits
    assert iv["source"].startswith("zoo split 'val'") and iv["level"] == 0.8
    cov = iv["coverage"]["all"]["hessian_trace"]
    assert cov["n"] == 12 and 0.0 <= cov["coverage"] <= 1.0
    assert load_head(head).calibration is not None
    info = _json(_ok(runner.invoke(app, ["head", "info", "--head", str(head), "--json"])))
    assert info["results"]["metadata"]["supported"]["activations"] == ["tanh"]
    human = _ok(runner.invoke(app, ["head", "info", "--head", str(head)]))
    assert "gmcurv head zoo --size tiny" in human.stdout


def test_head_errors_exit_2(runner, tmp_path):
    r = runner.invoke(app, ["head", "eval", "--cache-dir", str(tmp_path)])
    assert r.exit_code == 2 and "no model zoo" in r.output
    r = runner.invoke(app, ["head", "info", "--head", str(tmp_path / "missing.safetensors")])
    assert r.exit_code == 2 and "no GradMetaNet head" in r.output
    r = runner.invoke(app, ["head", "train", "--cache-dir", str(tmp_path), "--save", "x.pt"])
    assert r.exit_code == 2 and ".safetensors" in r.output


# ------------------------------------------------------------------ --method learned | both
@pytest.fixture
def problem(tmp_path):
    model = write_mlp(tmp_path / "m.safetensors", sizes=(6, 8, 3), activation="tanh")
    data = write_data(tmp_path / "d.safetensors", n=160, d=6, classes=3)
    return model, data


def test_trace_learned_and_both(runner, problem):
    model, data = problem
    base = ["trace", str(model), str(data), "--json"]
    doc = _json(_ok(runner.invoke(app, [*base, "--method", "learned", "--curvature", "all"])))
    res = doc["results"]
    assert res["learned"]["b"] == 128 and "learned" in res["fisher"]["trace"]["method"]
    assert res["fisher"]["trace"]["value"] > 0 and res["fisher"]["trace"]["n_samples"] == 128
    assert res["hessian"]["eigenvalues"][0]["value"] > 0 and "ggn" not in res
    both = _json(_ok(runner.invoke(app, [*base, "--method", "both", "--curvature", "hessian"])))
    rows = both["results"]["learned"]["comparison"]
    assert [r["quantity"] for r in rows] == ["Hessian trace", "Hessian λ_max"]
    exact = both["results"]["hessian"]["trace"]["value"]
    assert rows[0]["exact"]["value"] == exact
    assert rows[0]["relative_error"] == pytest.approx(
        abs(rows[0]["learned"]["value"] - exact) / exact
    )
    human = _ok(runner.invoke(app, ["trace", str(model), str(data), "--method", "learned"]))
    assert "GradMetaNet head" in human.stdout and "b=128" in human.stdout
    rule = ["--method", "learned", "--fail-if", "fisher.trace > 1e9"]
    _ok(runner.invoke(app, ["trace", str(model), str(data), *rule]))


def test_eigen_learned_and_both(runner, problem):
    model, data = problem
    base = ["eigen", str(model), str(data), "--json"]
    res = _json(_ok(runner.invoke(app, [*base, "--method", "learned"])))["results"]
    assert len(res["hessian"]["eigenvalues"]) == 1 and res["hessian"]["n_matvecs"] == 0
    both = _json(_ok(runner.invoke(app, [*base, "--method", "both", "--k", "2"])))["results"]
    row = both["learned"]["comparison"][0]
    assert row["exact"]["value"] == both["hessian"]["eigenvalues"][0]["value"]


def test_learned_refuses_what_the_head_does_not_know(runner, problem, tmp_path):
    model, data = problem
    cases = [
        ["trace", str(model), str(data), "--method", "learned", "--curvature", "ggn"],
        ["trace", str(model), str(data), "--method", "learned", "--fisher", "mc"],
        ["eigen", str(model), str(data), "--method", "learned", "--curvature", "fisher"],
        ["trace", str(model), str(data), "--method", "learned", "--layers", "net.0"],
    ]
    for args in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
    other = write_mlp(tmp_path / "s.safetensors", sizes=(6, 8, 3), activation="softplus")
    r = runner.invoke(app, ["trace", str(other), str(data), "--method", "learned"])
    assert r.exit_code == 2 and "--method exact" in r.output and "softplus" in r.output
