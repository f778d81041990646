"""CLI: info, trace (Fisher), check — exit codes, JSON schema, bad input, rendering."""

from __future__ import annotations

import io
import json

import jsonschema
import pytest
import torch
from helpers import write_data, write_mlp
from rich.console import Console
from safetensors.torch import save_file

from gmcurv.cli import trace as trace_cmd
from gmcurv.cli.app import app
from gmcurv.estimate import Estimate
from gmcurv.results import Report, report_schema


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    jsonschema.validate(doc, report_schema())
    return doc


@pytest.fixture
def problem(tmp_path):
    model = write_mlp(tmp_path / "model.safetensors", sizes=(6, 8, 3))
    data = write_data(tmp_path / "data", n=40, shards=2)
    return model, data


def test_trace_json_matches_schema_and_engine(runner, problem):
    model, data = problem
    doc = _json(
        runner.invoke(
            app, ["trace", str(model), str(data), "--json", "--dtype", "float64", "--k", "3"]
        )
    )
    fisher = doc["results"]["fisher"]
    assert doc["command"] == "trace" and doc["data"]["n"] == 40
    assert fisher["type"] == "empirical" and len(fisher["eigenvalues"]) == 3
    per_layer = sum(v["trace"]["value"] for v in fisher["per_layer"].values())
    assert per_layer == pytest.approx(fisher["trace"]["value"], rel=1e-12)
    assert fisher["trace"]["stderr"] is None and fisher["trace"]["data_stderr"] > 0
    assert doc["model"]["n_params"] == 6 * 8 + 8 + 8 * 3 + 3
    assert doc["config"]["sources"]["k"] == "command line"


def test_trace_mc_is_seeded(runner, problem):
    model, data = problem
    args = ["trace", str(model), str(data), "--json", "--fisher", "mc", "--mc-samples", "2"]
    a = _json(runner.invoke(app, [*args, "--seed", "1"]))["results"]["fisher"]["trace"]
    b = _json(runner.invoke(app, [*args, "--seed", "1"]))["results"]["fisher"]["trace"]
    c = _json(runner.invoke(app, [*args, "--seed", "2"]))["results"]["fisher"]["trace"]
    assert a == b and a["value"] != c["value"] and a["stderr"] > 0


def test_fail_if_and_check(runner, problem, tmp_path):
    model, data = problem
    report = tmp_path / "report.json"
    ok = runner.invoke(
        app,
        [
            "trace",
            str(model),
            str(data),
            "-o",
            str(report),
            "-q",
            "--fail-if",
            "fisher.trace > 1e9",
        ],
    )
    assert ok.exit_code == 0, ok.output
    value = json.loads(report.read_text())["results"]["fisher"]["trace"]["value"]
    bad = runner.invoke(
        app, ["trace", str(model), str(data), "-q", "--fail-if", f"fisher.trace > {value / 2}"]
    )
    assert bad.exit_code == 1 and "FAIL" in bad.stderr
    assert runner.invoke(app, ["check", str(report), f"fisher.trace > {value / 2}"]).exit_code == 1
    assert (
        runner.invoke(
            app, ["check", str(report), "fisher.trace < 0", "fisher.eigenvalues[0] > 1e12"]
        ).exit_code
        == 0
    )
    missing = runner.invoke(app, ["check", str(report), "nope.trace > 1"])
    assert missing.exit_code == 2 and "not in the report" in missing.stderr


def test_info(runner, problem):
    model, _ = problem
    doc = _json(runner.invoke(app, ["info", str(model), "--json"]))
    layers = doc["results"]["layers"]
    assert [layer["name"] for layer in layers] == ["net.0", "net.2"]
    assert all(layer["kind"] == "linear" for layer in layers)
    human = runner.invoke(app, ["info", str(model)])
    assert human.exit_code == 0 and "mlp:tanh" in human.stdout


def test_bundled_sample_runs_without_arguments(runner):
    result = runner.invoke(app, ["trace", "--k", "2", "--samples", "128"])
    assert result.exit_code == 0, result.output
    assert "Fisher (empirical)" in result.stdout and "net.4" in result.stdout


