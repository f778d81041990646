"""Head v1 on unseen tasks: Fisher-diagonal gain, the shrinkage baseline, calibrated intervals.

Held-out models (never used for training or model selection):

- ``test-task``: the ``tasks`` zoo's `HELD_OUT_TASKS` (``spiral10``: a 3-arm spiral rotated
  into 10 dims; ``hastie10``: ``Σ x_i² > 9.34`` on 10 Gaussian inputs), every architecture;
- ``test-dataset`` (``digits``) and ``test-arch`` of the ``default`` zoo (the v1 zoo);
- ``calib``: the ``tasks`` zoo's calibration task instances (Gaussian mixtures, random
  teachers, parity; half on unseen architectures).

Per held-out task (and split) the Fisher-diagonal NMAE of the head, of the plug-in and of
the non-learned shrinkage baseline (`baselines.winsorised_diagonal`) on the same 128
gradients, with win rates. The 80 % intervals are fitted on all held-out groups (each task,
the unseen architectures, the calibration instances); the coverage a *new* unseen task can
expect is measured leave-one-group-out: for each group, intervals fitted on the others
(`evaluate.leave_one_group_out`). ``intervals_calib_only`` (fitted on ``calib`` alone,
coverage on the rest) is kept in the JSON for comparison.

Run (writes ``bench/gradmetanet/tasks.json``)::

    python bench/gradmetanet/bench_tasks.py --tasks-zoo DIR --v1-zoo DIR [--head FILE] [--record]

``--record`` stores the intervals, the operating ranges and the per-task Fisher-diagonal
summary in the head file's metadata and regenerates the model card's measured section.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from gmcurv.gradmetanet.calibration import Calibration  # noqa: E402
from gmcurv.gradmetanet.card import update_card  # noqa: E402
from gmcurv.gradmetanet.evaluate import (  # noqa: E402
    DrawErrors,
    evaluate_models,
    fit_intervals,
    leave_one_group_out,
    operating_ranges,
    summarise,
)
from gmcurv.gradmetanet.pretrained import CARD_FILE, load_head, save_head  # noqa: E402
from gmcurv.gradmetanet.zoo import iter_zoo  # noqa: E402
from gmcurv.io.fileio import atomic_write_text  # noqa: E402

OUT = HERE / "tasks.json"


def group_of(r: DrawErrors) -> str:
    """The unseen group a held-out row belongs to: its task, or the unseen architectures, or
    the calibration task instances."""
    if r.split in ("test-task", "test-dataset"):
        return r.dataset
    return "calib (task instances)" if r.split == "calib" else r.split


def task_summaries(rows: list[DrawErrors]) -> dict[str, Any]:
    """Fisher-diagonal (and OBS) summaries per held-out task / split and over all of them."""
    groups: dict[str, list[DrawErrors]] = {}
    for r in rows:
        key = r.dataset if r.split in ("test-task", "test-dataset") else f"{r.split}"
        groups.setdefault(key, []).append(r)
    groups["all"] = list(rows)
    out = {}
    for key, part in groups.items():
        s = summarise(part)
        out[key] = {
            "fisher_diag": s["fisher_diag.nmae"],
            "obs_curv": s["obs_curv.nmae"],
            "n_models": len(part),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks-zoo", type=Path, required=True)
    ap.add_argument("--v1-zoo", type=Path, default=None)
    ap.add_argument("--head", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--rows", type=Path, default=None, help="cache of the evaluated rows (JSON)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    head = load_head(args.head)
    t0 = time.perf_counter()
    test = list(iter_zoo(args.tasks_zoo, ("test-task",)))
    if args.v1_zoo is not None:
        test += list(iter_zoo(args.v1_zoo, ("test-dataset", "test-arch")))
    if args.rows is not None and args.rows.exists():
        saved = json.loads(args.rows.read_text())
        rows = [DrawErrors(**r) for r in saved["rows"]]
        cal_rows = [DrawErrors(**r) for r in saved["cal_rows"]]
    else:
        rows = evaluate_models(head, test)
        cal_rows = evaluate_models(head, list(iter_zoo(args.tasks_zoo, ("calib",))))
        if args.rows is not None:
            dump = {"rows": [asdict(r) for r in rows], "cal_rows": [asdict(r) for r in cal_rows]}
            atomic_write_text(args.rows, json.dumps(dump, allow_nan=True))
    source = (
        f"{len(rows) + len(cal_rows)} held-out models of unseen tasks and architectures (groups: "
        + ", ".join(sorted({group_of(r) for r in rows + cal_rows}))
        + "); a group's coverage is that of the intervals fitted on the *other* groups "
        "(leave-one-group-out: what a new unseen task can expect), `all` pools the groups"
    )
    intervals = leave_one_group_out(rows + cal_rows, group_of, source) if rows else None
    calib_only = fit_intervals(cal_rows, rows, "calib") if cal_rows else None
    res = {
        "head": os.path.relpath(head.path, HERE.parents[1]),  # repo-relative
        "head_version": head.version,
        "date": time.strftime("%Y-%m-%d"),
        "load": list(os.getloadavg()),
        "seconds": time.perf_counter() - t0,
        "tasks": task_summaries(rows),
        "intervals": None if intervals is None else intervals.to_dict(),
        "intervals_calib_only": None if calib_only is None else calib_only.to_dict(),
        "ranges": operating_ranges(rows + cal_rows),
        "n_models": len(rows),
        "n_calib_models": len(cal_rows),
    }
    atomic_write_text(args.out, json.dumps(res, indent=1, allow_nan=True))
    for key, v in res["tasks"].items():
        f = v["fisher_diag"]
        beats = 100 * f.get("head_beats_shrink_share", math.nan)
        print(
            f"{key:14s} models {v['n_models']:4d}  head {f['head']:.3f}  plug {f['plug']:.3f} "
            f"({100 * f['change']:+.1f} %, wins {100 * f['head_better_share']:.0f} %)  "
            f"shrink {f.get('shrink', math.nan):.3f} "
            f"({100 * f.get('shrink_change', math.nan):+.1f} %, head beats it {beats:.0f} %)"
        )
    if intervals is not None:
        for split, per in intervals.coverage.items():
            print(split, {t: round(c["coverage"], 3) for t, c in per.items()})
    if args.record:
        meta = dict(head.meta)
        metrics = dict(meta.get("metrics", {}))
        metrics["tasks"] = {k: res[k] for k in ("tasks", "date", "n_models", "n_calib_models")}
        if intervals is not None:
            metrics["intervals"] = Calibration.to_dict(intervals)
            metrics["ranges"] = res["ranges"]
        meta["metrics"] = metrics
        save_head(head.path, head.model, meta)
        if (
            args.head is None
            or Path(args.head).resolve()
            == (HERE.parents[1] / "sample_models" / "gradmetanet_head.safetensors").resolve()
        ):
            atomic_write_text(CARD_FILE, update_card(CARD_FILE.read_text(), meta))
        print(f"recorded in {head.path}")


if __name__ == "__main__":
    main()
