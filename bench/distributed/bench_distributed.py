"""Issue 9 benchmark: `gmcurv trace --curvature all` with 1 and 2 processes (torchrun).

    flock /tmp/gmcurv-bench.lock python bench/distributed/bench_distributed.py

The foundation workloads (bench/workloads.py) are written as a checkpoint + data file
(W3 through ``--arch bench/workloads.py:tiny_transformer``), then the real command line
runs end to end, JSON to a file, in fresh processes:

- ``1 process``: ``python -m gmcurv trace ...`` with 2 intra-op threads;
- ``2 processes``: ``torchrun --standalone --nproc-per-node 2 -m gmcurv trace ...``, one
  thread per rank (the same 2 cores), gloo over loopback.

Wall time includes interpreter start-up, imports and rendezvous (what a user waits for);
the report's own ``timings`` give the compute stages. The two reports' estimates are
compared (same probes on every rank, so they agree up to float32 reduction order).
Results: bench/distributed/results.json; the discussion is in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from workloads import WORKLOADS, build  # noqa: E402

from gmcurv.io.checkpoint import gmcurv_metadata, save_checkpoint  # noqa: E402

ARCH = {"W3": f"{HERE.parent / 'workloads.py'}:tiny_transformer"}


def write_workload(name: str, tmp: Path) -> tuple[Path, Path, list[str]]:
    w = build(name)
    model = tmp / f"{name}.safetensors"
    state = {k: v.detach().contiguous() for k, v in w.model.state_dict().items()}
    if name in ARCH:
        save_checkpoint(model, state, {})
        extra = ["--arch", ARCH[name]]
    else:
        act = "relu" if name == "W1" else "tanh"
        save_checkpoint(model, state, gmcurv_metadata(f"mlp:{act}", "cross_entropy"))
        extra = []
    data = tmp / f"{name}-data.safetensors"
    save_file({"inputs": w.x.contiguous(), "targets": w.y.contiguous()}, str(data))
    return model, data, extra


def run(procs: int, args: list[str], out: Path) -> float:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(2 // procs),
        "GMCURV_NO_CONFIG": "1",
        "MASTER_ADDR": "127.0.0.1",
    }
    if procs == 1:
        cmd = [sys.executable, "-m", "gmcurv", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc-per-node={procs}", "-m", "gmcurv", *args]
    t0 = time.perf_counter()
    proc = subprocess.run([*cmd, "-o", str(out), "-q"], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return wall


def estimates(report: dict) -> dict[str, float]:
    res = report["results"]
    return {k: res[k]["trace"]["value"] for k in ("fisher", "ggn", "hessian") if k in res}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workloads", nargs="*", default=list(WORKLOADS))
    ap.add_argument("--out", default=str(HERE / "results.json"))
    opts = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for name in opts.workloads:
            model, data, extra = write_workload(name, tmp)
            args = ["trace", str(model), str(data), "--curvature", "all", "--seed", "0", *extra]
            row: dict = {"workload": name}
            for procs in (1, 2):
                out = tmp / f"{name}-{procs}.json"
                walls = [run(procs, args, out) for _ in range(opts.repeats)]
                report = json.loads(out.read_text())
                row[f"p{procs}"] = {
                    "wall_median_s": round(statistics.median(walls), 3),
                    "wall_min_s": round(min(walls), 3),
                    "walls_s": [round(t, 3) for t in walls],
                    "timings": report.get("timings"),
                    "traces": estimates(report),
                    "n": report["data"]["n"],
                    "n_params": report["model"]["n_params"],
                }
                print(name, procs, row[f"p{procs}"]["wall_median_s"], flush=True)
            t1, t2 = row["p1"]["traces"], row["p2"]["traces"]
            p1, p2 = row["p1"]["wall_median_s"], row["p2"]["wall_median_s"]
            row["speedup_median"] = round(p1 / p2, 2)
            row["max_rel_diff"] = max(abs(t1[k] - t2[k]) / max(abs(t1[k]), 1e-30) for k in t1)
            row["load_avg"] = [round(x, 2) for x in os.getloadavg()]
            rows.append(row)
    result = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "processor": platform.machine(),
        },
        "command": "gmcurv trace MODEL DATA --curvature all --seed 0 -o report.json -q",
        "repeats": opts.repeats,
        "results": rows,
    }
    Path(opts.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
