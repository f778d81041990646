"""Same seed, same JSON: identical reports across runs (timings aside), and the same
numbers to float tolerance across --batch-size values (stochastic estimators draw their
randomness per example / per probe, never per batch)."""

from __future__ import annotations

import json
import math

import pytest
from helpers import write_data, write_mlp

from gmcurv.cli.app import app

VOLATILE = {"timings", "seconds"}  # wall-clock only


def _strip(node, drop=VOLATILE):
    if isinstance(node, dict):
        return {k: _strip(v, drop) for k, v in node.items() if k not in drop}
    if isinstance(node, list):
        return [_strip(v, drop) for v in node]
    return node


def _close(a, b, path="", rel=1e-7):
    """Same structure; numbers equal to `rel` (relative to the larger magnitude)."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}", rel)
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]", rel)
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=rel, abs_tol=1e-12), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    return write_mlp(root / "m.safetensors", sizes=(6, 8, 3)), write_data(
        root / "d.safetensors", n=40
    )


RUNS = {
    "trace-all-mc": ["trace", "--curvature", "all", "--fisher", "mc", "--mc-samples", "3",
                     "--method", "hutchinson", "--probes", "8", "--k", "2"],
    "eigen-hessian": ["eigen", "--k", "2"],
    "spectrum": ["spectrum", "--probes", "2", "--steps", "10", "--points", "50"],
    "saliency": ["saliency", "--criterion", "obs", "--levels", "0.3,0.6"],
    "landscape": ["landscape", "--steps", "5"],
}  # fmt: skip


def _run(runner, args, model, data, batch_size):
    cmd = [*args, str(model), str(data), "--json", "--dtype", "float64", "--seed", "7"]
    result = runner.invoke(app, [*cmd, "--batch-size", str(batch_size)])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("name", list(RUNS))
def test_same_seed_same_json(runner, problem, name):
    model, data = problem
    a = _run(runner, RUNS[name], model, data, 16)
    b = _run(runner, RUNS[name], model, data, 16)
    assert json.dumps(_strip(a), sort_keys=True) == json.dumps(_strip(b), sort_keys=True)


@pytest.mark.parametrize("name", list(RUNS))
def test_batch_size_does_not_change_the_numbers(runner, problem, name):
    model, data = problem
    layout = VOLATILE | {"config", "chunk"}  # the options echoed, the grid points per forward
    a = _strip(_run(runner, RUNS[name], model, data, 7), layout)
    b = _strip(_run(runner, RUNS[name], model, data, 40), layout)
    _close(a, b)
