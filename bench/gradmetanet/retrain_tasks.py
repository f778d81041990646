"""Does more task diversity close head v1's gap on unseen tasks? One command, one JSON.

Fine-tunes the shipped head v1 on the built part of the ``tasks`` zoo
(`train_tasks_head.py`: the ``tasks`` training groups + the v1 zoo's ``val`` split, model
selection on the ``tasks`` ``val`` split), then evaluates the shipped head and the candidate
side by side with `bench_tasks.py` (Fisher-diagonal NMAE on the same 128 gradients against
the plug-in and the winsorised shrinkage, per held-out set: ``spiral10``, ``hastie10``,
``digits``, the unseen architectures), and writes ``bench/gradmetanet/tasks_retrain.json``
with the numbers and the shipping decision:

ship the candidate only if its spiral10 NMAE is lower than v1's and no held-out set's NMAE
is more than `MATERIAL` (relative) higher than v1's. This script never replaces the shipped
weights; shipping is ``bench_tasks.py --head FILE --record`` after copying the file.

Run::

    python bench/gradmetanet/retrain_tasks.py --tasks-zoo DIR --v1-zoo DIR [--train-groups N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "tasks_retrain.json"
HELD_OUT = ("spiral10", "hastie10", "digits", "test-arch")
MATERIAL = 0.02  # a held-out NMAE more than 2 % (relative) above v1's is a regression


def _run(args: list[str]) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True)


def decide(v1: dict, cand: dict) -> dict:
    """The shipping rule on two `bench_tasks.py` results."""
    rows = {}
    for key in HELD_OUT:
        a, b = v1["tasks"][key]["fisher_diag"], cand["tasks"][key]["fisher_diag"]
        rows[key] = {
            "plug": a["plug"],
            "v1": a["head"],
            "candidate": b["head"],
            "v1_change": a["change"],
            "candidate_change": b["change"],
            "candidate_vs_v1": b["head"] / a["head"] - 1.0,
            "candidate_wins": b["head_better_share"],
            "shrink": a.get("shrink"),
        }
    better = rows["spiral10"]["candidate_vs_v1"] < 0
    worse = [k for k, r in rows.items() if r["candidate_vs_v1"] > MATERIAL]
    return {
        "rows": rows,
        "spiral10_improves": better,
        "regressions": worse,
        "ship": better and not worse,
        "rule": f"spiral10 NMAE lower than v1's and no held-out NMAE more than "
        f"{100 * MATERIAL:.0f} % above v1's",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks-zoo", type=Path, required=True)
    ap.add_argument("--v1-zoo", type=Path, required=True)
    ap.add_argument("--train-groups", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--work", type=Path, default=Path("tasks_retrain_work"))
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cand = args.work / "head_tasks.safetensors"
    zoos = ["--tasks-zoo", str(args.tasks_zoo), "--v1-zoo", str(args.v1_zoo)]
    groups = [] if args.train_groups is None else ["--train-groups", str(args.train_groups)]
    _run([str(HERE / "train_tasks_head.py"), *zoos, *groups, "--epochs", str(args.epochs),
          "--save", str(cand)])  # fmt: skip
    t_train = time.perf_counter() - t0
    _run([str(HERE / "bench_tasks.py"), *zoos, "--out", str(args.work / "v1.json")])
    _run([str(HERE / "bench_tasks.py"), *zoos, "--head", str(cand),
          "--out", str(args.work / "candidate.json")])  # fmt: skip
    v1 = json.loads((args.work / "v1.json").read_text())
    cj = json.loads((args.work / "candidate.json").read_text())
    sys.path.insert(0, str(HERE.parents[1]))
    from gmcurv.gradmetanet.pretrained import read_head_metadata
    from gmcurv.io.fileio import atomic_write_text

    training = read_head_metadata(cand)["training"]
    res = {
        "command": "python bench/gradmetanet/retrain_tasks.py --tasks-zoo DIR --v1-zoo DIR"
        + ("" if args.train_groups is None else f" --train-groups {args.train_groups}")
        + f" --epochs {args.epochs}",
        "date": time.strftime("%Y-%m-%d"),
        "load": list(os.getloadavg()),
        "train_seconds": t_train,
        "seconds": time.perf_counter() - t0,
        "training": {
            "zoo": training["zoo"],
            "best_epoch": training["best_epoch"],
            "val": training["val"],
            "commands": training["commands"],
        },
        **decide(v1, cj),
    }
    atomic_write_text(args.out, json.dumps(res, indent=1, allow_nan=True))
    for key, r in res["rows"].items():
        print(
            f"{key:10s} plug {r['plug']:.3f}  v1 {r['v1']:.3f} ({100 * r['v1_change']:+.1f} %)  "
            f"candidate {r['candidate']:.3f} ({100 * r['candidate_change']:+.1f} %)"
        )
    print("ship" if res["ship"] else "do not ship", res["regressions"], "->", args.out)


if __name__ == "__main__":
    main()
