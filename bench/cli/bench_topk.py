"""Default ``gmcurv trace`` (top-5 Fisher eigenvalues) against the trace alone (``--k 0``)
on W1-W3, whole commands, with the eigenvalues checked against a dense float64 oracle.

Each command runs in its own process (``python -m gmcurv trace ... -q -o report.json``),
rounds interleaved (default, ``--k 0``, ... in alternating order); compute = the report's
own stage timings (start-up, load and validation excluded, as in `bench_cli.py`). The
ratio is min(default) / min(``--k 0``) over the rounds, with the median of the per-round
ratios beside it; ``uptime`` load is recorded before and after every round.

Oracle: the same float32 weights and data upcast to float64, the float64 kernel
``K = J J^T`` from the float64 capture, full ``eigvalsh``; the report's top-5 Fisher
eigenvalues must lie within their stated bound (``eigen_tolerance``) plus the float32
kernel's own rounding of it — the table gives the relative differences.

`--baseline-src DIR`: also time another version of gmcurv in the same rounds, for
before/after: ``DIR`` holds its ``gmcurv`` package with ``cli`` and ``sample_models``
copied in (``git archive REV | tar -x -C DIR; cp -r DIR/cli DIR/sample_models
DIR/gmcurv/``), run by this interpreter with ``PYTHONPATH=DIR``.

Run: ``python bench/cli/bench_topk.py [--rounds 5]`` (writes ``bench/cli/results_topk.json``)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "distributed"))

from bench_cli import run_gmcurv  # noqa: E402
from bench_distributed import write_workload  # noqa: E402

WORKLOADS = ("W1", "W2", "W3")
OUT = HERE / "results_topk.json"


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(src: Path, args: list[str], tmp: Path, threads: int | None = None) -> dict:
    """One ``gmcurv`` command (the one in `src`) in its own process: compute time and the
    Fisher results."""
    env = {**os.environ, "GMCURV_NO_CONFIG": "1", "PYTHONPATH": str(src)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    r = run_gmcurv(args, tmp, env)
    fisher = r["results"]["fisher"]
    return {
        "compute": r["compute"],
        "wall": r["wall"],
        "eigenvalues": [e["value"] for e in fisher.get("eigenvalues") or []],
        "residuals": [e.get("residual") for e in fisher.get("eigenvalues") or []],
        "n_matvecs": (fisher.get("eigenvalues") or [{}])[0].get("n_matvecs"),
        "method": (fisher.get("eigenvalues") or [{}])[0].get("method"),
        "eigen_tolerance": fisher.get("eigen_tolerance"),
    }


def oracle(name: str, k: int = 5) -> list[float]:
    """Top-k eigenvalues of ``F`` in float64: the float32 workload upcast, the float64
    capture's kernel ``J J^T`` and a full ``eigvalsh``."""
    import torch
    from workloads import build

    from gmcurv.batch import Batch
    from gmcurv.capture import DecomposedGradients, capture
    from gmcurv.fisher import gram_kernel
    from gmcurv.objective import Objective

    w = build(name, dtype=torch.float64)
    obj = Objective.build(w.model, "cross_entropy")
    parts = [capture(obj, Batch(w.x[i : i + 256], w.y[i : i + 256], i)) for i in range(0, w.n, 256)]
    dg = DecomposedGradients.cat(parts)
    K = gram_kernel(dg)
    return (torch.linalg.eigvalsh(K).flip(0)[:k] / dg.n).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--baseline-src", type=Path, default=None, help="another gmcurv (module doc)")
    ap.add_argument("--baseline-label", default=None, help="what the baseline is (e.g. a commit)")
    ap.add_argument("--new-src", type=Path, default=ROOT, help="the gmcurv timed as 'new'")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--no-oracle", action="store_true")
    ap.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS (default: torch's own)"
    )
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gmcurv-bench-topk-"))
    paths = {w: write_workload(w, tmp) for w in WORKLOADS}
    sides = {"new": args.new_src.resolve()}
    if args.baseline_src:
        sides["baseline"] = args.baseline_src.resolve()
    variants = {"default": [], "k0": ["--k", "0"]}
    runs: dict = {s: {w: {v: [] for v in variants} for w in WORKLOADS} for s in sides}
    loads = []
    for r in range(args.rounds):
        before = load()
        for w, (model, data, extra) in paths.items():
            order = list(variants) if r % 2 == 0 else list(variants)[::-1]
            for side, src in sides.items():
                for v in order:
                    cmd = ["trace", str(model), str(data), *extra, *variants[v]]
                    runs[side][w][v].append(run(src, cmd, tmp, args.threads))
        loads.append({"round": r, "before": before, "after": load()})
        print(f"round {r + 1}/{args.rounds} done, load {loads[-1]['after']}", flush=True)
    summary: dict = {}
    for side in sides:
        for w in WORKLOADS:
            d, z = runs[side][w]["default"], runs[side][w]["k0"]
            best_d, best_z = min(x["compute"] for x in d), min(x["compute"] for x in z)
            per_round = [a["compute"] / b["compute"] for a, b in zip(d, z, strict=True)]
            summary.setdefault(side, {})[w] = {
                "default_s": best_d,
                "k0_s": best_z,
                "ratio": best_d / best_z,
                "median_round_ratio": statistics.median(per_round),
                "eigenvalues": d[0]["eigenvalues"],
                "residuals": d[0]["residuals"],
                "n_matvecs": d[0]["n_matvecs"],
                "method": d[0]["method"],
                "eigen_tolerance": d[0]["eigen_tolerance"],
            }
    if not args.no_oracle:
        for w in WORKLOADS:
            ref = oracle(w)
            for side in sides:
                row = summary[side][w]
                row["oracle"] = ref
                row["max_rel_diff_vs_oracle"] = max(
                    abs(a - b) / ref[0] for a, b in zip(row["eigenvalues"], ref, strict=True)
                )
    doc = {
        "what": "default `gmcurv trace` (top-5) vs `trace --k 0`, compute from the report",
        "command": "python bench/cli/bench_topk.py " + " ".join(sys.argv[1:]),
        "rounds": args.rounds,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "baseline": args.baseline_label,
        "load": loads,
        "summary": summary,
        "runs": runs,
    }
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    for side in sides:
        for w in WORKLOADS:
            s = summary[side][w]
            diff = s.get("max_rel_diff_vs_oracle")
            print(
                f"{side:8s} {w}: default {s['default_s'] * 1e3:7.1f} ms  --k 0 "
                f"{s['k0_s'] * 1e3:6.1f} ms  ratio {s['ratio']:.2f}x "
                f"(median {s['median_round_ratio']:.2f}x)  {s['method']} {s['n_matvecs']} "
                + ("" if diff is None else f"max |Δλ|/λ_max vs float64 {diff:.1e}")
            )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
