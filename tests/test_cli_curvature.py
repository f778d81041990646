"""CLI: ``trace --curvature ggn|hessian|all``, ``eigen``, ``spectrum`` (exit codes, schema,
plots, eigenvector files)."""

from __future__ import annotations

import json

import jsonschema
import matplotlib.image
import pytest
import torch
from helpers import write_data, write_mlp
from safetensors import safe_open

from gmcurv.cli.app import app
from gmcurv.io.fileio import sha256_file
from gmcurv.results import report_schema

F64 = ["--dtype", "float64", "--device", "cpu"]


@pytest.fixture
def problem(tmp_path):
    model = write_mlp(tmp_path / "model.safetensors", sizes=(6, 8, 3))
    data = write_data(tmp_path / "data.safetensors", n=30)
    return model, data


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    jsonschema.validate(doc, report_schema())
    return doc


def _run(runner, *args):
    return runner.invoke(app, [str(a) for a in args])


def test_trace_all_side_by_side(runner, problem):
    model, data = problem
    doc = _json(
        _run(
            runner, "trace", model, data, "--curvature", "all", "--fisher", "exact", "--json", *F64
        )
    )
    res = doc["results"]
    assert set(res) >= {"fisher", "ggn", "hessian"}
    for name in ("ggn", "hessian"):
        block = res[name]
        assert block["method"] == "exact(dense)" and block["n_matvecs"] == block["n_params"] == 83
        assert block["trace"]["stderr"] is None and block["trace"]["n_matvecs"] == 83
        assert set(block["per_layer"]) == set(res["fisher"]["per_layer"]) == {"net.0", "net.2"}
        total = sum(layer["trace"]["value"] for layer in block["per_layer"].values())
        assert total == pytest.approx(block["trace"]["value"], rel=1e-10)
        eigs = [e["value"] for e in block["eigenvalues"]]
        assert eigs == sorted(eigs, reverse=True) and len(eigs) == 5
    # one prediction per example: the exact Fisher is the GGN
    assert res["ggn"]["trace"]["value"] == pytest.approx(res["fisher"]["trace"]["value"], rel=1e-9)
    human = _run(runner, "trace", model, data, "--curvature", "all", *F64)
    assert human.exit_code == 0 and "side by side" in human.stdout and "products" in human.stdout


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp"])
def test_trace_stochastic_methods(runner, problem, method):
    model, data = problem
    exact = _json(_run(runner, "trace", model, data, "--curvature", "hessian", "--json", *F64))
    ref = exact["results"]["hessian"]["trace"]["value"]
    args = ["--curvature", "hessian", "--method", method, "--probes", "12", "--k", "2"]
    res = _json(_run(runner, "trace", model, data, *args, "--json", *F64))["results"]["hessian"]
    t = res["trace"]
    assert t["method"].startswith(method) and t["stderr"] > 0
    assert abs(t["value"] - ref) <= 4 * t["stderr"]
    assert res["n_matvecs"] >= 24  # 12 per layer, plus Lanczos
    for layer in res["per_layer"].values():
        assert layer["trace"]["n_matvecs"] == 12
    flat = _json(_run(runner, "trace", model, data, *args, "--no-per-layer", "--json", *F64))[
        "results"
    ]["hessian"]
    assert flat["per_layer"] == {} and flat["trace"]["n_matvecs"] == 12


def test_trace_plot_and_bad_options(runner, problem, tmp_path):
    model, data = problem
    png = tmp_path / "traces.png"
    r = _run(runner, "trace", model, data, "--curvature", "all", "--plot", png, "-q")
    assert r.exit_code == 0, r.output
    assert matplotlib.image.imread(str(png)).shape[-1] in (3, 4)
    bad = _run(runner, "trace", model, data, "--curvature", "fisher", "--method", "hutchpp")
    assert bad.exit_code == 2 and "does not apply" in bad.output
    bad = _run(runner, "trace", model, data, "--curvature", "ggn", "--method", "learned")
    assert bad.exit_code == 2 and "no GGN" in bad.output
    bad = _run(runner, "trace", model, data, "--curvature", "hessian", "--plot", tmp_path / "x.gif")
    assert bad.exit_code == 2
    gate = _run(
        runner,
        "trace",
        model,
        data,
        "--curvature",
        "hessian",
        "--fail-if",
        "hessian.trace > 0",
        "-q",
    )
    assert gate.exit_code == 1


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_eigen_lanczos_matches_exact(runner, problem, curvature):
    model, data = problem
    common = ["eigen", model, data, "--curvature", curvature, "--k", "3", "--json", *F64]
    exact = _json(_run(runner, *common, "--method", "exact"))["results"][curvature]
    lz = _json(_run(runner, *common, "--method", "lanczos", "--tol", "1e-10"))["results"][curvature]
    assert exact["method"] == "exact(dense)" and lz["method"] == "lanczos"
    for a, b in zip(exact["eigenvalues"], lz["eigenvalues"], strict=True):
        assert b["value"] == pytest.approx(a["value"], rel=1e-8, abs=1e-10)
        assert b["converged"] and b["residual"] is not None and b["n_matvecs"] == lz["n_matvecs"]


