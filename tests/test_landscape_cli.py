"""``gmcurv landscape``: report schema, plots, grid files, --to, --fail-if and exit codes."""

from __future__ import annotations

import io
import json

import jsonschema
import matplotlib.image
import numpy as np
import pytest
from helpers import write_data, write_mlp
from rich.console import Console

from gmcurv.cli import landscape as landscape_cmd
from gmcurv.cli.app import app
from gmcurv.results import Report, report_schema

F64 = ["--dtype", "float64", "--device", "cpu"]


@pytest.fixture
def problem(tmp_path):
    model = write_mlp(tmp_path / "model.safetensors", sizes=(6, 8, 3))
    data = write_data(tmp_path / "data.safetensors", n=30)
    return model, data


def _run(runner, *args):
    return runner.invoke(app, [str(a) for a in args])


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # --json: the report and nothing else on stdout
    jsonschema.validate(doc, report_schema())
    return doc


def _image(path) -> np.ndarray:
    img = matplotlib.image.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    return img


def test_random_plane_report_plot_and_grid_file(runner, problem, tmp_path):
    model, data = problem
    plot, grid = tmp_path / "surface.png", tmp_path / "grid.npz"
    doc = _json(
        _run(runner, "landscape", model, data, "--steps", 5, "--plot", plot, "--save-grid", grid,
             "--json", *F64)
    )  # fmt: skip
    block = doc["results"]["landscape"]
    assert block["dimensions"] == 2 and block["directions_kind"] == "random"
    assert block["normalisation"] == "filter" and block["include_bias"] is False
    assert block["range"] == [-1.0, 1.0] and block["steps"] == 5
    loss = np.asarray(block["grid"]["loss"])
    assert loss.shape == (5, 5) and block["grid"]["alphas"][2] == 0.0
    center = block["center"]["loss"]
    assert center["stderr"] is None and center["n_samples"] == 30
    assert loss[2, 2] == pytest.approx(center["value"], rel=1e-12)
    assert block["min"]["loss"] == pytest.approx(loss.min())
    for name in ("d1", "d2"):
        d = block["directions"][name]
        assert d["norm"] > 0 and d["eigenvalue"] is None
        assert d["curvature_per_unit_norm"] == pytest.approx(
            block["sharpness"][name]["value"] / d["norm"] ** 2
        )
        assert block["sharpness"][name]["method"].startswith("quadratic-fit")
    _image(plot)
    with np.load(grid, allow_pickle=False) as z:
        np.testing.assert_allclose(z["loss"], loss, rtol=0, atol=0)
        assert z["alphas"].shape == z["betas"].shape == (5,)
        assert float(z["center_loss"]) == center["value"] and str(z["normalisation"]) == "filter"
        assert z["direction_norms"].shape == (2,) and z["accuracy"].shape == (5, 5)
    # the human rendering of the same report
    buf = io.StringIO()
    landscape_cmd.render(
        Report(**{**doc, "model": None, "data": None}), Console(file=buf, width=120)
    )
    text = buf.getvalue()
    assert "centre loss" in text and "curvature (fit)" in text and "d2" in text


def test_eigen_line_compares_the_fit_with_the_eigenvalue(runner, problem, tmp_path):
    model, data = problem
    plot = tmp_path / "line.svg"
    doc = _json(
        _run(runner, "landscape", model, data, "--directions", "eigen", "--1d", "--steps", 7,
             "--range=-0.5:0.5", "--plot", plot, "--json", *F64)
    )  # fmt: skip
    block = doc["results"]["landscape"]
    assert block["dimensions"] == 1 and block["normalisation"] == "eigen"
    d1 = block["directions"]["d1"]
    assert d1["norm"] == pytest.approx(1.0, rel=1e-10)
    lam = d1["eigenvalue"]["value"]
    fit = block["sharpness"]["d1"]["value"]
    assert fit == pytest.approx(lam, rel=0.05)  # tanh MLP: smooth, a local fit is close
    assert d1["relative_difference"] == pytest.approx((fit - lam) / abs(lam))
    assert len(block["grid"]["loss"]) == 7 and block["grid"]["betas"] is None
    assert plot.read_text().lstrip().startswith("<?xml")


def test_surface_and_human_output(runner, problem, tmp_path):
    model, data = problem
    plot = tmp_path / "s.png"
    res = _run(runner, "landscape", model, data, "--steps", 3, "--surface", "--plot", plot,
               "--include-bias", *F64)  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "centre loss" in res.stdout and "normalisation: filter" in res.stdout
    _image(plot)


