"""``gmcurv saliency``: report schema, --prune checkpoints, exit codes, plots."""

from __future__ import annotations

import io
import json

import jsonschema
import pytest
import torch
from helpers import write_data, write_mlp
from rich.console import Console
from safetensors.torch import load_file

from gmcurv.cli import saliency as saliency_cmd
from gmcurv.cli.app import app
from gmcurv.io.checkpoint import load_model
from gmcurv.io.fileio import sha256_file
from gmcurv.io.masks import masks_path
from gmcurv.io.tensors import MASK_PREFIX
from gmcurv.results import Report, report_schema


@pytest.fixture
def problem(tmp_path):
    model = write_mlp(tmp_path / "model.safetensors", sizes=(6, 10, 8, 3))
    data = write_data(tmp_path / "data", n=48, shards=2)
    return model, data


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    jsonschema.validate(doc, report_schema())
    return doc


N_PRUNABLE = 6 * 10 + 10 * 8 + 8 * 3


def test_report_json_has_criteria_eps_convention_and_curves(runner, problem):
    model, data = problem
    doc = _json(
        runner.invoke(app, ["saliency", str(model), str(data), "--json", "--levels", "0.2,0.6"])
    )
    res = doc["results"]
    assert doc["command"] == "saliency"
    assert res["fisher"]["type"] == "empirical" and res["damping"]["eps"] > 0
    assert "½" in res["convention"] and res["damping"]["relative"] == 0.01
    assert res["n_prunable"] == N_PRUNABLE and set(res["layers"]) == {
        "net.0.weight",
        "net.2.weight",
        "net.4.weight",
    }
    for info in res["layers"].values():
        assert set(info["saliency"]) == {"magnitude", "obd", "obs"}
        assert info["saliency"]["obs"]["median"]["stderr"] is None
    assert set(res["sweep"]) == {"magnitude", "obd", "obs", "obs+update"}
    for points in res["sweep"].values():
        assert [p["fraction"] for p in points] == [0.2, 0.6]
        assert [p["n_removed"] for p in points] == [
            round(0.2 * N_PRUNABLE),
            round(0.6 * N_PRUNABLE),
        ]
        assert 0 <= points[-1]["accuracy"]["value"] <= 1


@pytest.mark.parametrize(
    ("fraction", "extra"),
    [
        ("0.5", []),
        ("0.3", ["--criterion", "magnitude", "--scope", "layer"]),
        ("0.7", ["--criterion", "obd", "--update", "--rounds", "2", "--structure", "global"]),
    ],
)
def test_prune_writes_exact_reloadable_checkpoint(runner, problem, tmp_path, fraction, extra):
    model, data = problem
    digest = sha256_file(model)
    out = tmp_path / "pruned.safetensors"
    args = [
        "saliency",
        str(model),
        str(data),
        "--prune",
        fraction,
        "--save-pruned",
        str(out),
        "--json",
    ]
    doc = _json(runner.invoke(app, [*args, *extra]))
    assert sha256_file(model) == digest  # the input is never touched
    pr = doc["results"]["prune"]
    expected = round(float(fraction) * N_PRUNABLE)
    assert pr["n_removed"] == expected and pr["n_prunable"] == N_PRUNABLE
    assert pr["checkpoint"]["path"] == str(out) and pr["checkpoint"]["sha256"] == sha256_file(out)
    raw = load_file(str(out))  # plain safetensors, only the model's entries
    masks = load_file(str(masks_path(out)))  # keep-masks in the sidecar
    assert not [k for k in raw if k.startswith(MASK_PREFIX)]
    assert set(masks) == {"net.0.weight", "net.2.weight", "net.4.weight"}
    assert sum(int((~m).sum()) for m in masks.values()) == expected
    for k, m in masks.items():
        assert bool((raw[k][~m] == 0).all())
        assert m.shape == raw[k].shape
    reloaded = load_model(out)
    assert reloaded.arch == "mlp:tanh" and set(reloaded.masks) == set(masks)
    assert json.loads(reloaded.metadata["gmcurv.pruning"])["n_removed"] == expected
    # every gmcurv command reads it
    info = runner.invoke(app, ["info", str(out), "--json"])
    assert info.exit_code == 0, info.output
    again = _json(
        runner.invoke(app, ["saliency", str(out), str(data), "--json", "--levels", "0.9"])
    )
    assert again["results"]["n_already_pruned"] == expected