def test_eigen_save_vectors(runner, problem, tmp_path):
    model, data = problem
    out = tmp_path / "vecs.safetensors"
    digest = sha256_file(model)
    doc = _json(
        _run(runner, "eigen", model, data, "--k", "2", "--save-vectors", out, "--json", *F64)
    )
    block = doc["results"]["hessian"]
    assert block["vectors"] == str(out)
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        v0 = {k.split(".", 2)[2]: f.get_tensor(k) for k in keys if k.startswith("eigvec.0.")}
    assert keys == {
        f"eigvec.{i}.net.{j}.{p}" for i in (0, 1) for j in (0, 2) for p in ("weight", "bias")
    }
    assert v0["net.0.weight"].shape == (8, 6) and v0["net.2.bias"].shape == (3,)
    norm = torch.cat([t.reshape(-1) for t in v0.values()]).norm()
    assert float(norm) == pytest.approx(1.0, rel=1e-9)
    assert json.loads(meta["eigenvalues"])[0] == pytest.approx(block["eigenvalues"][0]["value"])
    assert sha256_file(model) == digest
    clash = _run(runner, "eigen", model, data, "--save-vectors", model)
    assert clash.exit_code == 2 and sha256_file(model) == digest
    wrong = _run(runner, "eigen", model, data, "--save-vectors", tmp_path / "v.npz")
    assert wrong.exit_code == 2


def test_eigen_fisher_route_plot_and_strict(runner, problem, tmp_path):
    model, data = problem
    svg = tmp_path / "eig.svg"
    doc = _json(
        _run(
            runner,
            "eigen",
            model,
            data,
            "--curvature",
            "fisher",
            "--k",
            "3",
            "--plot",
            svg,
            "--json",
        )
    )
    block = doc["results"]["fisher"]
    assert (
        block["method"] == "gram"
        and block["type"] == "empirical"
        and len(block["eigenvalues"]) == 3
    )
    assert svg.read_text().lstrip().startswith("<?xml")
    bad = _run(runner, "eigen", model, data, "--curvature", "fisher", "--method", "lanczos")
    assert bad.exit_code == 2
    stuck = _run(
        runner, "eigen", model, data, "--method", "lanczos", "--max-iters", "3", "--tol", "1e-14",
        "--strict", "-q", *F64,
    )  # fmt: skip
    assert stuck.exit_code == 3


def test_spectrum_json_and_plot(runner, problem, tmp_path):
    model, data = problem
    png = tmp_path / "esd.png"
    args = ["spectrum", model, data, "--method", "lanczos", "--probes", "3", "--max-iters", "10"]
    doc = _json(_run(runner, *args, "--plot", png, "--points", "200", "--json", *F64))
    block = doc["results"]["hessian"]
    assert block["method"] == "slq" and block["n_matvecs"] == 30 and block["probes"] == 3
    assert len(block["grid"]) == len(block["density"]) == 200
    q = block["quadrature"]
    assert len(q["nodes"]) == 3 and all(len(r) == 10 for r in q["nodes"])
    for w in q["weights"]:
        assert sum(w) == pytest.approx(1.0)
    assert len(block["moments"]) == 4 and block["moments"][0]["stderr"] is not None
    assert matplotlib.image.imread(str(png)).ndim == 3
    exact = _json(_run(runner, "spectrum", model, data, "--curvature", "ggn", "--json", *F64))
    eb = exact["results"]["ggn"]
    assert eb["method"] == "exact(dense)" and len(eb["quadrature"]["nodes"][0]) == 83
    human = _run(runner, *args)
    assert human.exit_code == 0 and "spectrum" in human.stdout
    bad = _run(runner, "spectrum", model, data, "--method", "hutchpp")
    assert bad.exit_code == 2


