"""Head v2's λ_max correction (`gmcurv.gradmetanet.ttop`) on held-out transformers.

    PYTHONPATH=. python bench/gradmetanet/bench_head_v2_top.py [--zoo /work/cache/head/tzoo]

1. the zoo's items (`ttrain.load_items`, cached inputs): every draw of ``b`` = 16
   sequences of every snapshot of every finished group;
2. fit (`ttop.fit_top_correction`) on the ``train`` and ``val`` groups only, penalty and
   shrink by leave-one-*task*-out cross-validation; the fitted correction is written to
   ``--weights`` (the shipped file, ``sample_models/gradmetanet_head_v2_top.json``).
   Which variant is fitted is decided by `select` on the training groups alone, by rules
   fixed before any held-out number of a variant was computed (`RULES`): every candidate
   (`CANDIDATES`: interval calibration x feature clipping) is scored by `ttop.
   nested_calibration` (leave one task out, and leave one architecture out, around the
   whole fit); the held-out numbers of every candidate are reported too (``candidates``),
   never used for the choice;
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
   80 % interval coverage (and where the misses fall: truth below / above), mean interval
   width; JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from gmcurv.gradmetanet.tbaselines import equal_cost
from gmcurv.gradmetanet.tfeatures import extract
from gmcurv.gradmetanet.ttop import (
    CALIBRATIONS,
    FEATURES,
    TopCorrection,
    fit_top_correction,
    nested_calibration,
    tset_features,
)
from gmcurv.gradmetanet.ttrain import held_out, item_top_features, load_items, zoo_sets

BASELINES = ("plugin_seq", "plugin", "mc_equal_time", "hutch_lanczos_equal_time")
TIE = 1e-6
CANDIDATES = tuple({"calibration": c, "clip": k} for k in (False, True) for c in CALIBRATIONS)
RULES = (
    "point model: clip=True (features clamped to the training range) ships only if it lowers "
    "both the nested leave-one-task-out and the nested leave-one-architecture-out mean |ln "
    "error| on the train/val groups by >= 1 % relative; otherwise clip=False",
    "interval: among the calibrations of the chosen point model whose nested "
    "leave-one-task-out coverage is within 75-85 %, the one with the smallest mean width; "
    "if none, the one closest to 80 %",
)


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
    out["truth_below_interval"] = statistics.fmean(r["truth"] < r["lo"] for r in rows)
    out["truth_above_interval"] = statistics.fmean(r["truth"] > r["hi"] for r in rows)
    out["interval_log_width"] = statistics.fmean(math.log(r["hi"] / r["lo"]) for r in rows)
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
    for zs in zoo_sets(zoo, keep=held_out):
        spec, m, obj, batch, r = zs.spec, zs.meta, zs.objective, zs.batch, zs.draw
        t0 = time.perf_counter()
        s = extract(obj, batch)
        lam, lo, hi = corr.predict(s.seq_top, tset_features(s))
        t_head = time.perf_counter() - t0
        t_bwd = backward_seconds(obj, batch)
        ec = equal_cost(obj, batch, zs.data(), t_head, seed=7 + r)
        rows.append(
            {
                "gid": spec.gid, "split": spec.split, "family": spec.family,
                "task": spec.task, "step": m["step"], "draw": r,
                "truth": m["hessian_top"], "head": lam, "lo": lo, "hi": hi,
                "plugin_seq": s.seq_top, "plugin": s.plug_top, "phi": tset_features(s),
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
                "phi": item_top_features(it),
                "mc_equal_time": o["top"]["mc_equal_time"],
                "hutch_lanczos_equal_time": o["top"]["hutch_lanczos_equal_time"],
                "hvps": o["hvps"], "mc_samples": o["mc_samples"],
            }
        )  # fmt: skip
    return rows


def _key(c: dict) -> str:
    return f"{c['calibration']}{'+clip' if c['clip'] else ''}"


def arch_of(gid: str) -> str:
    """``L<blocks>d<width>`` from a zoo group id (the leave-one-architecture-out groups)."""
    return next(p for p in gid.split("-") if p.startswith("L")).split("h")[0]


def select(fit_items) -> tuple[dict, dict]:
    """The shipped variant by `RULES`, from nested scores on the training groups only."""
    phi = [item_top_features(it) for it in fit_items]
    y = [math.log(it.top / it.inp.seq_top) for it in fit_items]
    tasks = [it.task for it in fit_items]
    archs = [arch_of(it.gid) for it in fit_items]
    scores = {}
    for c in CANDIDATES:
        key = _key(c)
        t = nested_calibration(phi, y, tasks, **c)
        a = nested_calibration(phi, y, tasks, outer=archs, **c)
        scores[key] = {
            **c,
            "task_out": {"error": t.error, "coverage": t.coverage, "width": t.width},
            "arch_out": {"error": a.error, "coverage": a.coverage, "width": a.width},
        }
    base = scores["global"]
    clip = all(
        scores["global+clip"][k]["error"] <= 0.99 * base[k]["error"]
        for k in ("task_out", "arch_out")
    )
    pool = [v for v in scores.values() if v["clip"] == clip]
    ok = [v for v in pool if 0.75 <= v["task_out"]["coverage"] <= 0.85]
    pick = (
        min(ok, key=lambda v: v["task_out"]["width"])
        if ok
        else min(pool, key=lambda v: abs(v["task_out"]["coverage"] - 0.8))
    )
    return {"calibration": pick["calibration"], "clip": pick["clip"]}, scores


def candidate_heldout(rows: list[dict], fit_items, trained_on: dict) -> dict:
    """Every candidate's held-out error and coverage (reported, never used to choose)."""
    phi = [item_top_features(it) for it in fit_items]
    y = [math.log(it.top / it.inp.seq_top) for it in fit_items]
    out = {}
    for c in CANDIDATES:
        corr = fit_top_correction(phi, y, [it.task for it in fit_items], trained_on=trained_on, **c)
        per: dict[str, list[tuple[float, bool]]] = {}
        for r in rows:
            lam, lo, hi = corr.predict(r["plugin_seq"], r["phi"])
            e = (logerr(lam, r["truth"]), lo <= r["truth"] <= hi)
            for k in ("all-test", r["split"], f"{r['split']}:{r['family']}"):
                per.setdefault(k, []).append(e)
        out[_key(c)] = {
            k: {
                "error": statistics.fmean(e for e, _ in v),
                "coverage": statistics.fmean(i for _, i in v),
            }
            for k, v in sorted(per.items())
            if k != "test-task:tiny" and k != "test-arch:tiny"
        }
    return out


