"""Learned pruning on held-out zoo models: the head's OBS ranking + the exact OBS update,
against exact OBS (+ the same update), masking by the head's saliencies and magnitude.

For every held-out model trained >= 400 steps (``test-arch``, ``test-dataset``), what
``gmcurv saliency --method learned`` computes (`gmcurv.gradmetanet.predict.learned_saliency`
on the model's training data, the head reading 128 random examples; the sweep evaluated on
the dataset's test part): test accuracy after removing 50 / 70 / 90 % of the weights (global).

Run: ``python bench/gradmetanet/bench_learned_prune.py [--cache-dir DIR]`` (writes
``bench/gradmetanet/learned_prune.json`` and prints a markdown table).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from safetensors import safe_open  # noqa: E402

from gmcurv.gradmetanet.predict import learned_saliency  # noqa: E402
from gmcurv.gradmetanet.pretrained import load_head  # noqa: E402
from gmcurv.gradmetanet.zoo import default_cache_dir, iter_zoo, zoo_model  # noqa: E402
from gmcurv.io.data import load_data  # noqa: E402
from gmcurv.objective import Objective  # noqa: E402

LEVELS = (0.5, 0.7, 0.9)
CURVES = ("obs+update", "exact obs+update", "obs", "obd", "magnitude")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=HERE / "learned_prune.json")
    ap.add_argument("--limit", type=int, default=None, help="models per split (evenly spaced)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cache = args.cache_dir or default_cache_dir()
    rows, t0 = [], time.time()
    chosen = []
    for split in ("test-arch", "test-dataset"):
        models = [zm for zm in iter_zoo(cache, (split,)) if zm.step >= 400]
        step = max(1, len(models) // args.limit) if args.limit else 1
        chosen += models[::step][: args.limit]
    head = load_head()
    for zm in chosen:
        ds = zm.spec.dataset
        train = load_data(cache / "data" / f"{ds}.safetensors")
        test = load_data(cache / "test" / f"{ds}.safetensors")
        with safe_open(str(cache / "data" / f"{ds}.safetensors"), "pt") as f:
            x, y = f.get_tensor("inputs"), f.get_tensor("targets")
        obj = Objective.build(zoo_model(zm, x.shape[1], int(y.max()) + 1), "cross_entropy")
        ls = learned_saliency(obj, train, head=head, levels=LEVELS, eval_data=test, batch_size=2048)
        rows.append(
            {
                "name": zm.name,
                "split": zm.spec.split,
                "unpruned": ls.baseline["accuracy"].value,
                "accuracy": {
                    c: [p["accuracy"].value for p in ls.sweep[c]] for c in CURVES if c in ls.sweep
                },
            }
        )
        print(f"{time.time() - t0:.0f}s {len(rows)} {zm.name}", file=sys.stderr)
    mean = {
        c: [statistics.fmean(r["accuracy"][c][i] for r in rows) for i in range(len(LEVELS))]
        for c in CURVES
    }
    doc = {
        "levels": LEVELS,
        "n_models": len(rows),
        "unpruned": statistics.fmean(r["unpruned"] for r in rows),
        "mean_accuracy": mean,
        "rows": rows,
        "load": os.getloadavg(),
    }
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"| curve ({len(rows)} held-out models, unpruned {doc['unpruned']:.3f}) | "
          + " | ".join(f"{100 * f:g} %" for f in LEVELS) + " |")  # fmt: skip
    print("|---|" + "---:|" * len(LEVELS))
    for c, v in mean.items():
        print(f"| {c} | " + " | ".join(f"{a:.3f}" for a in v) + " |")


if __name__ == "__main__":
    main()