def test_two_ranks_match_one_process(tmp_path):
    """Under torchrun each rank holds a shard; products and factor traces are all-reduced."""
    from test_distributed import _run as run_procs

    model = write_mlp(tmp_path / "model.safetensors", sizes=(6, 9, 4), activation="tanh")
    data = write_data(tmp_path / "data", n=37, d=6, classes=4, shards=3)
    common = ["--json", "--dtype", "float64", "--batch-size", "5", "--seed", "3"]
    # stochastic GGN/Hessian traces per layer, Lanczos eigenvalues, the Fisher's closed forms
    runs = {
        "all": ["trace", model, data, "--curvature", "all", "--method", "hutchpp", "--probes", "9",
                "--k", "2", *common],
    }  # fmt: skip
    for name, args in runs.items():
        args = [str(a) for a in args]
        one, two = run_procs(args, 1, tmp_path), run_procs(args, 2, tmp_path)
        assert one.returncode == 0 and two.returncode == 0, (name, one.stderr, two.stderr)
        a, b = json.loads(one.stdout)["results"], json.loads(two.stdout)["results"]
        for kind in ("ggn", "hessian"):
            if kind not in a:
                continue
            if "trace" in a[kind]:
                assert b[kind]["trace"]["value"] == pytest.approx(
                    a[kind]["trace"]["value"], rel=1e-9
                )
            for x, y in zip(a[kind]["eigenvalues"], b[kind]["eigenvalues"], strict=True):
                assert y["value"] == pytest.approx(x["value"], rel=1e-7)


def test_iteration_flags(runner, problem):
    model, data = problem
    base = [
        "eigen",
        model,
        data,
        "--method",
        "lanczos",
        "--k",
        "2",
        "--tol",
        "1e-8",
        "--json",
        *F64,
    ]
    plain = _json(_run(runner, *base))["results"]["hessian"]
    restarted = _json(_run(runner, *base, "--restarts", "1"))["results"]["hessian"]
    assert restarted["n_matvecs"] > plain["n_matvecs"]
    for a, b in zip(plain["eigenvalues"], restarted["eigenvalues"], strict=True):
        assert b["value"] == pytest.approx(a["value"], rel=1e-7)
    capped = _json(
        _run(runner, "trace", model, data, "--curvature", "ggn", "--method", "hutchpp",
             "--max-iters", "4", "--tol", "1e-12", "--k", "2", "--json", *F64)
    )["results"]["ggn"]  # fmt: skip
    assert not any(e["converged"] for e in capped["eigenvalues"])
    spec = ["spectrum", model, data, "--method", "lanczos", "--probes", "1", "--steps", "6"]
    narrow = _json(_run(runner, *spec, "--sigma", "0.01", "--json"))["results"]["hessian"]
    wide = _json(_run(runner, *spec, "--sigma", "0.1", "--json"))["results"]["hessian"]
    assert wide["sigma"] == pytest.approx(10 * narrow["sigma"])


def test_trace_k0_skips_eigenvalues_and_per_layer_eigen_is_opt_in(runner, problem):
    model, data = problem
    none = _json(_run(runner, "trace", model, data, "--curvature", "all", "--k", "0", "--json"))
    res = none["results"]
    assert res["fisher"]["eigenvalues"] == [] and res["hessian"]["eigenvalues"] == []
    assert "startup" in none["timings"]  # torch's lazy imports, paid before the compute
    plain = _json(_run(runner, "trace", model, data, "--k", "2", "--json"))["results"]["fisher"]
    assert len(plain["eigenvalues"]) == 2
    assert all(not layer["eigenvalues"] for layer in plain["per_layer"].values())
    more = _json(_run(runner, "trace", model, data, "--k", "2", "--per-layer-eigen", "--json"))
    layers = more["results"]["fisher"]["per_layer"].values()
    assert all(len(layer["eigenvalues"]) == 2 for layer in layers)


def test_trace_fisher_eigen_tolerance_reported_and_tol_tightens(runner, tmp_path):
    """Float32 kernel beyond the dense-eigh size: the report carries the stopping rule (the
    kernel's rounding ``u tr F`` floors the bound) and prints it; ``--tol`` asks for a
    relative bound instead, and the values agree within the default's bound."""
    model = write_mlp(tmp_path / "model.safetensors", sizes=(6, 8, 3))
    data = write_data(tmp_path / "data.safetensors", n=300)
    doc = _json(_run(runner, "trace", model, data, "--k", "3", "--json"))
    block = doc["results"]["fisher"]
    rule = block["eigen_tolerance"]
    assert block["eigenvalues"][0]["method"] == "gram-block-lanczos"
    assert rule["rtol"] == 1e-10
    assert rule["atol"] == pytest.approx(2.0**-24 * block["trace"]["value"], rel=1e-6)
    tight = _json(_run(runner, "trace", model, data, "--k", "3", "--tol", "1e-12", "--json"))
    tb = tight["results"]["fisher"]
    assert tb["eigen_tolerance"]["rtol"] == 1e-12 and tb["eigen_tolerance"]["atol"] == 0.0
    bound = max(rule["atol"], 1e-10 * block["eigenvalues"][0]["value"])
    for a, b in zip(block["eigenvalues"], tb["eigenvalues"], strict=True):
        assert abs(a["value"] - b["value"]) <= bound and a["residual"] is not None
    human = _run(runner, "trace", model, data, "--k", "3")
    assert human.exit_code == 0 and "each within" in human.stdout