def trace_analogue(items) -> dict:
    """The same fit for the trace: ``(tr H - tr Ĝ) / tr Ĝ`` (``tr R`` relative to the
    plug-in) on the training sets whose truth is pinned, penalty and shrink by
    leave-one-task-out CV; relative errors on the pinned held-out sets."""
    pinned = [it for it in items if it.trace_se <= 0.1 * abs(it.trace)]
    fit_items = [it for it in pinned if it.split in ("train", "val")]
    corr = fit_top_correction(
        [item_top_features(it) for it in fit_items],
        [(it.trace - it.inp.plug_trace) / it.inp.plug_trace for it in fit_items],
        [it.task for it in fit_items],
    )
    test = [it for it in pinned if it.split.startswith("test")]
    e_head, e_plug = [], []
    for it in test:
        pred = it.inp.plug_trace * (1 + corr.log_ratio(item_top_features(it)))
        e_head.append(abs(pred - it.trace) / abs(it.trace))
        e_plug.append(abs(it.inp.plug_trace - it.trace) / abs(it.trace))
    return {
        "what": "ridge on φ for (tr H - tr Ĝ)/tr Ĝ, CV-shrunk (held-out, truth pinned)",
        "shrink": corr.shrink,
        "penalty": corr.penalty,
        "sets": len(test),
        "head": {"mean": statistics.fmean(e_head), "median": statistics.median(e_head)},
        "plugin": {"mean": statistics.fmean(e_plug), "median": statistics.median(e_plug)},
    }


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
    chosen, scores = select(fit_items)
    corr = fit_top_correction(
        phi, y, [it.task for it in fit_items], trained_on=trained_on, **chosen
    )
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
        "selection": {
            "rules": RULES,
            "chosen": chosen,
            "nested_on_training_groups": scores,
            "heldout_of_every_candidate": candidate_heldout(rows, fit_items, trained_on),
        },
        "zoo": {"groups": len({it.gid for it in items}), "sets": len(items)},
        "trace_analogue": trace_analogue(items),
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
            "truth_below_interval": v["truth_below_interval"],
            "truth_above_interval": v["truth_above_interval"],
        }
        for k, v in result["summary"].items()
    }
    shipped = {
        **corr.to_dict(),
        "heldout": heldout,
        "selection": {"rules": RULES, "chosen": chosen, "nested": scores[_key(chosen)]},
        "made_by": result["command"],
    }
    Path(args.weights).write_text(json.dumps(shipped, indent=1))
    for k, v in result["summary"].items():
        line = {m: round(v[m]["mean"], 3) for m in ("head", *BASELINES)}
        print(k, v["n"], line, f"cov {v['coverage_80']:.2f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
