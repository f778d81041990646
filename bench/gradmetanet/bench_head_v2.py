"""Head v2 on held-out transformers against equal-cost baselines (issue 14, items 2-3).

    PYTHONPATH=. python bench/gradmetanet/bench_head_v2.py --zoo /work/cache/head/tzoo \
        --out bench/gradmetanet/head_v2.json [--epochs 30] [--weights PATH]

1. items of every finished zoo group (`gmcurv.gradmetanet.ttrain.load_items`);
2. shrinkage and calibration on shifted data: the ``train`` groups split into folds *by
   task* (leave-tasks-out: each fold's head never saw the tasks it predicts); their
   out-of-fold outputs fix ``α`` (`ttrain.fit_shrink`: how much of the head's correction
   to the plug-in carries over to unseen tasks; α = 0 is the plug-in); the calibration
   residuals are those out-of-fold ones plus the ``val`` groups predicted by the final head;
   80 % intervals = their 10/90 % quantiles (trace: of ``(tr H - pred) / (|pred| + 0.1
   plug)``; λ_max: of ``log(λ / pred)``);
3. an ensemble of heads (`ttrain.train_ensemble`, seeds 0..members-1) trained on all
   ``train`` groups predicts every ``val`` / ``test-*`` item; on the
   same set, timed in the same process, the equal-cost baselines (`tbaselines.equal_cost`)
   and one plain backward of the set's mean loss (the time unit of the issue's target);
4. per split and family: mean / median relative error of ``tr H``, mean / median
   ``|log|`` error of ``λ_max`` (a non-positive estimate is clipped to ``1e-3 λ``), win
   rates, interval coverage, the head's time over one backward; JSON to ``--out``. The
   ``all-test-reliable`` rows keep the held-out sets whose Hutch++ truth has a standard
   error <= 10 % of ``|tr H|`` (near init it is as large as the value: no estimator can be
   scored against it there).
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
from gmcurv.gradmetanet.tlayers import HeadV2Config, HeadV2Input
from gmcurv.gradmetanet.ttrain import (
    TrainV2Config,
    fit_shrink,
    group_files,
    load_items,
    predict,
    read_spec,
    train_ensemble,
    zoo_sets,
)
from gmcurv.gradmetanet.tzoo import SPLITS, LMGroupSpec

METHODS = ("head", "plugin", "mc_equal_time", "hutch_lanczos_equal_time", "plugin_seq")
TIE = 1e-6


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def tr_scale(pred: float, plug: float) -> float:
    return abs(pred) + 0.1 * plug


def calibrate(model_pairs) -> dict:
    """10/90 % quantiles of out-of-fold residuals (see module doc)."""
    r_tr, r_top = [], []
    for model, items in model_pairs:
        for it in items:
            tr, top = predict(model, it.inp)
            r_tr.append((it.trace - tr) / tr_scale(tr, it.inp.plug_trace))
            r_top.append(math.log(it.top / top))
    return {
        "trace": [quantile(r_tr, 0.1), quantile(r_tr, 0.9)],
        "top": [quantile(r_top, 0.1), quantile(r_top, 0.9)],
        "n": len(r_tr),
    }


def rel(p: float, t: float) -> float:
    return abs(p - t) / abs(t)


def logerr(p: float, t: float) -> float:
    return abs(math.log(max(p, 1e-3 * t) / t))


def summarize(rows: list[dict]) -> dict:
    out: dict = {"n": len(rows), "models": len({(r["gid"], r["step"]) for r in rows})}
    for q, err in (("trace", rel), ("top", logerr)):
        errs = {m: [err(r[q][m], r[q]["truth"]) for r in rows] for m in METHODS}
        out[q] = {
            m: {
                "mean": statistics.fmean(e),
                "median": statistics.median(e),
            }
            for m, e in errs.items()
        }
        for m in METHODS[1:]:  # below float32 resolution a difference is a tie, not a win
            wins = [h < b * (1 - TIE) for h, b in zip(errs["head"], errs[m], strict=True)]
            out[q][m]["head_win_rate"] = sum(wins) / len(wins)
            out[q][m]["head_gain_mean"] = 1 - out[q]["head"]["mean"] / out[q][m]["mean"]
        inside = [r[q]["lo"] <= r[q]["truth"] <= r[q]["hi"] for r in rows]
        out[q]["coverage_80"] = sum(inside) / len(inside)
        if q == "trace":
            logs = [
                abs(math.log(r[q]["head"] / r[q]["truth"]))
                for r in rows
                if r[q]["head"] > 0 and r[q]["truth"] > 0
            ]
            out[q]["head"]["mean_abs_log_where_positive"] = statistics.fmean(logs) if logs else None
            out[q]["truth_negative"] = sum(r[q]["truth"] <= 0 for r in rows)
    ratios = [r["seconds"]["head"] / r["seconds"]["backward"] for r in rows]
    out["head_over_backward"] = {"median": statistics.median(ratios), "max": max(ratios)}
    out["hvps_equal_time"] = statistics.median([r["hvps"] for r in rows])
    out["mc_samples_equal_time"] = statistics.median([r["mc_samples"] for r in rows])
    out["truth_trace_rel_stderr_median"] = statistics.median(
        [r["trace"]["truth_se"] / abs(r["trace"]["truth"]) for r in rows]
    )
    return out


def split_rows(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows by split, transformers family, all held-out and held-out with a pinned truth."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["split"], []).append(r)
        if r["split"] == "test-hf":
            groups.setdefault(f"test-hf:{r['family']}", []).append(r)
        if r["split"].startswith("test"):
            groups.setdefault("all-test", []).append(r)
            if r["trace"]["truth_se"] <= 0.1 * abs(r["trace"]["truth"]):
                groups.setdefault("all-test-reliable", []).append(r)
    return groups


def backward_seconds(obj, batch) -> float:
    t0 = time.perf_counter()
    loss = obj.per_example_loss(batch).mean()
    loss.backward()
    for p in obj.params.values():
        p.grad = None
    return time.perf_counter() - t0


def evaluate(model, cal: dict, zoo: Path, splits: tuple[str, ...], use=None) -> list[dict]:
    """One row per held-out item: truth, head, baselines, interval, seconds."""
    torch.set_num_threads(1)
    rows = []

    def keep(spec: LMGroupSpec) -> bool:
        return spec.split in splits and (use is None or spec.gid in use)

    for zs in zoo_sets(zoo, keep=keep):
        spec, m, obj, batch, r = zs.spec, zs.meta, zs.objective, zs.batch, zs.draw
        t0 = time.perf_counter()
        inp = HeadV2Input.from_tset(extract(obj, batch))
        tr, top = predict(model, inp)
        t_head = time.perf_counter() - t0
        t_bwd = backward_seconds(obj, batch)
        ec = equal_cost(obj, batch, zs.data(), t_head, seed=7 + r)
        s_tr = tr_scale(tr, inp.plug_trace)
        rows.append(
            {
                "gid": spec.gid, "split": spec.split, "family": spec.family,
                "task": spec.task, "step": m["step"], "draw": r,
                "n_params": m["n_params"],
                "trace": {
                    "truth": m["hessian_trace"]["value"],
                    "truth_se": m["hessian_trace"]["stderr"] or 0.0,
                    "head": tr, "plugin": inp.plug_trace,
                    "plugin_seq": inp.seq_trace,
                    "mc_equal_time": ec.mc_trace,
                    "hutch_lanczos_equal_time": ec.hutch_trace,
                    "lo": tr + cal["trace"][0] * s_tr,
                    "hi": tr + cal["trace"][1] * s_tr,
                },
                "top": {
                    "truth": m["hessian_top"], "head": top,
                    "plugin": inp.plug_top, "plugin_seq": inp.seq_top,
                    "mc_equal_time": ec.mc_top,
                    "hutch_lanczos_equal_time": ec.lanczos_top,
                    "lo": top * math.exp(cal["top"][0]),
                    "hi": top * math.exp(cal["top"][1]),
                },
                "seconds": {
                    "head": t_head, "backward": t_bwd,
                    "capture": ec.t_capture, "hvp": ec.t_hvp,
                },
                "hvps": ec.hvps, "mc_samples": ec.mc_samples,
            }
        )  # fmt: skip
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default="/work/cache/head/tzoo")
    ap.add_argument("--out", default="bench/gradmetanet/head_v2.json")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--weights", default=None, help="save the trained head here")
    ap.add_argument("--splits", default="val,test-task,test-arch,test-hf")
    ap.add_argument("--members", type=int, default=3, help="heads in the ensemble")
    ap.add_argument("--folds", type=int, default=3, help="leave-tasks-out calibration folds")
    ap.add_argument("--max-groups", type=int, default=None, help="use the first N groups")
    ap.add_argument("--max-draws", type=int, default=8, help="training sets per snapshot")
    ap.add_argument("--resummarize", action="store_true", help="recompute --out's summaries")
    args = ap.parse_args(argv)
    if args.resummarize:  # same rows, summaries from the current `summarize`
        res = json.loads(Path(args.out).read_text())
        res["summary"] = {k: summarize(v) for k, v in sorted(split_rows(res["rows"]).items())}
        Path(args.out).write_text(json.dumps(res, indent=1))
        return 0
    zoo = Path(args.zoo)
    t_start = time.perf_counter()
    files = group_files(zoo)[: args.max_groups] if args.max_groups else group_files(zoo)
    use = {read_spec(f).gid for f in files}
    items = [it for it in load_items(zoo) if it.gid in use]
    train = [it for it in items if it.split == "train" and it.draw < args.max_draws]
    gids = sorted({it.gid for it in train})
    cfg = TrainV2Config(epochs=args.epochs)
    head_cfg = HeadV2Config(channels=12, blocks=1)
    tasks = sorted({it.task for it in train})
    folds = [set(tasks[f :: args.folds]) for f in range(min(args.folds, len(tasks)))]
    pairs = []
    for fold in folds:
        fit = [it for it in train if it.task not in fold]
        held = [it for it in train if it.task in fold]
        pairs.append((train_ensemble(fit, cfg, head_cfg, 1), held))
    shrink = fit_shrink(pairs)
    for m, _ in pairs:
        m.shrink.copy_(torch.tensor(shrink, dtype=torch.float64))
    t_train0 = time.perf_counter()
    model = train_ensemble(train, cfg, head_cfg, args.members)
    model.shrink.copy_(torch.tensor(shrink, dtype=torch.float64))
    t_train = time.perf_counter() - t_train0
    pairs.append((model, [it for it in items if it.split == "val"]))
    cal = calibrate(pairs)
    cal["shrink"] = list(shrink)
    cal["folds"] = [sorted(f) for f in folds]
    splits = tuple(args.splits.split(","))
    rows = evaluate(model, cal, zoo, splits, use)
    groups = split_rows(rows)
    costs = [json.loads(line) for line in (zoo / "cost.jsonl").read_text().splitlines()]
    costs = [c for c in costs if c["gid"] in use]
    specs = [read_spec(f) for f in files]
    result = {
        "what": "head v2 vs equal-cost baselines on held-out transformers (issue 14)",
        "loadavg": os.getloadavg(),
        "zoo": {
            "groups": len(files),
            "groups_by_split": {sp: sum(s.split == sp for s in specs) for sp in SPLITS},
            "train_groups": len(gids),
            "train_items": len(train),
            "train_tasks": tasks,
            "tasks": sorted({s.task for s in specs}),
            "blocks": sorted({s.layers for s in specs}),
            "widths": sorted({s.width for s in specs}),
            "heads": sorted({s.heads for s in specs}),
            "steps": sorted({t for s in specs for t in s.steps}),
            "models": sum(len(s.steps) for s in specs),
            "cpu_seconds": sum(c["cpu_s"] for c in costs),
            "wall_seconds": sum(c["wall_s"] for c in costs),
        },
        "head_config": head_cfg.to_dict(),
        "train_config": cfg.__dict__,
        "members": args.members,
        "max_draws": args.max_draws,
        "train_seconds": t_train,
        "calibration": cal,
        "summary": {k: summarize(v) for k, v in sorted(groups.items())},
        "rows": rows,
        "seconds_total": time.perf_counter() - t_start,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    if args.weights:
        from safetensors.torch import save_file as save

        sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
        meta = {"config": head_cfg.to_dict(), "calibration": cal}
        save(sd, args.weights, metadata={"gmcurv_head_v2": json.dumps(meta)})
    for k, v in result["summary"].items():
        print(k, json.dumps({q: v[q] for q in ("n", "models")}), file=sys.stderr)
        for q in ("trace", "top"):
            line = {m: round(v[q][m]["mean"], 3) for m in METHODS}
            print(f"  {q} mean err {line} cov {v[q]['coverage_80']:.2f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
