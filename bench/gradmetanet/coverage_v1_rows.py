"""Coverage of the shipped head's calibrated intervals on the 430 held-out rows of
``results.json`` (the v1 benchmark: every ``test-dataset`` and ``test-arch`` model, its
first set of 128, head and exact values of the Hessian trace and λ_max).

The calibration (fitted on the zoo's ``val`` split by ``gmcurv head eval --record``) is read
from the head; each row's model size comes from its zoo group name (dataset, widths). Prints
the coverage per target and split as JSON; ``--record`` adds it to the head's recorded
coverage under ``v1-benchmark rows (first set)``.

Superseded: since the intervals are fitted on every held-out group
(``bench_tasks.py --record``), these rows (digits and the unseen architectures) are inside
the fit, so their coverage here is in-sample; the honest number is the leave-one-group-out
coverage that ``bench_tasks.py`` records. Do not ``--record`` it any more.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from gmcurv.gradmetanet import calibration as cal  # noqa: E402
from gmcurv.gradmetanet.pretrained import HEAD_FILE, load_head, save_head  # noqa: E402

DIMS = {  # dataset -> (inputs, classes), as built by gmcurv.gradmetanet.zoo.make_dataset
    "digits": (64, 10),
    "breast_cancer": (30, 2),
    "wine": (13, 3),
    "iris": (4, 3),
    "moons": (2, 2),
    "spirals": (2, 3),
    "blobs8": (8, 5),
    "quantiles6": (6, 3),
    "class16": (16, 4),
    "class32": (32, 6),
    "class64": (64, 10),
    "moons20": (20, 2),
}
KEY = "v1-benchmark rows (first set)"


def n_params(name: str, dataset: str) -> int:
    """Parameters of the zoo MLP named ``<split>-<dataset>-<w1xw2..>-<act>-<id>@<step>``."""
    widths_part = name.split(f"-{dataset}-", 1)[1].split("-", 1)[0]
    n_in, n_out = DIMS[dataset]
    sizes = [n_in, *map(int, widths_part.split("x")), n_out]
    return sum((a + 1) * b for a, b in itertools.pairwise(sizes))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    head = load_head()
    c = head.calibration
    if c is None:
        raise SystemExit("the shipped head has no calibration: run gmcurv head eval --record")
    rows = json.loads((HERE / "results.json").read_text())["per_model"]
    out = {}
    for split in ("test-dataset", "test-arch", "all"):
        samples = []
        for r in rows:
            if split != "all" and r["split"] != split:
                continue
            p = n_params(r["name"], r["dataset"])
            for t in ("hessian_trace", "hessian_top"):
                true, pred = r[t]["true"], r[t]["head"]
                if true and true > 0 and pred > 0:
                    samples.append(cal.Sample(t, p, math.log(pred / true)))
        out[split] = cal.coverage(c, samples)
    print(json.dumps(out, indent=1))
    if args.record:
        meta = dict(head.meta)
        iv = dict(meta["metrics"]["intervals"])
        extra = {f"{KEY}: {k}": v for k, v in out.items()}
        iv["coverage"] = {**iv.get("coverage", {}), **extra}
        meta["metrics"] = {**meta["metrics"], "intervals": iv}
        save_head(HEAD_FILE, head.model, meta)


if __name__ == "__main__":
    main()
