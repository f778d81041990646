"""Per Hessian-vector product: gmcurv against PyHessian on W1-W3, side by side.

    python bench/hessian/bench_hvp.py [--rounds 15] [--threads 1]

Each workload (`bench/workloads.py`) runs in its own process with both libraries, set up
once and then timed round-robin (gmcurv, PyHessian, gmcurv, ...; the order swapped every
round) so that load on the shared machine hits both alike; kept: the median over rounds
of each, and the median of the per-round ratios (the two products of a round run back to
back, so that ratio is the least disturbed by load swings).

- gmcurv: `gmcurv.operator.CurvatureOperator` (Hessian, the CLI's default batch size
  256) ``matvec`` of a flat float32 vector, exactly what ``gmcurv trace --curvature
  hessian`` calls per probe. W2 (N = 2,048) is 8 batches of 256, merged into one
  whole-sample gradient graph before the first product (`CurvatureOperator.prepare`:
  the first batch's graph, scaled by the examples, fits); W1/W3 one batch;
- PyHessian: ``pyhessian.hessian(model, CrossEntropyLoss(), data=(x, y))`` (one
  ``backward(create_graph=True)``), then ``pyhessian.utils.hessian_vector_product``
  through the kept graph, with the same vector as a parameter list.

Both are warmed up (gmcurv's first products build its graphs). Values agree to float32
rounding (``v^T H v`` recorded). `OMP_WAIT_POLICY=PASSIVE` is set for the workload
processes (both libraries in the same process, so measured alike). Writes
``bench/hessian/hvp.json``; load (``uptime``) recorded before and after every workload.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from workloads import WORKLOADS, build  # noqa: E402


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def one(name: str, rounds: int, threads: int) -> dict:
    from pyhessian import hessian
    from pyhessian.utils import hessian_vector_product
    from safetensors.torch import save_file

    from gmcurv.io.data import load_data
    from gmcurv.objective import Objective
    from gmcurv.operator import CurvatureOperator

    torch.set_num_threads(threads)
    w = build(name)
    path = Path(tempfile.mkdtemp()) / f"{name}.safetensors"
    save_file({"inputs": w.x.contiguous(), "targets": w.y.contiguous()}, str(path))
    obj = Objective.build(w.model, "cross_entropy")
    op = CurvatureOperator(obj, load_data(path, None), kind="hessian")
    gen = torch.Generator().manual_seed(0)
    v = torch.randint(0, 2, (op.size,), generator=gen).float().mul_(2).sub_(1)
    peer = hessian(w.model, torch.nn.CrossEntropyLoss(), data=(w.x, w.y), cuda=False)
    vs = [t.clone() for t in op.space.unflatten(v).values()]
    assert [t.shape for t in vs] == [p.shape for p in peer.params]

    def ours() -> float:
        return float(op.matvec(v) @ v)

    def theirs() -> float:
        hv = hessian_vector_product(peer.gradsH, peer.params, vs)
        return float(sum((a * b).sum() for a, b in zip(hv, vs, strict=True)))

    values = {"gmcurv": [ours(), ours()], "pyhessian": [theirs(), theirs()]}  # warm-up
    times: dict[str, list[float]] = {"gmcurv": [], "pyhessian": []}
    fns = {"gmcurv": ours, "pyhessian": theirs}
    for r in range(rounds):
        for lib in ("gmcurv", "pyhessian") if r % 2 == 0 else ("pyhessian", "gmcurv"):
            t0 = time.perf_counter()
            fns[lib]()
            times[lib].append(time.perf_counter() - t0)
    med = {k: statistics.median(t) for k, t in times.items()}
    return {
        "workload": name,
        "n": w.n,
        "params": op.size,
        "batches_first_pass": -(-w.n // op.batch_size),
        "batches_now": len(op.source.prints or []),
        "graph_cached": bool(op.graphs.graphs),
        "median_ms": {k: round(1e3 * t, 3) for k, t in med.items()},
        "min_ms": {k: round(1e3 * min(t), 3) for k, t in times.items()},
        "gmcurv_over_pyhessian": round(med["gmcurv"] / med["pyhessian"], 3),
        "paired_ratio_median": round(statistics.median(paired(times)), 3),
        "vHv": {k: x[-1] for k, x in values.items()},
        "vHv_rel_diff": abs(values["gmcurv"][-1] - values["pyhessian"][-1])
        / abs(values["pyhessian"][-1]),
        "times_ms": {k: [round(1e3 * x, 2) for x in t] for k, t in times.items()},
    }


def paired(times: dict[str, list[float]]) -> list[float]:
    """gmcurv / PyHessian within each round (the two products measured back to back)."""
    return [a / b for a, b in zip(times["gmcurv"], times["pyhessian"], strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workloads", nargs="*", default=list(WORKLOADS))
    ap.add_argument("--out", default=str(HERE / "hvp.json"))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.rounds, args.threads)))
        return
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(args.threads)}
    rows = []
    for name in args.workloads:
        before = uptime()
        cmd = [sys.executable, __file__, "--one", name, "--rounds", str(args.rounds)]
        cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        try:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            row = {"workload": name, "status": "failed", "error": proc.stderr[-1500:]}
        row.update(uptime_before=before, uptime_after=uptime())
        rows.append(row)
        print(name, row.get("median_ms"), row.get("gmcurv_over_pyhessian"), flush=True)
    doc = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": args.threads,
            "cpus": os.cpu_count(),
            "omp_wait_policy": "PASSIVE (both libraries, same process)",
        },
        "rounds": args.rounds,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
