"""The Fisher trace commands side by side on W1-W3: default ``gmcurv trace`` (top-5
eigenvalues of the Gram kernel) against the trace alone (``--k 0``), the flat Fisher trace
against BackPACK/torch.func, and the exact GGN trace against BackPACK DiagGGNExact.

Every command (and every peer script, `bench/cli/peers.py`) runs in its own process;
"compute" is the report's own stage timings (gmcurv) or the peer's timed call, start-up
excluded on both sides. Rounds are interleaved (default, --k 0, flat, peer, ggn, peer, per
workload), `uptime` load is recorded per round and the minimum over rounds is kept. The
processes' CPU seconds (user + system, from ``getrusage``) are recorded too: on a machine
shared with other jobs they are the steadier measure of work done.

Writes ``bench/foundation/trace_eigen.json``; ``--in-process`` instead times the same
computations in one process on one thread as CPU seconds (``trace_eigen_cpu.json``).
Run: ``flock /tmp/gmcurv-bench.lock python bench/foundation/bench_trace_eigen.py [--rounds 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent / "distributed"))

from bench_distributed import write_workload  # noqa: E402

SETUP = ("startup", "load", "validate")
ENV = {**os.environ, "GMCURV_NO_CONFIG": "1", "PYTHONPATH": str(ROOT)}
PEERS = HERE.parent / "cli" / "peers.py"


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def gmcurv(args: list[str], tmp: Path) -> dict:
    out = tmp / "report.json"
    out.unlink(missing_ok=True)
    c0, t0 = _cpu(), time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "gmcurv", *args, "-q", "-o", str(out)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=tmp,
    )
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    if proc.returncode != 0:
        raise SystemExit(f"gmcurv {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    doc = json.loads(out.read_text())
    t = doc["timings"]
    res = doc["results"]
    key = "ggn" if "ggn" in res else "fisher"
    eig = res[key].get("eigenvalues") or []
    return {
        "compute": sum(v for k, v in t.items() if k not in SETUP),
        "wall": wall,
        "cpu": cpu,
        "timings": t,
        "trace": res[key]["trace"]["value"],
        "eigenvalues": [
            {k: e.get(k) for k in ("value", "method", "converged", "residual", "n_matvecs")}
            for e in eig
        ],
    }


def peer(task: str, workload: str, tmp: Path) -> dict:
    c0, t0 = _cpu(), time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(PEERS), task, workload],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=tmp,
    )
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1][:200]}
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**doc, "wall": wall, "cpu": cpu}


def cases(w: str, base: list[str]) -> list[tuple[str, str, list[str] | str]]:
    """(case id, 'gmcurv' or 'peer', arguments or peer task)."""
    out = [
        ("default", "gmcurv", ["trace", *base]),
        ("k0", "gmcurv", ["trace", *base, "--k", "0"]),
        ("fisher", "gmcurv", ["trace", *base, "--no-per-layer", "--k", "0"]),
        ("fisher peer", "peer", "fisher"),
    ]
    if w != "W3":  # BackPACK has no DiagGGNExact for Embedding / LayerNorm / attention
        out += [
            ("ggn", "gmcurv", ["trace", *base, "--curvature", "ggn", "--k", "0", "--no-per-layer"]),
            ("ggn peer", "peer", "ggn"),
        ]
    return out


def in_process(names: list[str], rounds: int) -> dict:
    """The same comparisons in this process on one thread, as CPU seconds
    (``time.process_time``, minimum over interleaved rounds): the work each side does,
    nearly unaffected by other jobs on the machine (no start-up, no thread waits)."""
    import torch
    import torch.fx.experimental.symbolic_shapes  # torch's lazy imports, paid up front

    sys.path.insert(0, str(HERE.parent))
    sys.path.insert(0, str(HERE.parent / "cli"))
    import peers
    from workloads import build

    from gmcurv.fisher import fisher_summary
    from gmcurv.ggn import exact_ggn_trace
    from gmcurv.io.data import load_data
    from gmcurv.objective import Objective

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="gmcurv-bench-eigen-"))
    out: dict = {}
    for w in names:
        _, data_path, _ = write_workload(w, tmp)
        data = load_data(data_path)
        obj = Objective.build(build(w).model, "cross_entropy")
        fns = {
            "default": partial(fisher_summary, obj, data, k=5),
            "k0": partial(fisher_summary, obj, data, k=0),
            "fisher": partial(fisher_summary, obj, data, k=0, per_layer=False),
            "fisher peer": partial(lambda name: peers.fisher(build(name)), w),
        }
        if w != "W3":
            fns["ggn"] = partial(exact_ggn_trace, obj, data)
            fns["ggn peer"] = partial(lambda name: peers.ggn(build(name)), w)
        best = dict.fromkeys(fns, float("inf"))
        for _ in range(rounds):
            for cid, fn in fns.items():
                t0 = time.process_time()
                fn()
                best[cid] = min(best[cid], time.process_time() - t0)
        row = {"cpu_seconds": best, "default_over_k0": best["default"] / best["k0"]}
        row["fisher_over_peer"] = best["fisher"] / best["fisher peer"]
        if "ggn" in best:
            row["ggn_over_peer"] = best["ggn"] / best["ggn peer"]
        out[w] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workloads", default="W1,W2,W3")
    ap.add_argument("--in-process", action="store_true", help="CPU seconds, one thread")
    args = ap.parse_args()
    if args.in_process:
        load0 = list(os.getloadavg())
        res = in_process(args.workloads.split(","), args.rounds)
        doc = {"what": "in-process CPU seconds, 1 thread", "load": [load0, list(os.getloadavg())]}
        (HERE / "trace_eigen_cpu.json").write_text(json.dumps({**doc, "rows": res}, indent=2))
        print(json.dumps(res, indent=1))
        return
    tmp = Path(tempfile.mkdtemp(prefix="gmcurv-bench-eigen-"))
    names = args.workloads.split(",")
    paths = {w: write_workload(w, tmp) for w in names}
    runs: dict[str, dict[str, list[dict]]] = {w: {} for w in names}
    loads = []
    for r in range(args.rounds):
        loads.append(list(os.getloadavg()))
        for w in names:
            model, data, extra = paths[w]
            for cid, kind, a in cases(w, [str(model), str(data), *extra]):
                print(f"round {r + 1}: {w} {cid}", file=sys.stderr, flush=True)
                rec = gmcurv(a, tmp) if kind == "gmcurv" else peer(a, w, tmp)  # type: ignore[arg-type]
                runs[w].setdefault(cid, []).append(rec)
    loads.append(list(os.getloadavg()))
    summary = {}
    for w in names:
        best = {
            cid: {
                key: min(x[key] for x in recs if key in x)
                for key in ("compute", "cpu", "wall")
                if any(key in x for x in recs)
            }
            for cid, recs in runs[w].items()
        }
        row: dict = {"best": best}
        d, k0 = best["default"], best["k0"]
        row["default_over_k0"] = {m: d[m] / k0[m] for m in ("compute", "cpu")}
        for task in ("fisher", "ggn"):
            p = best.get(f"{task} peer")
            if p and "compute" in p:
                row[f"{task}_over_peer"] = best[task]["compute"] / p["compute"]
        row["eigenvalues"] = runs[w]["default"][-1]["eigenvalues"]
        row["peers"] = {
            cid: recs[-1].get("peer") or recs[-1].get("error")
            for cid, recs in runs[w].items()
            if cid.endswith("peer")
        }
        summary[w] = row
    doc = {
        "what": "bench/foundation/bench_trace_eigen.py: default trace vs --k 0 vs peers",
        "cpus": os.cpu_count(),
        "rounds": args.rounds,
        "load_per_round": loads,
        "summary": summary,
        "runs": runs,
    }
    (HERE / "trace_eigen.json").write_text(json.dumps(doc, indent=2) + "\n")
    for w, row in summary.items():
        ratios = {k: v for k, v in row.items() if k.endswith("peer") or k == "default_over_k0"}
        print(w, json.dumps(ratios))


if __name__ == "__main__":
    main()
