"""Head v2's λ_max correction (`gmcurv.gradmetanet.ttop`) on held-out transformers.

    PYTHONPATH=. python bench/gradmetanet/bench_head_v2_top.py [--zoo /work/cache/head/tzoo]

1. the zoo's items (`ttrain.load_items`, cached inputs): every draw of ``b`` = 16
   sequences of every snapshot of every finished group;
2. fit (`ttop.fit_top_correction`) on the ``train`` and ``val`` groups only, penalty and
   shrink by leave-one-*task*-out cross-validation; the fitted correction is written to
   ``--weights`` (the shipped file, ``sample_models/gradmetanet_head_v2_top.json``);
3. predict every held-out set (``test-task``: the unseen task ``chars``; ``test-arch``:
   unseen width 48 / depth 3; ``test-hf``: GPT-2 and Llama built by ``transformers``);
4. equal-cost baselines, timed in this process on the same set (`tbaselines.equal_cost`,
   as `bench_head_v2.py` does): the head's wall time ``t`` (capture + features + the
   correction) buys MC-GGN ``⌊t / t_capture⌋`` label draws and Hutchinson / Lanczos
   ``max(1, ⌊t / t_hvp⌋)`` Hessian-vector products; one plain backward of the set is the
   time unit. ``--reuse-baselines`` instead takes the MC-GGN / Lanczos values that
   `bench_head_v2.py` measured with the old head's (longer) time from ``head_v2.json``
   (same ``(group, step, draw)``): more than equal time for the baselines;
5. per split and family: mean / median ``|log|`` error, win rates, gain over each baseline,
   80 % interval coverage; JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from gmcurv.gradmetanet.tbaselines import equal_cost
from gmcurv.gradmetanet.tfeatures import extract
from gmcurv.gradmetanet.ttop import FEATURES, TopCorrection, fit_top_correction, tset_features
from gmcurv.gradmetanet.ttrain import (
    group_files,
    item_top_features,
    load_items,
    read_group,
    snapshot_batches,
    snapshot_objective,
)
from gmcurv.io.data import load_data

BASELINES = ("plugin_seq", "plugin", "mc_equal_time", "hutch_lanczos_equal_time")
TIE = 1e-6


def logerr(p: float, t: float) -> float:
    return abs(math.log(max(p, 1e-3 * t) / t))


def summarize(rows: list[dict]) -> dict:
    errs = {m: [logerr(r[m], r["truth"]) for r in rows] for m in ("head", *BASELINES)}
    out: dict = {"n": len(rows), "models": len({(r["gid"], r["step"]) for r in rows})}
    for m, e in errs.items():
        out[m] = {"mean": statistics.fmean(e), "median": statistics.median(e)}
    for m in BASELINES:
        wins = [h < b * (1 - TIE) for h, b in zip(errs["head"], errs[m], strict=True)]
        out[m]["head_win_rate"] = sum(wins) / len(wins)
        out[m]["head_gain_mean"] = 1 - out["head"]["mean"] / out[m]["mean"]
    out["coverage_80"] = statistics.fmean(r["lo"] <= r["truth"] <= r["hi"] for r in rows)
    if all("seconds" in r for r in rows):
        ratios = [r["seconds"]["head"] / r["seconds"]["backward"] for r in rows]
        out["head_over_backward"] = {"median": statistics.median(ratios), "max": max(ratios)}
    out["hvps_equal_time"] = statistics.median(r["hvps"] for r in rows)
    best = min(BASELINES, key=lambda m: out[m]["mean"])
    out["best_baseline"] = best
    out["gain_over_best"] = 1 - out["head"]["mean"] / out[best]["mean"]
    return out


def backward_seconds(obj, batch) -> float:
    t0 = time.perf_counter()
    obj.per_example_loss(batch).mean().backward()
    for p in obj.params.values():
        p.grad = None
    return time.perf_counter() - t0


def timed_rows(corr: TopCorrection, zoo: Path) -> list[dict]:
    """Every held-out set: the head timed end to end, then the baselines with its time."""
    torch.set_num_threads(1)
    rows = []
    for path in group_files(zoo):
        spec, meta, tensors = read_group(path)
        if not spec.split.startswith("test"):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            for k, m in enumerate(meta):
                obj = snapshot_objective(spec, tensors, k, m["vocab"], Path(tmp))
                for r, batch in enumerate(snapshot_batches(spec, tensors, k, spec.draws, m["n"])):
                    t0 = time.perf_counter()
                    s = extract(obj, batch)
                    lam, lo, hi = corr.predict(s.seq_top, tset_features(s))
                    t_head = time.perf_counter() - t0
                    t_bwd = backward_seconds(obj, batch)
                    f = Path(tmp) / f"set{k}_{r}.safetensors"
                    key = "inputs" if spec.family == "tiny" else "input_ids"
                    save_file({key: batch.inputs.contiguous()}, str(f))
                    ec = equal_cost(obj, batch, load_data(f), t_head, seed=7 + r)
                    rows.append(
                        {
                            "gid": spec.gid, "split": spec.split, "family": spec.family,
                            "task": spec.task, "step": m["step"], "draw": r,
                            "truth": m["hessian_top"], "head": lam, "lo": lo, "hi": hi,
                            "plugin_seq": s.seq_top, "plugin": s.plug_top,
                            "mc_equal_time": ec.mc_top,
                            "hutch_lanczos_equal_time": ec.lanczos_top,
                            "hvps": ec.hvps, "mc_samples": ec.mc_samples,
                            "seconds": {"head": t_head, "backward": t_bwd,
                                        "capture": ec.t_capture, "hvp": ec.t_hvp},
                        }
                    )  # fmt: skip
    return [r for r in rows if r["truth"] > 0]


def reused_rows(corr: TopCorrection, items, baselines: Path) -> list[dict]:
    """Held-out rows with the MC-GGN / Lanczos values of ``head_v2.json`` (module doc)."""
    old = {(r["gid"], r["step"], r["draw"]): r for r in json.loads(baselines.read_text())["rows"]}
    rows = []
    for it in items:
        o = old.get((it.gid, it.step, it.draw))
        if not it.split.startswith("test") or o is None:
            continue
        lam, lo, hi = corr.predict(it.inp.seq_top, item_top_features(it))
        rows.append(
            {
                "gid": it.gid, "split": it.split, "family": it.family, "task": it.task,
                "step": it.step, "draw": it.draw, "truth": it.top, "head": lam, "lo": lo,
                "hi": hi, "plugin_seq": it.inp.seq_top, "plugin": it.inp.plug_top,
                "mc_equal_time": o["top"]["mc_equal_time"],
                "hutch_lanczos_equal_time": o["top"]["hutch_lanczos_equal_time"],
                "hvps": o["hvps"], "mc_samples": o["mc_samples"],
            }
        )  # fmt: skip
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default="/work/cache/head/tzoo")
    ap.add_argument("--baselines", default="bench/gradmetanet/head_v2.json")
    ap.add_argument("--out", default="bench/gradmetanet/head_v2_top.json")
    ap.add_argument("--weights", default="sample_models/gradmetanet_head_v2_top.json")
    ap.add_argument("--reuse-baselines", action="store_true", help="module doc, step 4")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    items = [it for it in load_items(Path(args.zoo)) if it.top > 0 and it.inp.seq_top > 0]
    fit_items = [it for it in items if it.split in ("train", "val")]
    phi = [item_top_features(it) for it in fit_items]
    y = [math.log(it.top / it.inp.seq_top) for it in fit_items]
    ranges = {f: [min(p[k] for p in phi), max(p[k] for p in phi)] for k, f in enumerate(FEATURES)}
    trained_on = {
        "groups": sorted({it.gid for it in fit_items}),
        "tasks": sorted({it.task for it in fit_items}),
        "families": sorted({it.family for it in fit_items}),
        "sets": len(fit_items),
        "b": 16,
        "tokens": 32,
        "feature_ranges": ranges,
    }
    corr = fit_top_correction(phi, y, [it.task for it in fit_items], trained_on=trained_on)
    rows = (
        reused_rows(corr, items, Path(args.baselines))
        if args.reuse_baselines
        else timed_rows(corr, Path(args.zoo))
    )
    splits: dict[str, list[dict]] = {"all-test": rows}
    for r in rows:
        splits.setdefault(r["split"], []).append(r)
        if r["split"] == "test-hf":
            splits.setdefault(f"test-hf:{r['family']}", []).append(r)
    result = {
        "what": "head v2 λ_max: ridge correction of the per-sequence plug-in (ttop), held out",
        "command": "PYTHONPATH=. python bench/gradmetanet/bench_head_v2_top.py",
        "loadavg": os.getloadavg(),
        "correction": corr.to_dict(),
        "equal_cost": "reused from head_v2.json (old head's time: more than equal)"
        if args.reuse_baselines
        else "timed in this run with the head's own time",
        "hvps_equal_time_median": statistics.median(r["hvps"] for r in rows),
        "mc_samples_equal_time_median": statistics.median(r["mc_samples"] for r in rows),
        "summary": {k: summarize(v) for k, v in sorted(splits.items())},
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    heldout = {
        k: {
            "sets": v["n"],
            "mean_abs_log_error": v["head"]["mean"],
            "best_baseline": v["best_baseline"],
            "best_baseline_error": v[v["best_baseline"]]["mean"],
            "coverage": v["coverage_80"],
        }
        for k, v in result["summary"].items()
    }
    shipped = {**corr.to_dict(), "heldout": heldout, "made_by": result["command"]}
    Path(args.weights).write_text(json.dumps(shipped, indent=1))
    for k, v in result["summary"].items():
        line = {m: round(v[m]["mean"], 3) for m in ("head", *BASELINES)}
        print(k, v["n"], line, f"cov {v['coverage_80']:.2f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
