"""In-process before/after timing of the landscape evaluation on the bundled digits_mlp
sample: the old single-module `landscape.py` (swapped ``forward``s, loaded from a file) and
the new package (`gmcurv.landscape`, functional routing), interleaved in one process.

    python bench/landscape/bench_stacked_inprocess.py OLD_LANDSCAPE_PY [--points 400 --reps 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from gmcurv.checkpoint import load_model
from gmcurv.data import load_data
from gmcurv.landscape import evaluate_points, random_directions
from gmcurv.objective import Objective

SAMPLE = Path(__file__).resolve().parents[2] / "sample_models" / "digits_mlp"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("--points", type=int, default=400)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    spec = importlib.util.spec_from_file_location("landscape_old", args.old)
    old = importlib.util.module_from_spec(spec)
    sys.modules["landscape_old"] = old
    spec.loader.exec_module(old)
    lm = load_model(SAMPLE / "model.safetensors")
    data = load_data(SAMPLE / "data")
    objective = Objective.build(lm.model, lm.loss)
    dirs = random_directions(objective.params, 2, seed=0)
    coords = (
        torch.rand(args.points, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        * 2
        - 1
    )
    times: dict[str, list[float]] = {"old": [], "new": []}
    out = {}
    for _ in range(args.reps):
        for name, fn in (("old", old.evaluate_points), ("new", evaluate_points)):
            t0 = time.perf_counter()
            res = fn(objective, data, dirs, coords, batch_size=1024)
            times[name].append(time.perf_counter() - t0)
            out[name] = res
    report = {
        "load": os.getloadavg(),
        "points": args.points,
        "n": data.n,
        "mode": [out["old"].mode, out["new"].mode],
        "seconds_old": times["old"],
        "seconds_new": times["new"],
        "median_ratio_new_over_old": statistics.median(times["new"])
        / statistics.median(times["old"]),
        "max_abs_diff_loss": float((out["old"].loss - out["new"].loss).abs().max()),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
