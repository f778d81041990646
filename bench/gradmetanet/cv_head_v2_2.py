"""Training-only nested cross-validation of the head v2.2 candidates (per-family term).

    PYTHONPATH=. python bench/gradmetanet/cv_head_v2_2.py [--zoo DIR] [--out JSON]

Reads only the ``train`` / ``val`` groups of the zoo (a group's spec is read from its
header before anything else; held-out groups are never opened, their inputs never
extracted), and scores every candidate of `bench_head_v2_top.CANDIDATES_V2_2` with every
calibration by `ttop.nested_calibration` around the whole fit (`nested_v2_2`):

- ``task-out``: leave one task out (outer) — an unseen task;
- ``arch-out``: leave one ``L<blocks>d<width>`` out — an unseen size;
- ``famgroup-out``: leave one GPT-2 / Llama *group* out (TinyLM groups always train) —
  whether a family term learned from the other groups of that family carries over;
- ``family-out`` (information): leave a whole family out — the fallback for a family the
  head never saw (family indicators at their training means).

Errors are mean ``|ln λ̂ - ln λ|`` over the held sets, also per family; coverage of the
80 % interval and its mean log width.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_head_v2_top import CANDIDATES_V2_2, nested_v2_2, unpinned_tops

from gmcurv.gradmetanet import ttop
from gmcurv.gradmetanet.ttrain import group_files, group_items, read_spec
from gmcurv.io.fileio import atomic_write_text


def is_training(spec) -> bool:
    return spec.split in ("train", "val")


def training_items(zoo: Path, inputs: Path) -> list:
    """Items of every train / val group of ``zoo`` (inputs cached under ``inputs``) whose
    λ_max truth is pinned (`unpinned_tops`)."""
    inputs.mkdir(parents=True, exist_ok=True)
    bad = unpinned_tops(zoo, is_training)
    items = []
    for path in group_files(zoo):
        if is_training(read_spec(path)):
            items += group_items(path, inputs)
    return [
        it for it in items
        if it.top > 0 and it.inp.seq_top > 0 and (it.gid, it.step) not in bad
    ]  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default="/work/cache/head/tzoo")
    ap.add_argument("--inputs", default="/work/cache/headv2_s18/zoo/inputs")
    ap.add_argument("--out", default="bench/gradmetanet/cv_head_v2_2.json")
    ap.add_argument("--calibrations", default=",".join(ttop.ALL_CALIBRATIONS))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    items = training_items(Path(args.zoo), Path(args.inputs))
    groups = sorted({it.gid for it in items})
    res = {
        "what": "head v2.2 candidates, nested CV on train/val groups only (module doc)",
        "command": "PYTHONPATH=. python bench/gradmetanet/cv_head_v2_2.py",
        "groups": groups,
        "unpinned_truth_excluded": [
            list(k) + v for k, v in unpinned_tops(Path(args.zoo), is_training).items()
        ],
        "sets": len(items),
        "sets_by_family": {f: sum(it.family == f for it in items) for f in ttop.FAMILIES},
        "candidates": {},
    }
    for cand in CANDIDATES_V2_2:
        for cal in args.calibrations.split(","):
            key = f"{cand['name']}/{cal}"
            res["candidates"][key] = sc = nested_v2_2(items, cand, cal)
            cells = []
            for k, v in sc.items():
                fams = " ".join(
                    f"{f[:2]}:{x['error']:.3f}/{100 * x['coverage']:.0f}"
                    for f, x in v["by_family"].items()
                )
                cells.append(f"{k} {v['error']:.3f}/{100 * v['coverage']:.0f}% [{fams}]")
            print(key, " | ".join(cells), flush=True)
    res["seconds"] = time.perf_counter() - t0
    atomic_write_text(Path(args.out), json.dumps(res, indent=1))
    print(len(groups), "groups", len(items), "sets", res["sets_by_family"], file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
