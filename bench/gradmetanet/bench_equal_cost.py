"""The MLP head against equal-cost baselines on held-out zoo models (issue 14, item 3).

For every held-out model (``test-arch``: unseen widths and depths; ``test-dataset``: the
unseen ``digits`` task) and its first stored set of ``b`` examples, against the exact
large-sample truth:

- ``head``: the shipped head on the ``b`` gradients, timed end to end (capture, encode,
  forward) — ``t_head``;
- ``plug_in``: the closed forms on the same ``b`` gradients (``tr F``, ``λ_max F``,
  ``diag F``; Fisher proxy for the Hessian targets);
- ``plug_in_eq``: the same closed forms on the largest number of examples ``b' >= b`` of a
  doubling ladder whose wall time is <= ``t_head`` (equal wall time);
- ``ggn``: the GGN (exact Fisher) on the same ``b`` examples (``tr G``, ``λ_max G``; for the
  Hessian targets), and ``ggn_eq`` on ``b'`` examples at equal wall time (same ladder);
- ``hutchinson_eq`` / ``lanczos_eq``: Hutchinson (Rademacher) and Lanczos on the Hessian of
  the same ``b`` examples with as many Hessian-vector products as fit in ``t_head``
  (at least 2).

Captures skip their one-time self-check against autograd (``check=False``) for every
estimator, the head's included. Times are the minimum of 3 runs, measured in this process
interleaved with the head's, on a shared machine (``uptime`` recorded). Scores: mean and
median ``|ln(pred/true)|`` for scalars (non-positive estimates counted apart), NMAE for
the diagonal, the head's win rate against each baseline, and the coverage of the head's
calibrated interval.

Run: ``python bench/gradmetanet/bench_equal_cost.py [--cache-dir DIR] [--limit N]``
(writes ``bench/gradmetanet/equal_cost.json``; ``--markdown`` prints the tables;
``--record`` stores the summary in the shipped head's metadata and regenerates the measured
section of its model card, `gmcurv.gradmetanet.card`).
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
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from gmcurv.batch import Batch  # noqa: E402
from gmcurv.capture import Capturer  # noqa: E402
from gmcurv.fisher import fisher_diagonal, fisher_eigen, fisher_trace  # noqa: E402
from gmcurv.gradmetanet.features import check_supported, encode, gradient_set, plug_in  # noqa: E402
from gmcurv.gradmetanet.model import decode  # noqa: E402
from gmcurv.gradmetanet.pretrained import load_head  # noqa: E402
from gmcurv.gradmetanet.zoo import default_cache_dir, iter_zoo, zoo_model  # noqa: E402
from gmcurv.io.data import load_data  # noqa: E402
from gmcurv.lanczos import lanczos  # noqa: E402
from gmcurv.objective import Objective  # noqa: E402
from gmcurv.operator import CurvatureOperator  # noqa: E402
from gmcurv.stochastic import hutchinson  # noqa: E402

SPLITS = ("test-arch", "test-dataset")
TARGETS = ("fisher_trace", "hessian_trace", "hessian_top")
ESTIMATORS = {
    "fisher_trace": ("head", "plug_in", "plug_in_eq"),
    "hessian_trace": ("head", "plug_in", "plug_in_eq", "ggn", "ggn_eq", "hutchinson_eq"),
    "hessian_top": ("head", "plug_in", "plug_in_eq", "ggn", "ggn_eq", "lanczos_eq"),
    "fisher_diag": ("head", "plug_in", "plug_in_eq"),
}


def timed_min(fn, repeat: int = 3):
    best, out = math.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def nmae(pred: dict, true: dict) -> float:
    num = sum(float((pred[k] - true[k]).abs().sum()) for k in true)
    den = sum(float(true[k].abs().sum()) for k in true)
    return num / den


def ladder(b: int, n: int) -> list[int]:
    out, m = [], b
    while m < n:
        out.append(m)
        m *= 2
    return [*out, n]


def model_run(head, zm, cache: Path, tmp: Path, seed: int = 0) -> dict:
    ds = zm.spec.dataset
    with safe_open(str(cache / "data" / f"{ds}.safetensors"), "pt") as f:
        x, y = f.get_tensor("inputs").double(), f.get_tensor("targets")
    model = zoo_model(zm, x.shape[1], int(y.max()) + 1)
    obj = Objective.build(model, "cross_entropy")
    chain = check_supported(obj)
    idx = zm.draws[0].index
    b, n = len(idx), len(y)
    gen = torch.Generator().manual_seed(seed)
    taken = set(idx.tolist())
    rest = [i for i in torch.randperm(n, generator=gen).tolist() if i not in taken]
    order = torch.cat([idx, torch.tensor(rest, dtype=torch.long)])  # the set first
    batch = Batch(x[idx], y[idx], 0)

    def run_head():
        dg = Capturer(obj, "empirical", check=False)(batch)
        inp = encode(gradient_set(dg, chain, obj.params), plug_in(dg, chain))
        with torch.no_grad():
            return decode(inp, head.model(inp))

    pred, t_head = timed_min(run_head)
    true_diag = {w: zm.targets[f"fisher_diag.{w}"] for w in obj.params}
    truth = {t: zm.scalars.get(t) for t in TARGETS}
    est = {t: {} for t in (*TARGETS, "fisher_diag")}
    head_diag = {}
    for l, w in enumerate(chain.weights):
        head_diag[w] = pred.param[l][..., 0]
        bn = chain.biases[l]
        if bn is not None and pred.bias[l] is not None:
            head_diag[bn] = pred.bias[l][..., 0]
    est["fisher_diag"]["head"] = nmae(head_diag, true_diag)
    for i, t in enumerate(TARGETS):
        est[t]["head"] = float(pred.scalars[i])
    n_params = sum(p.numel() for p in obj.params.values())
    cal = head.calibration
    intervals = {
        t: None if cal is None else cal.interval(t, est[t]["head"], n_params) for t in TARGETS
    }

    # plug-in on the same b gradients, and on b' examples at equal wall time
    def plug(m):
        d = Capturer(obj, "empirical", check=False)(Batch(x[order[:m]], y[order[:m]], 0))
        return fisher_trace(d), float(fisher_eigen(d, k=1).values[0]), fisher_diagonal(d)

    def ggn(m):
        d = Capturer(obj, "exact", check=False)(Batch(x[order[:m]], y[order[:m]], 0))
        return fisher_trace(d), float(fisher_eigen(d, k=1).values[0])

    def equal_time(fn):
        chosen, out, t_used = b, None, None
        for m in ladder(b, n):
            res, t = timed_min(lambda m=m: fn(m), 2)
            if out is None or t <= t_head:
                chosen, out, t_used = m, res, t
            if t > t_head:
                break
        return chosen, out, t_used

    (ptr, ptop, pdiag), t_plug = timed_min(lambda: plug(b))
    est["fisher_trace"]["plug_in"] = est["hessian_trace"]["plug_in"] = ptr
    est["hessian_top"]["plug_in"] = ptop
    est["fisher_diag"]["plug_in"] = nmae({k: v.double() for k, v in pdiag.items()}, true_diag)
    b_plug, (etr, etop, ediag), t_plug_eq = equal_time(plug)
    est["fisher_trace"]["plug_in_eq"] = est["hessian_trace"]["plug_in_eq"] = etr
    est["hessian_top"]["plug_in_eq"] = etop
    est["fisher_diag"]["plug_in_eq"] = nmae({k: v.double() for k, v in ediag.items()}, true_diag)
    (gtr, gtop), t_ggn = timed_min(lambda: ggn(b))
    est["hessian_trace"]["ggn"], est["hessian_top"]["ggn"] = gtr, gtop
    b_ggn, (gtr2, gtop2), t_ggn_eq = equal_time(ggn)
    est["hessian_trace"]["ggn_eq"], est["hessian_top"]["ggn_eq"] = gtr2, gtop2

    # Hutchinson / Lanczos on the Hessian of the same b examples, HVPs within t_head
    path = tmp / "set.safetensors"
    save_file({"inputs": x[idx].contiguous(), "targets": y[idx].contiguous()}, str(path))
    op = CurvatureOperator(obj, load_data(path), b)
    v = torch.randn(op.size, generator=gen, dtype=torch.float64)
    _, t_hvp = timed_min(lambda: op.matvec(v))
    k = max(2, int(t_head // max(t_hvp, 1e-9)))
    est["hessian_trace"]["hutchinson_eq"] = hutchinson(op.matvec, op.size, k, seed=seed).value
    lan = lanczos(op.matvec, op.size, 1, which="LA", max_iters=k, seed=seed, tol=0.0)
    est["hessian_top"]["lanczos_eq"] = float(lan.values[0])
    return {
        "name": zm.name,
        "split": zm.spec.split,
        "dataset": ds,
        "widths": list(zm.spec.widths),
        "step": zm.step,
        "n_params": n_params,
        "b": b,
        "n": n,
        "truth": truth,
        "estimates": est,
        "interval": intervals,
        "budget": {"hvps": k, "b_plug_in_eq": b_plug, "b_ggn_eq": b_ggn},
        "seconds": {
            "head": t_head,
            "plug_in": t_plug,
            "plug_in_eq": t_plug_eq,
            "ggn": t_ggn,
            "ggn_eq": t_ggn_eq,
            "hvp": t_hvp,
        },
    }


def _logerr(v, t):
    if v is None or t is None or not (math.isfinite(t) and t > 0):
        return None
    return abs(math.log(v / t)) if v > 0 else math.inf


def summarise(rows: list[dict]) -> dict:
    out = {}
    for target, names in ESTIMATORS.items():
        errs = {}
        for name in names:
            e = []
            for r in rows:
                v = r["estimates"][target].get(name)
                if target == "fisher_diag":
                    e.append(v)
                else:
                    e.append(_logerr(v, r["truth"][target]))
            errs[name] = e
        table = {}
        for name in names:
            pairs = [(h, x) for h, x in zip(errs["head"], errs[name], strict=True)
                     if h is not None and x is not None]  # fmt: skip
            finite = [x for _, x in pairs if math.isfinite(x)]
            table[name] = {
                "mean": statistics.fmean(finite) if finite else math.nan,
                "median": statistics.median([x for _, x in pairs]) if pairs else math.nan,
                "n": len(pairs),
                "n_nonpositive": sum(not math.isfinite(x) for _, x in pairs),
                "head_win_rate": (sum(h < x for h, x in pairs) / len(pairs)) if pairs else math.nan,
            }
        cover = None
        if target != "fisher_diag":
            hits = [
                r["interval"][target][0] <= r["truth"][target] <= r["interval"][target][1]
                for r in rows
                if r["interval"].get(target) and r["truth"][target] is not None
            ]
            cover = {"coverage": sum(hits) / len(hits) if hits else math.nan, "n": len(hits)}
        out[target] = {"estimators": table, "interval_coverage": cover}
    return out


def markdown(doc: dict) -> str:
    lines = []
    metric = {"fisher_diag": "NMAE"}
    for split, s in doc["summary"].items():
        lines.append(f"#### {split} ({doc['n_models'][split]} models, first set each)\n")
        for target, v in s.items():
            cov = v["interval_coverage"]
            c = (
                ""
                if not cov
                else f"; head's 80 % interval covers {100 * cov['coverage']:.0f} % ({cov['n']})"
            )
            lines += [
                f"{target} · {metric.get(target, 'mean |ln(pred/true)|')}{c}",
                "",
                "| estimator | mean | median | head wins | non-positive |",
                "|---|---:|---:|---:|---:|",
            ]
            for name, e in v["estimators"].items():
                wins = "—" if name == "head" else f"{100 * e['head_win_rate']:.0f} %"
                lines.append(
                    f"| {name} | {e['mean']:.3f} | {e['median']:.3f} | {wins} | "
                    f"{e['n_nonpositive']} |"
                )
            lines.append("")
        t = doc["seconds_median"][split]
        lines.append("median seconds: " + ", ".join(f"{k} {v:.4f}" for k, v in t.items()) + "\n")
    return "\n".join(lines)


def record(doc: dict) -> None:
    """Store the summary in the shipped head's metadata; regenerate the card's section."""
    from gmcurv.gradmetanet.card import update_card
    from gmcurv.gradmetanet.pretrained import CARD_FILE, HEAD_FILE, save_head

    head = load_head(HEAD_FILE)
    meta = dict(head.meta)
    metrics = dict(meta.get("metrics", {}))
    metrics["equal_cost"] = {
        "summary": doc["summary"],
        "n_models": doc["n_models"],
        "seconds_median": doc["seconds_median"],
        "date": doc.get("date", ""),
        "load": doc["machine"]["load"][0],
    }
    meta["metrics"] = metrics
    save_head(HEAD_FILE, head.model, meta)
    CARD_FILE.write_text(update_card(CARD_FILE.read_text(), meta))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--limit", type=int, default=None, help="models per split")
    ap.add_argument("--out", type=Path, default=HERE / "equal_cost.json")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--splits", default=",".join(SPLITS))
    ap.add_argument("--record", action="store_true", help="store in the head + update the card")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.out.read_text())))
        return
    if args.record:
        record(json.loads(args.out.read_text()))
        return
    torch.set_num_threads(1)
    cache = args.cache_dir or default_cache_dir()
    head = load_head()
    rows = []
    t0 = time.time()
    splits = tuple(args.splits.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        for split in splits:
            models = list(iter_zoo(cache, (split,)))
            step = max(1, len(models) // args.limit) if args.limit else 1
            for zm in models[::step][: args.limit]:
                rows.append(model_run(head, zm, cache, Path(tmp)))
                print(f"{time.time() - t0:.0f}s {len(rows)} {zm.name}", file=sys.stderr)
    by = {s: [r for r in rows if r["split"] == s] for s in splits}
    by["all"] = rows
    doc = {
        "head": os.path.relpath(head.path, HERE.parents[1]),  # repo-relative
        "head_version": head.version,
        "calibration": None if head.calibration is None else head.calibration.source,
        "n_models": {k: len(v) for k, v in by.items()},
        "summary": {k: summarise(v) for k, v in by.items() if v},
        "seconds_median": {
            k: {t: statistics.median([r["seconds"][t] for r in v]) for t in v[0]["seconds"]}
            for k, v in by.items()
            if v
        },
        "rows": rows,
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": 1,
            "load": os.getloadavg(),
        },
        "seconds": time.time() - t0,
        "date": time.strftime("%Y-%m-%d"),
    }
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(doc, indent=1, allow_nan=True))
    tmp_out.replace(args.out)
    print(markdown(doc))


if __name__ == "__main__":
    main()
