"""Exports: ``trace --save-diagonal`` and ``saliency --save-scores`` (round trip, names,
metadata, values against dense float64 oracles and the engine), and the docs' Fisher merge."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from helpers import write_data, write_mlp
from oracles import dense_ggn, dense_hessian, per_example_grads
from safetensors import safe_open
from safetensors.torch import load_file

from gmcurv.cli.app import app
from gmcurv.io.checkpoint import load_model
from gmcurv.io.data import load_data
from gmcurv.objective import Objective
from gmcurv.params import ParamSpace

F64 = ["--dtype", "float64", "--device", "cpu", "-k", "1"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def problem(tmp_path):
    model = write_mlp(tmp_path / "model.safetensors", sizes=(5, 6, 3))
    data = write_data(tmp_path / "data.safetensors", n=24, d=5)
    return model, data


def _run(runner, *args):
    return runner.invoke(app, [str(a) for a in args])


def _objective(model, data):
    lm = load_model(model, dtype=torch.float64)
    obj = Objective.build(lm.model, lm.loss)
    batch = next(load_data(data).batches(10_000, "cpu", torch.float64))
    return obj, batch


def _meta(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def _flat(obj, tensors) -> torch.Tensor:
    assert set(tensors) == set(obj.params)
    return ParamSpace.of(dict(obj.params)).flatten(tensors)


@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_fisher_diagonal_matches_dense(runner, problem, tmp_path, fisher):
    model, data = problem
    out = tmp_path / "fisher.safetensors"
    r = _run(runner, "trace", model, data, *F64, "--fisher", fisher, "--save-diagonal", out,
             "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["results"]["diagonal"]["files"] == [str(out)]
    obj, batch = _objective(model, data)
    diag = load_file(str(out))
    if fisher == "empirical":
        ref = per_example_grads(obj, batch).pow(2).mean(0)
    else:  # cross-entropy: the exact Fisher is the GGN
        ref = torch.diagonal(dense_ggn(obj, batch))
    torch.testing.assert_close(_flat(obj, diag), ref, rtol=1e-10, atol=1e-12)
    meta = _meta(out)
    assert meta["gmcurv.kind"] == "fisher-diagonal" and meta["gmcurv.N"] == "24"
    assert meta["gmcurv.dtype"] == "float64" and meta["gmcurv.fisher"] == fisher
    assert meta["gmcurv.version"] and len(meta["gmcurv.source_sha256"]) == 64
    assert not (tmp_path / "fisher.stderr.safetensors").exists()


def test_mc_fisher_diagonal_is_the_engines(runner, problem, tmp_path):
    from gmcurv.diagonal import fisher_diagonal

    model, data = problem
    out = tmp_path / "mc.safetensors"
    r = _run(runner, "trace", model, data, *F64, "--fisher", "mc", "--mc-samples", "3",
             "--seed", "5", "--save-diagonal", out, "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    obj, _ = _objective(model, data)
    ref = fisher_diagonal(obj, load_data(data), fisher="mc", mc_samples=3, seed=5)
    got = load_file(str(out))
    for k, v in ref.value.items():
        torch.testing.assert_close(got[k], v.to(got[k].dtype), rtol=1e-12, atol=0)
    assert _meta(out)["gmcurv.mc_samples"] == "3"


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_stochastic_diagonal_with_standard_errors(runner, problem, tmp_path, kind):
    model, data = problem
    out = tmp_path / f"{kind}.safetensors"
    r = _run(runner, "trace", model, data, *F64, "--curvature", kind, "--probes", "60",
             "--save-diagonal", out, "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    err_path = tmp_path / f"{kind}.stderr.safetensors"
    value, stderr = load_file(str(out)), load_file(str(err_path))
    obj, batch = _objective(model, data)
    dense = dense_hessian(obj, batch) if kind == "hessian" else dense_ggn(obj, batch)
    v, se = _flat(obj, value), _flat(obj, stderr)
    assert (se >= 0).all()
    z = (v - torch.diagonal(dense)).abs() / se.clamp_min(1e-12)
    assert float(z.max()) < 6.0  # every entry within 6 s.e. of the dense diagonal
    meta, meta_se = _meta(out), _meta(err_path)
    assert meta["gmcurv.kind"] == f"{kind}-diagonal" and meta["gmcurv.probes"] == "60"
    assert meta_se["gmcurv.kind"] == f"{kind}-diagonal.stderr"


def test_save_scores_round_trip(runner, problem, tmp_path):
    from gmcurv.saliency import saliency_analysis

    model, data = problem
    out = tmp_path / "scores.safetensors"
    r = _run(runner, "saliency", model, data, "--dtype", "float64", "--device", "cpu",
             "--save-scores", out, "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["results"]["scores"]["criterion"] == "obs"
    obj, _ = _objective(model, data)
    ref = saliency_analysis(obj, load_data(data), criteria=["obs"], levels=[0.5])
    got = load_file(str(out))
    assert set(got) == {"net.0.weight", "net.2.weight"}  # prunable weights, biases left out
    for k, v in ref.scores["obs"].items():
        torch.testing.assert_close(got[k], v, rtol=1e-10, atol=0)
    meta = _meta(out)
    assert meta["gmcurv.kind"] == "saliency" and meta["gmcurv.criterion"] == "obs"
    assert meta["gmcurv.N"] == "24" and meta["gmcurv.fisher"] == "empirical"


def test_save_scores_obd_hessian_writes_errors(runner, problem, tmp_path):
    model, data = problem
    out = tmp_path / "s.safetensors"
    r = _run(runner, "saliency", model, data, "--criterion", "obd-hessian", "--probes", "8",
             "--save-scores", out, "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert _meta(tmp_path / "s.stderr.safetensors")["gmcurv.kind"] == "saliency.stderr"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--save-diagonal", "{model}"], "overwrite the input"),
        (["--save-diagonal", "{tmp}/d.npz"], "expected a .safetensors"),
        (["--save-diagonal", "{tmp}/d.safetensors", "--curvature", "all"], "--curvature all"),
        (["--save-diagonal", "{tmp}/d.safetensors", "-o", "{tmp}/d.safetensors"], "overwrite"),
        (["--save-diagonal", "{tmp}/nodir/d.safetensors"], "does not exist"),
    ],
)
def test_save_diagonal_refused_before_compute(runner, problem, tmp_path, monkeypatch, extra,
                                              message):  # fmt: skip
    import gmcurv.fisher

    def boom(*a, **k):  # no compute may start
        raise AssertionError("computed before refusing the output path")

    monkeypatch.setattr(gmcurv.fisher, "fisher_summary", boom)
    model, data = problem
    args = [a.format(model=model, tmp=tmp_path) for a in extra]
    if "does not exist" in message:
        monkeypatch.undo()  # the directory is checked when the file is written
    r = _run(runner, "trace", model, data, "-k", "1", *args)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output


def test_save_scores_refuses_input(runner, problem):
    model, data = problem
    r = _run(runner, "saliency", model, data, "--save-scores", data)
    assert r.exit_code == 2 and "overwrite the input" in r.output


def _example():
    spec = importlib.util.spec_from_file_location(
        "fisher_merge", ROOT / "docs/examples/fisher_merge.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_docs_fisher_merge_and_ewc_against_dense_reference(runner, tmp_path):
    """The docs example: two checkpoints, their exported Fisher diagonals, the merge and the
    EWC penalty, against the same formulas on dense per-example gradients (vmap(grad))."""
    ex = _example()
    paths = []
    for i in range(2):
        m = write_mlp(tmp_path / f"m{i}.safetensors", sizes=(5, 6, 3), seed=10 + i)
        d = write_data(tmp_path / f"d{i}.safetensors", n=20, d=5, seed=i)
        f = tmp_path / f"f{i}.safetensors"
        r = _run(runner, "trace", m, d, *F64, "--save-diagonal", f, "-q")
        assert r.exit_code == 0, r.output
        paths.append((m, d, f))
    out = tmp_path / "merged.safetensors"
    ex.main([str(paths[0][0]), str(paths[0][2]), str(paths[1][0]), str(paths[1][2]), str(out)])
    merged = load_file(str(out))
    dense_f, states = [], []
    for m, d, _ in paths:
        obj, batch = _objective(m, d)
        dense_f.append(ParamSpace.of(dict(obj.params)).unflatten(
            per_example_grads(obj, batch).pow(2).mean(0)))  # fmt: skip
        states.append({k: v.double() for k, v in load_file(str(m)).items()})
    for k in merged:
        w0, w1 = dense_f[0][k] + 1e-8, dense_f[1][k] + 1e-8
        ref = (w0 * states[0][k] + w1 * states[1][k]) / (w0 + w1)
        # the Fisher is float64; the merged weights are stored in the checkpoints' float32
        assert merged[k].dtype == torch.float32
        torch.testing.assert_close(merged[k], ref.float(), rtol=0, atol=0)
    # the merged model still loads in gmcurv (header kept), and the EWC penalty matches
    assert _run(runner, "info", out).exit_code == 0
    fisher0, meta0 = ex.load_diagonal(str(paths[0][2]))
    pen = ex.ewc_penalty(merged, states[0], fisher0, lam=float(meta0["gmcurv.N"]))
    ref = (
        0.5
        * 20
        * sum((dense_f[0][k] * (merged[k].double() - states[0][k]) ** 2).sum() for k in merged)
    )
    torch.testing.assert_close(pen, ref, rtol=1e-9, atol=1e-14)
