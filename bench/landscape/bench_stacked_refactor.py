"""Before/after timing of ``gmcurv landscape`` on the bundled samples (issue 15: the stacked
fast path without swapped ``forward``s). Runs the CLI from two source trees, interleaved,
and compares the 'grid' stage timing and the numbers.

    python bench/landscape/bench_stacked_refactor.py OLD_TREE NEW_PYTHON [--steps 21 --reps 3]

OLD_TREE is a source tree run with ``PYTHONPATH=OLD_TREE``; NEW_PYTHON the interpreter of an
environment where the new gmcurv is installed. Both read the same bundled samples
(``sample_models/`` of this repository).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"


def run(tree: str, sample: str, steps: int, out: Path) -> dict:
    """``gmcurv landscape`` from `tree` (a source tree, or a python executable)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    python = tree if Path(tree).is_file() else sys.executable
    if python == sys.executable:
        env["PYTHONPATH"] = tree
    model = SAMPLES / sample
    cmd = [python, "-m", "gmcurv", "landscape", str(model / "model.safetensors"),
           str(model / "data"), "--steps", str(steps), "--json", "-o", str(out),
           "--quiet"]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=tempfile.gettempdir())
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--steps", type=int, default=21)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--samples", default="digits_mlp,tiny_gpt")
    args = ap.parse_args()
    report = {"load": os.getloadavg(), "steps": args.steps, "samples": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for sample in args.samples.split(","):
            times: dict[str, list[float]] = {"old": [], "new": []}
            res = {}
            for _ in range(args.reps):
                for name, tree in (("old", args.old), ("new", args.new)):
                    r = run(tree, sample, args.steps, Path(tmp) / f"{name}.json")
                    times[name].append(r["timings"]["grid"])
                    res[name] = r["results"]["landscape"]
            a, b = res["old"]["grid"]["loss"], res["new"]["grid"]["loss"]
            flat_a = [v for row in a for v in row]
            flat_b = [v for row in b for v in row]
            diff = max(abs(x - y) / max(abs(x), 1e-30) for x, y in zip(flat_a, flat_b, strict=True))
            report["samples"][sample] = {
                "evaluation": [res["old"]["evaluation"], res["new"]["evaluation"]],
                "grid_seconds_old": times["old"],
                "grid_seconds_new": times["new"],
                "median_ratio_new_over_old": statistics.median(times["new"])
                / statistics.median(times["old"]),
                "max_rel_diff_loss": diff,
            }
    report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