def test_default_output_name_derives_from_input(runner, problem, tmp_path):
    model, data = problem
    r = runner.invoke(app, ["saliency", str(model), str(data), "--prune", "0.25", "-q"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "model.pruned-25.safetensors"
    assert out.is_file() and "model.pruned-25.safetensors" in r.stdout


def test_prune_reports_before_and_after(runner, problem, tmp_path):
    model, data = problem
    out = tmp_path / "p.safetensors"
    r = runner.invoke(
        app,
        [
            "saliency",
            str(model),
            str(data),
            "--prune",
            "0.6",
            "--save-pruned",
            str(out),
            "--eval-data",
            str(data),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "before" in r.stdout and "after" in r.stdout and "Pruned 98 of 164" in r.stdout


@pytest.mark.parametrize("bad", ["-0.1", "1", "1.5", "nan", "inf"])
def test_bad_fractions_exit_2(runner, problem, bad, tmp_path):
    model, data = problem
    r = runner.invoke(app, ["saliency", str(model), str(data), f"--prune={bad}"])
    assert r.exit_code == 2, r.output
    assert not list(tmp_path.glob("*.pruned-*"))


@pytest.mark.parametrize(
    "args",
    [
        ["-o", "x.safetensors"],  # -o is the report: the message points at --save-pruned
        ["--save-pruned", "x.safetensors"],  # a checkpoint needs --prune
        ["--prune", "0.5", "--save-pruned", "x.pt"],  # the pruned checkpoint is .safetensors
        ["-o", "x.json", "--report", "y.json"],  # the report once (--report: old name of -o)
        ["--levels", "0.5,abc"],
        ["--levels", "1.2"],
        ["--damping", "0"],
        ["--criterion", "random"],
        ["--plot", "x.gif"],
        ["--prune", "0.5", "--rounds", "0"],
    ],
)
def test_bad_options_exit_2(runner, problem, args):
    model, data = problem
    r = runner.invoke(app, ["saliency", str(model), str(data), *args])
    assert r.exit_code == 2, r.output


def test_output_may_not_overwrite_input(runner, problem):
    model, data = problem
    digest = sha256_file(model)
    args = ["saliency", str(model), str(data), "--prune", "0.5", "--save-pruned", str(model)]
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "overwrite" in r.output
    assert sha256_file(model) == digest


def test_o_is_the_report_and_save_pruned_the_checkpoint(runner, problem, tmp_path):
    """-o/--output is the JSON report, as in every command; the pruned checkpoint has its own
    option --save-pruned (default <model>.pruned-<percent>.safetensors beside the model)."""
    model, data = problem
    wrong = tmp_path / "p.safetensors"
    r = runner.invoke(app, ["saliency", str(model), str(data), "--prune", "0.5", "-o", str(wrong)])
    assert r.exit_code == 2 and f"--save-pruned {wrong}" in r.output and not wrong.exists()
    assert "Traceback" not in r.output
    rep = tmp_path / "r.json"
    args = ["saliency", str(model), str(data), "--levels", "0.5", "--prune", "0.5", "--rounds", "1"]
    r = runner.invoke(app, [*args, "-q", "-o", str(rep)])
    assert r.exit_code == 0, r.output
    doc = json.loads(rep.read_text())
    jsonschema.validate(doc, report_schema())
    default = tmp_path / "model.pruned-50.safetensors"
    assert doc["results"]["prune"]["checkpoint"]["path"] == str(default) and default.exists()


def test_report_is_a_hidden_deprecated_alias_of_o(runner, problem, tmp_path):
    model, data = problem
    old = tmp_path / "old.json"
    r = runner.invoke(app, ["saliency", str(model), str(data), "--levels", "0.5", "--report", old])
    assert r.exit_code == 0, r.output
    assert "--report is deprecated" in r.stderr and json.loads(old.read_text())["results"]
    assert "--report" not in runner.invoke(app, ["saliency", "--help"]).stdout


def test_plot_and_report_file(runner, problem, tmp_path):
    model, data = problem
    png, rep = tmp_path / "s.png", tmp_path / "r.json"
    r = runner.invoke(
        app,
        [
            "saliency",
            str(model),
            str(data),
            "--plot",
            str(png),
            "-o",
            str(rep),
            "-q",
            "--prune",
            "0.4",
        ],
    )
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    doc = json.loads(rep.read_text())
    jsonschema.validate(doc, report_schema())
    assert "sweep" in doc["results"] and doc["results"]["prune"]["n_removed"] == round(0.4 * 164)


def test_fail_if_gates_on_pruned_accuracy(runner, problem, tmp_path):
    model, data = problem
    base = ["saliency", str(model), str(data), "--prune", "0.5", "-q"]
    ok = runner.invoke(
        app,
        [
            *base,
            "--save-pruned",
            str(tmp_path / "a.safetensors"),
            "--fail-if",
            "prune.after.accuracy < 0",
        ],
    )
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(
        app,
        [
            *base,
            "--save-pruned",
            str(tmp_path / "b.safetensors"),
            "--fail-if",
            "prune.after.loss > 0",
        ],
    )
    assert bad.exit_code == 1


def test_sample_runs_without_arguments(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(
        app, ["saliency", "--samples", "128", "--prune", "0.5", "--rounds", "2", "-q"]
    )
    assert r.exit_code == 0, r.output
    out = tmp_path / "digits_mlp.pruned-50.safetensors"
    assert out.is_file()
    assert load_model(out).masks["net.0.weight"].dtype == torch.bool


def test_render_into_fixed_width_console(runner, problem):
    model, data = problem
    doc = _json(runner.invoke(app, ["saliency", str(model), str(data), "--json"]))
    report = Report(
        command=doc["command"],
        config=doc["config"],
        seed=doc["seed"],
        device=doc["device"],
        dtype=doc["dtype"],
        model=None,
        data=None,
        results=doc["results"],
        timings=doc["timings"],
    )
    buf = io.StringIO()
    saliency_cmd.render(report, Console(file=buf, width=100, no_color=True))
    text = buf.getvalue()
    assert "net.0.weight" in text and "obs+update" in text and "eps" in text


def test_two_ranks_prune_like_one_process(tmp_path):
    """torchrun with 2 gloo ranks: same masks, weights and held-out loss as one process."""
    import os
    import subprocess
    import sys

    model = write_mlp(tmp_path / "m.safetensors", sizes=(6, 9, 4))
    data = write_data(tmp_path / "d", n=37, d=6, classes=4, shards=3)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    env.update({"GMCURV_DIST_TIMEOUT": "60", "GMCURV_NO_CONFIG": "1"})
    docs = {}
    for procs in (1, 2):
        launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
        cmd = [sys.executable, *(launch if procs > 1 else []), "-m", "gmcurv", "saliency"]
        args = [str(model), str(data), "--json", "--dtype", "float64", "--batch-size", "5"]
        out = tmp_path / f"p{procs}.safetensors"
        res = subprocess.run(
            [*cmd, *args, "--prune", "0.6", "--rounds", "2", "--save-pruned", str(out)],
            capture_output=True,
            text=True,
            timeout=240,
            env=env,
            cwd=tmp_path,
            check=False,
        )
        assert res.returncode == 0, res.stderr
        docs[procs] = json.loads(res.stdout)["results"]["prune"]
    assert docs[1]["n_removed"] == docs[2]["n_removed"] == round(0.6 * (6 * 9 + 9 * 4))
    a, b = docs[1]["after"]["loss"]["value"], docs[2]["after"]["loss"]["value"]
    assert abs(a - b) < 1e-10 * abs(a)
    one, two = (
        load_file(str(tmp_path / "p1.safetensors")),
        load_file(str(tmp_path / "p2.safetensors")),
    )
    assert one.keys() == two.keys()
    for k in one:
        assert torch.allclose(one[k].double(), two[k].double(), atol=1e-6), k


def test_obd_hessian_criterion(runner, problem, tmp_path):
    pytest.importorskip("gmcurv.stochastic")
    model, data = problem
    out = tmp_path / "h.safetensors"
    args = ["saliency", str(model), str(data), "--criterion", "obd-hessian", "--probes", "8"]
    doc = _json(
        runner.invoke(
            app,
            [
                *args,
                "--prune",
                "0.5",
                "--save-pruned",
                str(out),
                "--json",
                "--plot",
                str(tmp_path / "h.png"),
            ],
        )
    )
    res = doc["results"]
    assert res["criteria"] == ["magnitude", "obd", "obs", "obd-hessian"]
    mean = res["layers"]["net.2.weight"]["saliency"]["obd-hessian"]["mean"]
    assert mean["stderr"] > 0 and "8 Rademacher probes" in mean["method"]
    assert res["prune"]["criterion"] == "obd-hessian" and not res["prune"]["update"]
    assert res["prune"]["n_removed"] == round(0.5 * N_PRUNABLE)


def test_method_learned_and_both(runner, problem):
    pytest.importorskip("gmcurv.gradmetanet.predict")
    model, data = problem
    base = ["saliency", str(model), str(data), "--json", "--levels", "0.5"]
    learned = _json(runner.invoke(app, [*base, "--method", "learned"]))["results"]
    assert set(learned["learned"]["criteria"]) == {"obd", "obs"} and "sweep" not in learned
    both = _json(runner.invoke(app, [*base, "--method", "both"]))["results"]
    assert "sweep" in both and both["learned"]["comparison"]
    for args in (
        ["--method", "learned", "--prune", "0.5", "--criterion", "obd"],
        ["--method", "hutchpp"],
    ):
        assert runner.invoke(app, [*base, *args]).exit_code == 2