def test_to_interpolates_and_spans_planes(runner, problem, tmp_path):
    model, data = problem
    b = write_mlp(tmp_path / "b.safetensors", sizes=(6, 8, 3), seed=1)
    c = write_mlp(tmp_path / "c.safetensors", sizes=(6, 8, 3), seed=2)
    ends = {}
    for path in (model, b, c):
        doc = _json(_run(runner, "landscape", path, data, "--1d", "--steps", 3, "--json", *F64))
        ends[path] = doc["results"]["landscape"]["center"]["loss"]["value"]
    plot = tmp_path / "interp.png"
    line = _json(
        _run(runner, "landscape", model, data, "--to", b, "--steps", 5, "--plot", plot, "--json",
             *F64)
    )["results"]["landscape"]  # fmt: skip
    assert line["dimensions"] == 1 and line["directions_kind"] == "checkpoint"
    assert line["range"] == [0.0, 1.0] and line["normalisation"] == "none"
    assert line["grid"]["loss"][0] == pytest.approx(ends[model], rel=1e-12)
    assert line["grid"]["loss"][-1] == pytest.approx(ends[b], rel=1e-12)
    assert line["directions"]["d1"]["checkpoint_loss"] == pytest.approx(ends[b], rel=1e-12)
    _image(plot)
    plane = _json(
        _run(runner, "landscape", model, data, "--to", b, "--to", c, "--steps", 3, "--plot", plot,
             "--json", *F64)
    )["results"]["landscape"]  # fmt: skip
    grid = plane["grid"]["loss"]
    assert plane["dimensions"] == 2
    assert grid[0][0] == pytest.approx(ends[model], rel=1e-12)
    assert grid[2][0] == pytest.approx(ends[b], rel=1e-12)
    assert grid[0][2] == pytest.approx(ends[c], rel=1e-12)


def test_fail_if_gates_on_the_landscape_block(runner, problem):
    model, data = problem
    base = ["landscape", model, data, "--steps", 3, *F64]
    assert _run(runner, *base, "--fail-if", "landscape.sharpness.d1 > -1e9").exit_code == 1
    ok = _run(runner, *base, "--fail-if", "landscape.sharpness.d1 < -1e9", "--json")
    assert ok.exit_code == 0 and json.loads(ok.stdout)["command"] == "landscape"
    assert _run(runner, *base, "--fail-if", "landscape.center.loss > 1e9").exit_code == 0
    bad = _run(runner, *base, "--fail-if", "landscape.nothing > 1")
    assert bad.exit_code == 2 and "Traceback" not in bad.output


def test_default_sample_runs(runner, tmp_path):
    doc = _json(_run(runner, "landscape", "--steps", 3, "--1d", "--samples", 64, "--json"))
    block = doc["results"]["landscape"]
    assert block["center"]["accuracy"]["value"] > 0.9 and block["evaluation"] == "stacked"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--range", "1:-1"], "--range"),
        (["--range", "abc"], "--range"),
        (["--steps", "2"], "--steps"),
        (["--plot", "x.gif"], "extension"),
        (["--save-grid", "g.csv"], ".npz"),
        (["--surface"], "--surface"),
        (["--1d", "--surface", "--plot", "s.png"], "--surface"),
        (["--fail-if", "landscape.sharpness.d1 >"], "rule"),
    ],
)
def test_bad_options_exit_2_with_a_message(runner, problem, tmp_path, args, message):
    model, data = problem
    res = _run(runner, "landscape", model, data, *args, *F64)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


def test_bad_to_checkpoints_exit_2(runner, problem, tmp_path):
    model, data = problem
    wide = write_mlp(tmp_path / "wide.safetensors", sizes=(6, 9, 3))
    relu = write_mlp(tmp_path / "relu.safetensors", sizes=(6, 8, 3), activation="relu")
    b = write_mlp(tmp_path / "b.safetensors", sizes=(6, 8, 3), seed=1)
    cases = [
        (["--to", wide], "do not match"),
        (["--to", relu], "architecture"),
        (["--to", model], "equals MODEL"),
        (["--to", tmp_path / "missing.safetensors"], "missing.safetensors"),
        (["--to", b, "--to", b, "--to", b], "at most two"),
        (["--to", b, "--to", b], "one line"),
        (["--to", b, "--directions", "eigen"], "--directions eigen"),
        (["--to", b, "--to", wide, "--1d"], "--1d"),
    ]
    for args, message in cases:
        res = _run(runner, "landscape", model, data, "--steps", 3, *args, *F64)
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output and "Traceback" not in res.output, (args, res.output)


def test_outputs_never_overwrite_inputs(runner, tmp_path):
    model = write_mlp(tmp_path / "model.safetensors", sizes=(6, 8, 3))
    data = write_data(tmp_path / "data.npz", n=20, fmt="npz")
    b = write_mlp(tmp_path / "b.safetensors", sizes=(6, 8, 3), seed=1)
    before = {p: p.read_bytes() for p in (model, data, b)}
    for args in (["-o", model], ["--save-grid", data], ["-o", b, "--to", b]):
        res = _run(runner, "landscape", model, data, "--steps", 3, *args, *F64)
        assert res.exit_code == 2 and "overwrite" in res.output, (args, res.output)
    assert all(p.read_bytes() == content for p, content in before.items())
    out = tmp_path / "report.json"
    res = _run(runner, "landscape", model, data, "--steps", 3, "-o", out, "-q", *F64)
    assert res.exit_code == 0 and json.loads(out.read_text())["command"] == "landscape"


def test_help_documents_the_command(runner):
    res = _run(runner, "landscape", "--help")
    assert res.exit_code == 0
    for option in ("--directions", "--to", "--1d", "--range", "--steps", "--include-bias",
                   "--surface", "--save-grid"):  # fmt: skip
        assert option in res.output
