"""GradMetaNet head from the command line, and the shipped head (regression guard)."""

from __future__ import annotations

import json

import jsonschema

from gmcurv.cli.app import app
from gmcurv.gradmetanet.pretrained import load_head
from gmcurv.results import report_schema


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
