"""GradMetaNet head benchmark: learned curvature from b = 128 gradients vs the baselines.

On the held-out zoo models (``test-dataset``: every digits model, a dataset the head never
saw; ``test-arch``: architectures it never saw, on its training datasets) and on the bundled
sample ``digits_mlp`` (64-128-64-10 ReLU, wider than any zoo model):

1. ``accuracy``: the head against the plug-in closed form on the same b gradients, vs the
   exact large-sample truth — Fisher diagonal (normalised MAE) and trace, OBS curvature;
   Hessian trace and top eigenvalue against the Fisher proxy of the set (per draw; every
   draw of every model). Broken down by dataset, training length and activation.
2. ``equal-compute``: Hessian trace and top eigenvalue against Hutchinson (2 probes x 64
   examples) and Lanczos (8 iterations x 16 examples), i.e. 128 example-level
   Hessian-vector products — the head's budget is 128 example gradients (an HVP costs
   about two gradients, so this favours the baselines) — plus 10x-budget runs for context
   (Hutchinson 10 probes x 128 examples, Lanczos 10 iterations x 128 examples).
3. ``pruning``: test accuracy after removing 50 % of the weights by OBD saliency
   ``½ F_qq w_q²`` with ``F_qq`` from the head, the plug-in (same 128 gradients) and the
   large-sample truth (and magnitude for context).
4. ``timing``: wall time of each estimator on one model (median over models).

Run: ``flock /tmp/gmcurv-bench.lock python bench/gradmetanet/bench_gradmetanet.py``
(writes ``bench/gradmetanet/results.json``; ``--markdown`` prints the RESULTS tables).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from gmcurv.batch import Batch  # noqa: E402
from gmcurv.capture import Capturer, capture_all  # noqa: E402
from gmcurv.fisher import fisher_diagonal  # noqa: E402
from gmcurv.gradmetanet.evaluate import evaluate_models, summarise  # noqa: E402
from gmcurv.gradmetanet.features import check_supported, encode, gradient_set, plug_in  # noqa: E402
from gmcurv.gradmetanet.model import decode  # noqa: E402
from gmcurv.gradmetanet.predict import predict_curvature  # noqa: E402
from gmcurv.gradmetanet.pretrained import load_head  # noqa: E402
from gmcurv.gradmetanet.zoo import default_cache_dir, iter_zoo, zoo_model  # noqa: E402
from gmcurv.io.data import load_data  # noqa: E402
from gmcurv.lanczos import lanczos  # noqa: E402
from gmcurv.objective import Objective  # noqa: E402
from gmcurv.operator import CurvatureOperator  # noqa: E402
from gmcurv.pruning import apply_masks, evaluate, select_masks  # noqa: E402
from gmcurv.stochastic import hutchinson  # noqa: E402

SPLITS = ("test-dataset", "test-arch")


def write_subset(path: Path, x: torch.Tensor, y: torch.Tensor):
    save_file({"inputs": x.contiguous(), "targets": y.contiguous()}, str(path))
    return load_data(path)


def relerr(pred: float, true: float) -> float:
    return abs(pred - true) / abs(true) if true and math.isfinite(true) else math.nan


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# -------------------------------------------------------------------------- per-model runs
def model_extras(head, zm, cache: Path, tmp: Path, seed: int) -> dict:
    """Equal-compute baselines, pruning and timings for one held-out model (its first draw)."""
    ds = zm.spec.dataset
    with safe_open(str(cache / "data" / f"{ds}.safetensors"), "pt") as f:
        x, y = f.get_tensor("inputs").double(), f.get_tensor("targets")
    n_classes = int(y.max()) + 1
    model = zoo_model(zm, x.shape[1], n_classes)
    obj = Objective.build(model, "cross_entropy")
    draw = zm.draws[0]
    idx = draw.index
    out: dict = {"name": zm.name, "split": zm.spec.split, "dataset": ds}
    t_h, t_top = zm.scalars["hessian_trace"], zm.scalars["hessian_top"]

    # equal compute: 128 example-level HVPs
    sub64 = write_subset(tmp / "s64.safetensors", x[idx[:64]], y[idx[:64]])
    sub16 = write_subset(tmp / "s16.safetensors", x[idx[:16]], y[idx[:16]])
    sub128 = write_subset(tmp / "s128.safetensors", x[idx], y[idx])
    op64 = CurvatureOperator(obj, sub64, 64)
    hut, t_hut = timed(lambda: hutchinson(op64.matvec, op64.size, 2, seed=seed))
    op16 = CurvatureOperator(obj, sub16, 16)
    lan, t_lan = timed(
        lambda: lanczos(op16.matvec, op16.size, 1, which="LA", max_iters=8, seed=seed, tol=0.0)
    )
    op128 = CurvatureOperator(obj, sub128, 128)
    hut10 = hutchinson(op128.matvec, op128.size, 10, seed=seed)
    lan10 = lanczos(op128.matvec, op128.size, 1, which="LA", max_iters=10, seed=seed, tol=0.0)
    out["step"] = zm.step
    out["hessian_trace"] = {
        "true": t_h,
        "fisher_proxy": draw.plug.trace,
        "hutchinson_2x64": hut.value,
        "hutchinson_10x128": hut10.value,
    }
    out["hessian_top"] = {
        "true": t_top,
        "fisher_proxy": draw.plug.top,
        "lanczos_8x16": float(lan.values[0]),
        "lanczos_10x128": float(lan10.values[0]),
    }

    # the head and the plug-in on the same 128 gradients, timed end to end
    batch = Batch(x[idx], y[idx], 0)

    def run_plug():
        dg = Capturer(obj, "empirical")(batch)
        return fisher_diagonal(dg)

    def run_head():
        dg = Capturer(obj, "empirical")(batch)
        chain = check_supported(obj)
        inp = encode(gradient_set(dg, chain, obj.params), plug_in(dg, chain))
        with torch.no_grad():
            return decode(inp, head.model(inp)), chain

    plug_diag, t_plug = timed(run_plug)
    (pred, chain), t_head = timed(run_head)
    out["hessian_trace"]["head"] = float(pred.scalars[1])
    out["hessian_top"]["head"] = float(pred.scalars[2])
    full = write_subset(tmp / "full.safetensors", x, y)

    def run_truth():
        return fisher_diagonal(capture_all(obj, full, 2048))

    _, t_truth = timed(run_truth)
    op_full = CurvatureOperator(obj, full, 2048)
    _, t_lan_full = timed(
        lambda: lanczos(op_full.matvec, op_full.size, 1, which="LA", tol=1e-4, seed=seed)
    )
    out["seconds"] = {
        "head": t_head,
        "plug_in_diag": t_plug,
        "truth_diag_all_examples": t_truth,
        "hutchinson_2x64": t_hut,
        "lanczos_8x16": t_lan,
        "truth_top_lanczos_all_examples": t_lan_full,
    }

    # pruning 50 % of the weights by OBD saliency
    with safe_open(str(cache / "test" / f"{ds}.safetensors"), "pt") as f:
        xt, yt = f.get_tensor("inputs").double(), f.get_tensor("targets")
    test = write_subset(tmp / "test.safetensors", xt, yt)
    weights = {k: v.detach() for k, v in obj.params.items()}
    prunable = list(chain.weights)
    head_diag = {w: pred.param[l][..., 0] for l, w in enumerate(chain.weights)}
    true_diag = {w: zm.targets[f"fisher_diag.{w}"] for w in prunable}
    sources = {
        "head": head_diag,
        "plug_in": {w: plug_diag[w].double() for w in prunable},
        "truth": true_diag,
    }
    n_prune = round(0.5 * sum(weights[w].numel() for w in prunable))
    prune = {}
    base = evaluate(obj, test)
    prune["unpruned"] = base.accuracy.value
    for name, diag in sources.items():
        sal = {w: 0.5 * diag[w].double() * weights[w].double() ** 2 for w in prunable}
        masks = select_masks(sal, n_prune)
        ev = evaluate(obj, test, params=apply_masks(weights, masks))
        prune[name] = ev.accuracy.value
    masks = select_masks({w: weights[w].abs() for w in prunable}, n_prune)
    prune["magnitude"] = evaluate(obj, test, params=apply_masks(weights, masks)).accuracy.value
    out["prune50_accuracy"] = prune
    return out


# ------------------------------------------------------------------------------ sample model
def sample_model_check(head, seeds: int = 5) -> dict:
    """The bundled digits MLP (64-128-64-10): head vs plug-in vs the truth on its 1,024
    training examples, over several random sets of 128."""
    from gmcurv.gradmetanet.targets import compute_targets
    from gmcurv.io.checkpoint import load_model
    from gmcurv.io.samples import sample_data, sample_model

    lm = load_model(sample_model(), dtype=torch.float64)
    data = load_data(sample_data())
    obj = Objective.build(lm.model, lm.loss)
    tg, _ = compute_targets(obj, data, batch_size=1024)
    rows = []
    for s in range(seeds):
        lc = predict_curvature(obj, data, 128, seed=s, head=head)
        num_h = den = num_p = 0.0
        for k, t in tg.fisher_diag.items():
            num_h += float((lc.fisher_diag[k] - t).abs().sum())
            num_p += float((lc.plug_diag[k] - t).abs().sum())
            den += float(t.abs().sum())
        rows.append(
            {
                "seed": s,
                "fisher_diag_nmae": {"head": num_h / den, "plug_in": num_p / den},
                "fisher_trace_relerr": {
                    "head": relerr(lc.fisher_trace.value, tg.fisher_trace),
                    "plug_in": relerr(lc.plug.trace, tg.fisher_trace),
                },
                "hessian_trace_relerr": {
                    "head": relerr(lc.hessian_trace.value, tg.hessian_trace),
                    "fisher_proxy": relerr(lc.plug.trace, tg.hessian_trace),
                },
                "hessian_top_relerr": {
                    "head": relerr(lc.hessian_top.value, tg.hessian_top),
                    "fisher_proxy": relerr(lc.plug.top, tg.hessian_top),
                },
                "seconds": lc.seconds,
            }
        )
    return {
        "truth": {
            "fisher_trace": tg.fisher_trace,
            "hessian_trace": tg.hessian_trace,
            "hessian_top": tg.hessian_top,
        },
        "draws": rows,
    }


# ------------------------------------------------------------------------------- aggregation
def mean(v):
    v = [x for x in v if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else math.nan


def breakdown(rows, key) -> dict:
    groups = defaultdict(list)
    for r in rows:
        groups[key(r)].append(r)
    return {str(k): summarise(v) for k, v in sorted(groups.items())}


def _scores(rows: list[dict], key: str, names: tuple[str, ...]) -> dict:
    """Mean / median relative error and |ln(pred/true)| per estimator (non-positive
    estimates have no log-ratio: counted in ``n_nonpositive``)."""
    out = {}
    for name in names:
        rel, logs, bad = [], [], 0
        for r in rows:
            t, v = r[key]["true"], r[key][name]
            if not (t and math.isfinite(t) and t > 0):
                continue
            rel.append(abs(v - t) / t)
            if v > 0:
                logs.append(abs(math.log(v / t)))
            else:
                bad += 1
        out[name] = {
            "relerr_mean": mean(rel),
            "relerr_median": statistics.median(rel) if rel else math.nan,
            "logerr_mean": mean(logs),
            "logerr_median": statistics.median(logs) if logs else math.nan,
            "n": len(rel),
            "n_nonpositive": bad,
        }
    return out


def aggregate_extras(extras: list[dict]) -> dict:
    out = {}
    for split in (*SPLITS, "all"):
        rs = [e for e in extras if split in ("all", e["split"])]
        if not rs:
            continue
        trained = [r for r in rs if r["step"] >= 400]
        out[split] = {
            "n_models": len(rs),
            "hessian_trace": _scores(
                rs,
                "hessian_trace",
                ("head", "fisher_proxy", "hutchinson_2x64", "hutchinson_10x128"),
            ),
            "hessian_top": _scores(
                rs, "hessian_top", ("head", "fisher_proxy", "lanczos_8x16", "lanczos_10x128")
            ),
            "prune50_accuracy": {
                k: mean([r["prune50_accuracy"][k] for r in rs])
                for k in ("unpruned", "head", "plug_in", "truth", "magnitude")
            },
            "prune50_accuracy_trained": {
                "n_models": len(trained),
                **{
                    k: mean([r["prune50_accuracy"][k] for r in trained])
                    for k in ("unpruned", "head", "plug_in", "truth", "magnitude")
                },
            },
            "seconds_median": {
                k: statistics.median([r["seconds"][k] for r in rs]) for k in rs[0]["seconds"]
            },
        }
    return out


# ---------------------------------------------------------------------------------- markdown
LABELS = {
    "fisher_diag.nmae": "Fisher diagonal · NMAE",
    "obs_curv.nmae": "OBS curvature · NMAE",
    "fisher_trace.logerr": "Fisher trace (scalar head) · mean abs ln-ratio",
    "fisher_trace.relerr": "Fisher trace (scalar head) · mean rel. error",
    "fisher_trace_from_diag.logerr": "Fisher trace as Σ diagonal · mean abs ln-ratio",
    "fisher_trace_from_diag.relerr": "Fisher trace as Σ diagonal · mean rel. error",
    "hessian_trace.logerr": "Hessian trace · mean abs ln-ratio",
    "hessian_trace.relerr": "Hessian trace · mean rel. error",
    "hessian_top.logerr": "Hessian λ_max · mean abs ln-ratio",
    "hessian_top.relerr": "Hessian λ_max · mean rel. error",
}


def _f(x: float, d: int = 3) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.{d}f}"


def markdown(result: dict) -> str:
    """The RESULTS.md tables from a results.json document."""
    lines = []
    acc = result["accuracy"]
    for split, summary in acc["by_split"].items():
        lines += [
            f"#### {split}: head vs baseline on the same 128 gradients",
            "",
            "| target | head | baseline | change | head median | baseline median | head closer | "
            "baseline |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for m, v in summary.items():
            lines.append(
                f"| {LABELS.get(m, m)} | {_f(v['head'])} | {_f(v['plug'])} | "
                f"{100 * v['change']:+.1f} % | {_f(v['head_median'])} | {_f(v['plug_median'])} | "
                f"{100 * v['head_better_share']:.0f} % | {v['baseline']} |"
            )
        lines.append("")
    lines += [
        "#### Fisher diagonal NMAE by subgroup (both held-out splits)",
        "",
        "| group | head | plug-in | change | draws |",
        "|---|---:|---:|---:|---:|",
    ]
    for title, key in (
        ("dataset", "by_dataset"),
        ("steps", "by_step"),
        ("activation", "by_activation"),
        ("linear layers", "by_depth"),
    ):
        for g, summary in acc[key].items():
            v = summary["fisher_diag.nmae"]
            lines.append(
                f"| {title} {g} | {_f(v['head'])} | {_f(v['plug'])} | "
                f"{100 * v['change']:+.1f} % | {v['n_draws']} |"
            )
    lines.append("")
    ec = result["equal_compute_pruning_timing"]
    for split, v in ec.items():
        lines += [
            f"#### {split}: Hessian estimators ({v['n_models']} models, first draw each)",
            "",
            "| target | estimator | mean abs ln-ratio | median | mean rel. error | median | "
            "non-positive |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for key, label in (("hessian_trace", "tr H"), ("hessian_top", "λ_max H")):
            for name, s in v[key].items():
                lines.append(
                    f"| {label} | {name} | {_f(s['logerr_mean'])} | {_f(s['logerr_median'])} | "
                    f"{_f(s['relerr_mean'])} | {_f(s['relerr_median'])} | {s['n_nonpositive']} |"
                )
        p, pt = v["prune50_accuracy"], v["prune50_accuracy_trained"]
        lines += [
            "",
            "| test accuracy after 50 % OBD pruning | unpruned | head | plug-in | truth | "
            "magnitude |",
            "|---|---:|---:|---:|---:|---:|",
            f"| all {v['n_models']} models | {_f(p['unpruned'])} | {_f(p['head'])} | "
            f"{_f(p['plug_in'])} | {_f(p['truth'])} | {_f(p['magnitude'])} |",
            f"| {pt['n_models']} models trained >= 400 steps | {_f(pt['unpruned'])} | "
            f"{_f(pt['head'])} | {_f(pt['plug_in'])} | {_f(pt['truth'])} | {_f(pt['magnitude'])} |",
            "",
            "| wall time (median, s) | " + " | ".join(v["seconds_median"]) + " |",
            "|---|" + "---:|" * len(v["seconds_median"]),
            "| | " + " | ".join(_f(x, 4) for x in v["seconds_median"].values()) + " |",
            "",
        ]
    sm = result["sample_model"]
    lines += [
        "#### bundled sample digits_mlp (64-128-64-10 ReLU, width 128 > any zoo model)",
        "",
        f"truth on its 1,024 examples: tr F {sm['truth']['fisher_trace']:.4g}, "
        f"tr H {sm['truth']['hessian_trace']:.4g}, λ_max H {sm['truth']['hessian_top']:.4g}",
        "",
        "| seed | diag NMAE head | plug-in | tr F rel. head | plug-in | tr H rel. head | "
        "Fisher proxy | λ_max rel. head | Fisher proxy |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sm["draws"]:
        cells = [
            r["fisher_diag_nmae"]["head"],
            r["fisher_diag_nmae"]["plug_in"],
            r["fisher_trace_relerr"]["head"],
            r["fisher_trace_relerr"]["plug_in"],
            r["hessian_trace_relerr"]["head"],
            r["hessian_trace_relerr"]["fisher_proxy"],
            r["hessian_top_relerr"]["head"],
            r["hessian_top_relerr"]["fisher_proxy"],
        ]
        lines.append(f"| {r['seed']} | " + " | ".join(_f(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    ap.add_argument("--head", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=HERE / "results.json")
    ap.add_argument("--max-models", type=int, default=None, help="per split (quick runs)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--markdown", action="store_true", help="print tables from --out and exit")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.out.read_text())), end="")
        return
    torch.set_num_threads(args.threads)
    head = load_head(args.head)
    models = list(iter_zoo(args.cache_dir, SPLITS))
    if args.max_models:
        keep, seen = [], defaultdict(int)
        for zm in models:
            if seen[zm.spec.split] < args.max_models:
                keep.append(zm)
                seen[zm.spec.split] += 1
        models = keep
    t0 = time.time()
    rows = evaluate_models(head, models)
    accuracy = {
        "by_split": {s: summarise([r for r in rows if r.split == s]) for s in SPLITS},
        "all": summarise(rows),
        "by_dataset": breakdown(rows, lambda r: r.dataset),
        "by_step": breakdown(rows, lambda r: r.step),
        "by_activation": breakdown(rows, lambda r: r.activation),
        "by_depth": breakdown(rows, lambda r: len(r.widths) + 1),
    }
    extras = []
    with tempfile.TemporaryDirectory() as d:
        for i, zm in enumerate(models):
            extras.append(model_extras(head, zm, args.cache_dir, Path(d), args.seed))
            if (i + 1) % 50 == 0:
                print(f"{i + 1}/{len(models)} models, {time.time() - t0:.0f}s", flush=True)
    sample = sample_model_check(head)
    result = {
        "head": os.path.relpath(head.path, HERE.parents[1]),  # repo-relative
        "head_version": head.version,
        "n_models": len(models),
        "accuracy": accuracy,
        "equal_compute_pruning_timing": aggregate_extras(extras),
        "sample_model": sample,
        "per_model": extras,
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": args.threads,
            "platform": platform.platform(),
        },
        "seconds": time.time() - t0,
    }
    args.out.write_text(json.dumps(result, indent=1, allow_nan=True) + "\n")
    print(f"wrote {args.out} ({len(models)} models, {time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
