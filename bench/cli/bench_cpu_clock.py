"""Whole commands against the peers' scripts on the CPU clock, for a loaded machine.

``bench_cli.py`` compares wall-clock stage timings; on a shared machine (load 8-11 on 2
cores in the session that wrote this) those swing by +-20 %. Here every process runs on
one thread with ``time.perf_counter`` replaced by ``time.process_time`` before anything is
imported, so gmcurv's own stage timings and the peer's timed call (`peers.py`) are CPU
seconds of that process (user + system: page faults count), and the minor page faults of
each process are recorded. Three processes per round, interleaved:

- ``before``: gmcurv with glibc's malloc defaults (``GLIBC_TUNABLES`` names a malloc
  entry, so `gmcurv.memory.keep_freed_memory` stands aside) and an explicit
  ``--batch-size 256`` (no grown exact-GGN batches) — the behaviour before issue 13's
  ``hvpfast`` changes;
- ``after``: gmcurv as shipped;
- ``peer``: the peer's script (PyHessian's 100-probe loop, BackPACK ``DiagGGNExact``).

Run: ``python bench/cli/bench_cpu_clock.py [--rounds 3] [--only REGEX]``; writes
``bench/cli/cpu_clock.json`` (medians, every round, load before/after).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_cli import ENV, HESSIAN100, ROOT, SETUP, _commit, load_average  # noqa: E402
from bench_distributed import write_workload  # noqa: E402

CPU_CLOCK = (
    "import runpy, sys, time; time.perf_counter = time.process_time; "
    "mode, target = sys.argv[1], sys.argv[2]; sys.argv = [target, *sys.argv[3:]]; "
    "runpy.run_module(target, run_name='__main__', alter_sys=True) if mode == '-m' "
    "else runpy.run_path(target, run_name='__main__')"
)
ENV1 = {**ENV, "OMP_NUM_THREADS": "1"}
GGN = ["trace", "--curvature", "ggn", "--k", "0", "--no-per-layer"]
CASES = {  # id: (workload, gmcurv arguments, peer task)
    "W1 hessian100": ("W1", HESSIAN100, "hessian100"),
    "W2 hessian100": ("W2", HESSIAN100, "hessian100"),
    "W3 hessian100": ("W3", HESSIAN100, "hessian100"),
    "W1 ggn": ("W1", GGN, "ggn"),
    "W2 ggn": ("W2", GGN, "ggn"),
}


def _run(cmd: list[str], env: dict, cwd: Path) -> tuple[str, int]:
    """(stdout, minor page faults of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout, resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - before


def gmcurv(args: list[str], tmp: Path, before: bool) -> dict:
    out = tmp / "report.json"
    out.unlink(missing_ok=True)
    env = {**ENV1, "GLIBC_TUNABLES": "glibc.malloc.check=0"} if before else ENV1
    extra = ["--batch-size", "256"] if before else []
    cmd = [sys.executable, "-c", CPU_CLOCK, "-m", "gmcurv", *args, *extra, "-q", "-o", str(out)]
    _, faults = _run(cmd, env, tmp)
    doc = json.loads(out.read_text())
    cpu = sum(v for k, v in doc["timings"].items() if k not in SETUP)
    res = doc["results"]
    value = (res.get("hessian") or res.get("ggn"))["trace"]["value"]
    return {"cpu": cpu, "faults": faults, "value": value}


def peer(task: str, workload: str, tmp: Path) -> dict:
    cmd = [sys.executable, "-c", CPU_CLOCK, "path", str(HERE / "peers.py"), task, workload]
    stdout, faults = _run(cmd, ENV1, tmp)
    doc = json.loads(stdout.strip().splitlines()[-1])
    return {"cpu": doc["compute"], "faults": faults, "value": doc["value"], "peer": doc["peer"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default=None, help="regex on case ids")
    ap.add_argument("--out", default=str(HERE / "cpu_clock.json"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gmcurv-cpu-clock-"))
    todo = {k: v for k, v in CASES.items() if args.only is None or re.search(args.only, k)}
    paths = {w: write_workload(w, tmp) for w in {w for w, _, _ in todo.values()}}
    load_before = load_average()
    rows = []
    for cid, (w, gargs, task) in todo.items():
        model, data, extra = paths[w]
        full = [*gargs, str(model), str(data), *extra]
        runs: dict[str, list[dict]] = {"before": [], "after": [], "peer": []}
        for _ in range(args.rounds):
            runs["before"].append(gmcurv(full, tmp, True))
            runs["after"].append(gmcurv(full, tmp, False))
            runs["peer"].append(peer(task, w, tmp))
            print(cid, {k: round(v[-1]["cpu"], 3) for k, v in runs.items()}, file=sys.stderr)
        med = {k: statistics.median(r["cpu"] for r in v) for k, v in runs.items()}
        paired = {
            k: statistics.median(
                a["cpu"] / p["cpu"] for a, p in zip(runs[k], runs["peer"], strict=True)
            )
            for k in ("before", "after")
        }
        rows.append(
            {
                "id": cid,
                "peer": runs["peer"][0]["peer"],
                "median_cpu_s": {k: round(v, 4) for k, v in med.items()},
                "paired_ratio_vs_peer": {k: round(v, 3) for k, v in paired.items()},
                "median_faults": {
                    k: int(statistics.median(r["faults"] for r in v)) for k, v in runs.items()
                },
                "values": {k: v[-1]["value"] for k, v in runs.items()},
                "runs": runs,
            }
        )
        print(cid, rows[-1]["paired_ratio_vs_peer"], file=sys.stderr)
    doc = {
        "machine": {
            "cpus": os.cpu_count(),
            "threads": 1,
            "load_before": load_before,
            "load_after": load_average(),
            "rounds": args.rounds,
            "commit": _commit(),
            "clock": "process CPU time (user + system), time.perf_counter patched",
        },
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    for r in rows:
        print(r["id"], r["median_cpu_s"], r["paired_ratio_vs_peer"], r["median_faults"])


if __name__ == "__main__":
    assert ROOT.exists()
    main()
