"""``gmcurv lora`` under torchrun: 2 CPU ranks (gloo) report what one process reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import write_data, write_mlp
from lora_fixtures import random_factors, write_peft_adapter

from gmcurv.io.checkpoint import load_model
from gmcurv.results import iter_estimates


def _run(args: list[str], procs: int, cwd) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "OMP_NUM_THREADS": "1",
        "GMCURV_DIST_TIMEOUT": "60",
        "GMCURV_NO_CONFIG": "1",
    }
    launcher = [sys.executable, "-m"]
    if procs > 1:
        launcher += ["torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", "-m"]
    return subprocess.run(
        [*launcher, "gmcurv", *args],
        capture_output=True, text=True, timeout=240, env=env, cwd=cwd, check=False,
    )  # fmt: skip


def test_two_ranks_match_one_process(tmp_path):
    """MC Fisher (noise seeded per global example), uneven shards, gathered per-example
    values, all-reduced gradient and HVP; rank 0 alone prints and plots."""
    model = write_mlp(tmp_path / "model.safetensors", sizes=(6, 9, 4), activation="tanh")
    data = write_data(tmp_path / "data", n=37, d=6, classes=4, shards=3)  # ranks: 18 + 19
    base = load_model(model).model
    ad = write_peft_adapter(tmp_path / "ad", random_factors(base, ["net.0", "net.2"], 2), 2, 4)
    args = ["lora", str(ad), str(model), str(data), "--json", "--dtype", "float64", "-b", "5",
            "--fisher", "mc", "--mc-samples", "2", "--plot", "p.png"]  # fmt: skip
    one, two = _run(args, 1, tmp_path), _run(args, 2, tmp_path)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)  # only rank 0 printed
    assert a["data"]["n"] == b["data"]["n"] == 37
    ea = dict(iter_estimates(a["results"]))
    eb = dict(iter_estimates(b["results"]))
    assert ea.keys() == eb.keys() and any("hessian_qf" in k for k in ea)
    for key, x in ea.items():
        for field in ("value", "stderr", "data_stderr"):
            if x[field] is None:
                assert eb[key][field] is None, (key, field)
            else:
                assert eb[key][field] == pytest.approx(x[field], rel=1e-8, abs=1e-12), (key, field)
    assert (tmp_path / "p.png").is_file()
