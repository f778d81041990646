"""torchrun with 2 CPU processes (gloo, loopback) gives the single-process answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import write_data, write_mlp
from safetensors.torch import save_file

TIMEOUT = 240


def _run(args: list[str], procs: int, tmp_path, timeout: int = TIMEOUT):
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "OMP_NUM_THREADS": "1",
        "GMCURV_DIST_TIMEOUT": "60",
        "GMCURV_NO_CONFIG": "1",
    }
    if procs == 1:
        cmd = [sys.executable, "-m", "gmcurv", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={procs}",
            "-m",
            "gmcurv",
            *args,
        ]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path, check=False
    )


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    model = write_mlp(tmp / "model.safetensors", sizes=(6, 9, 4), activation="tanh")
    data = write_data(tmp / "data", n=37, d=6, classes=4, shards=3)  # uneven: 18 + 19
    return tmp, model, data


def _estimates(node, path=""):
    if isinstance(node, dict) and "value" in node and "method" in node:
        yield path, node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _estimates(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _estimates(v, f"{path}[{i}]")


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_two_ranks_match_one_process(problem, fisher):
    tmp, model, data = problem
    args = [
        "trace",
        str(model),
        str(data),
        "--json",
        "--dtype",
        "float64",
        "--k",
        "4",
        "--batch-size",
        "5",
        "--fisher",
        fisher,
        "--mc-samples",
        "2",
    ]
    one, two = _run(args, 1, tmp), _run(args, 2, tmp)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)  # only rank 0 printed
    assert b["data"]["n"] == a["data"]["n"] == 37
    ea, eb = dict(_estimates(a["results"])), dict(_estimates(b["results"]))
    assert ea.keys() == eb.keys() and len(ea) > 5
    for key in ea:
        for field in ("value", "stderr", "data_stderr"):
            x, y = ea[key][field], eb[key][field]
            if x is None:
                assert y is None
            else:
                assert y == pytest.approx(x, rel=1e-8, abs=1e-12), (key, field)


def test_a_failing_rank_stops_every_rank_with_a_message(tmp_path):
    model = write_mlp(tmp_path / "model.safetensors", sizes=(6, 9, 4))
    data = write_data(tmp_path / "data", n=20, d=6, classes=4, shards=2)
    bad = torch.randn(10, 6)
    bad[4, 0] = float("nan")  # only rank 1's shard is broken
    save_file(
        {"inputs": bad, "targets": torch.zeros(10, dtype=torch.long)},
        str(data / "part-1.safetensors"),
    )
    result = _run(["trace", str(model), str(data)], 2, tmp_path, timeout=180)
    assert result.returncode != 0
    # our messages come first; torchrun's launcher then prints its own failure report
    ours, _, launcher = result.stderr.partition("Traceback (most recent call last)")
    assert "rank 0: error: rank 1 failed:" in ours and "NaN" in ours
    assert "rank 1: error:" in ours
    assert "gmcurv/" not in launcher.split("ChildFailedError")[0]  # no gmcurv frame


def test_landscape_two_ranks_match_one_process(problem):
    """Grid losses are sums over each rank's shard, all-reduced: equal to one process."""
    tmp, model, data = problem
    args = ["landscape", str(model), str(data), "--json", "--dtype", "float64"]
    args += ["--steps", "5", "--batch-size", "7", "--seed", "2"]
    one, two = _run(args, 1, tmp), _run(args, 2, tmp)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert b["data"]["n"] == a["data"]["n"] == 37
    la, lb = a["results"]["landscape"], b["results"]["landscape"]
    grid_a, grid_b = torch.tensor(la["grid"]["loss"]), torch.tensor(lb["grid"]["loss"])
    assert grid_a.shape == (5, 5)
    torch.testing.assert_close(grid_b, grid_a, rtol=1e-10, atol=1e-12)