def _bad_inputs(tmp_path):
    model = write_mlp(tmp_path / "model.safetensors", sizes=(6, 8, 3))
    data = write_data(tmp_path / "data.safetensors", n=10)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(model.read_bytes()[:-30])
    nan = tmp_path / "nan.safetensors"
    x = torch.randn(4, 6)
    x[1, 2] = float("inf")
    save_file({"inputs": x, "targets": torch.zeros(4, dtype=torch.long)}, str(nan))
    labels = tmp_path / "labels.safetensors"
    save_file({"inputs": torch.randn(4, 6), "targets": torch.tensor([0, 1, 2, 3])}, str(labels))
    wrong = tmp_path / "wrong.safetensors"
    save_file(
        {"inputs": torch.randn(4, 5), "targets": torch.zeros(4, dtype=torch.long)}, str(wrong)
    )
    (tmp_path / "empty").mkdir()
    pkl = tmp_path / "data.pkl"
    pkl.write_bytes(b"\x80\x04K\x01.")
    factory = tmp_path / "arch.py"
    factory.write_text(
        "from torch import nn\n"
        "def build():\n    return nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3))\n"
    )
    return {
        "truncated checkpoint": (["trace", str(cut), str(data)], "truncated"),
        "NaN data": (["trace", str(model), str(nan)], "NaN or Inf"),
        "labels out of range": (["trace", str(model), str(labels)], "labels range"),
        "wrong input shape": (["trace", str(model), str(wrong)], "cannot take these inputs"),
        "empty directory": (["trace", str(model), str(tmp_path / "empty")], "no data files"),
        "pickle data": (["trace", str(model), str(pkl)], "pickle"),
        "unknown arch": (
            ["trace", str(model), str(data), "--arch", "resnet9000"],
            "unknown architecture",
        ),
        "wrong keys": (["info", str(model), "--arch", f"{factory}:build"], "missing keys"),
        "bad --fail-if": (
            ["trace", str(model), str(data), "--fail-if", "fisher.trace >> 3"],
            "cannot parse rule",
        ),
        "output over input": (["trace", str(model), str(data), "-o", str(data)], "refusing"),
        "missing model": (["trace", str(tmp_path / "nope.safetensors"), str(data)], "no such file"),
    }


def test_bad_input_exits_2_with_one_clear_message(runner, tmp_path):
    cases = _bad_inputs(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for name, (args, message) in cases.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (name, result.output)
        assert "Traceback" not in result.output, name
        assert "error:" in result.stderr, (name, result.stderr)
        if message:
            assert message in result.stderr, (name, result.stderr)
    after = {p: p.read_bytes() for p in before}
    assert after == before  # inputs byte-identical afterwards


def test_rich_table_snapshot():
    """The trace table renders the same into a fixed-width console."""
    est = Estimate(2.5, None, 100, "exact", data_stderr=0.25)
    layer = {
        "trace": est,
        "n_params": 650,
        "kind": "linear",
        "eigenvalues": [Estimate(0.75, None, 100, "gram")],
    }
    report = Report(
        "trace",
        {},
        0,
        "cpu",
        "float32",
        None,
        None,
        {
            "loss": Estimate(0.5, None, 100, "mean"),
            "fisher": {
                "type": "empirical",
                "n_params": 650,
                "trace": est,
                "rank": 99,
                "eigenvalues": [Estimate(0.75, None, 100, "gram")],
                "per_layer": {"net.4": layer},
            },
        },
        timings={"fisher": 0.5},
    )
    buf = io.StringIO()
    trace_cmd.render(report, Console(file=buf, width=90, color_system=None, legacy_windows=False))
    text = "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"
    expected = (
        "gmcurv trace\n"
        "mean loss 0.5\n"
        "Fisher (empirical): trace 2.5\n"
        "┏━━━━━━━┳━━━━━━━━┳━━━━━━━━┳━━━━━━━┳━━━━━━━━┳━━━━━━━┓\n"
        "┃ layer ┃   kind ┃ params ┃ trace ┃  share ┃ λ_max ┃\n"
        "┡━━━━━━━╇━━━━━━━━╇━━━━━━━━╇━━━━━━━╇━━━━━━━━╇━━━━━━━┩\n"
        "│ net.4 │ linear │    650 │   2.5 │ 100.0% │  0.75 │\n"
        "└───────┴────────┴────────┴───────┴────────┴───────┘\n"
        "top-1 eigenvalues (gram, rank 99): 0.75\n"
        "N=100, method exact; sampling s.e. of the trace over examples ±0.25\n"
    )
    assert text.startswith(expected), text


@pytest.mark.parametrize(
    "args", [["eigen", "--k", "0"], ["trace", "--bogus"], ["trace", "--fisher", "nope"]]
)
def test_usage_errors_exit_2(runner, args):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "internal error" not in result.output


def test_config_file_and_environment_precedence(runner, problem, tmp_path, monkeypatch):
    model, data = problem
    monkeypatch.delenv("GMCURV_NO_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gmcurv.toml").write_text("batch-size = 7\nk = 2\n[trace]\nk = 3\n")
    doc = _json(runner.invoke(app, ["trace", str(model), str(data), "--json"]))
    assert doc["config"]["batch_size"] == 7 and doc["config"]["k"] == 3
    assert doc["config"]["sources"]["k"] == "config file"
    assert len(doc["results"]["fisher"]["eigenvalues"]) == 3
    monkeypatch.setenv("GMCURV_K", "1")
    doc = _json(runner.invoke(app, ["trace", str(model), str(data), "--json"]))
    assert doc["config"]["k"] == 1 and doc["config"]["sources"]["k"] == "environment"
    doc = _json(runner.invoke(app, ["trace", str(model), str(data), "--json", "--k", "2"]))
    assert doc["config"]["k"] == 2 and doc["config"]["sources"]["k"] == "command line"
