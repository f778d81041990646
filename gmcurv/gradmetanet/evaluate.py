"""Held-out accuracy of a head against the plug-in estimators on the same gradient sets.

For each held-out zoo model and each of its draws (``b`` examples), against the exact
large-sample truth:

- ``fisher_diag``, ``obs_curv``: normalised mean absolute error over the whole model,
  ``Σ_q |pred_q - true_q| / Σ_q |true_q|`` (the paper's metric); plug-in = the closed form
  on the same ``b`` gradients;
- ``fisher_trace`` (the scalar head) and ``fisher_trace_from_diag`` (the sum of the predicted
  diagonal): plug-in = ``tr F`` of the set;
- ``hessian_trace``, ``hessian_top``: the baseline is the Fisher proxy on the set
  (``tr F``, ``λ_max F``).

Scalars are scored by the absolute log-ratio ``|ln(pred / true)|`` (``logerr``: symmetric,
so a factor 3 too high costs what a factor 3 too low does) and by the relative error
``|pred - true| / true`` (``relerr``: bounded by 1 for underestimates, unbounded for
overestimates, so it favours estimators that err low); both are reported, mean and median.

``change`` is ``head / plug - 1`` of the mean errors (negative: the head is better). For the
Fisher diagonal the rows also hold the non-learned shrinkage baseline on the same gradients
(``shrink``: `gmcurv.gradmetanet.baselines.winsorised_diagonal`), summarised as
``shrink``, ``shrink_change`` (vs the plug-in) and ``head_beats_shrink_share``.
``calibration`` is the root-mean-square log-ratio ``log(pred / true)`` of the head per
target (kept for reference). ``intervals`` is what `predict_curvature` reports: the
calibrated 80 % intervals (`gmcurv.gradmetanet.calibration`) fitted on one split
(``val``: new seeds of the training combinations) with their coverage measured on the
held-out splits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gmcurv.gradmetanet import calibration as cal
from gmcurv.gradmetanet.baselines import winsorised_diagonal
from gmcurv.gradmetanet.head import LoadedHead
from gmcurv.gradmetanet.model import PARAM_TARGETS, SCALAR_TARGETS, HeadOutput, log_prediction
from gmcurv.gradmetanet.train import Item, loss_parts, make_item
from gmcurv.gradmetanet.zoo import ZooModel, iter_zoo

SCALARS = ("fisher_trace", "fisher_trace_from_diag", "hessian_trace", "hessian_top")
METRICS = (
    "fisher_diag.nmae",
    "obs_curv.nmae",
    *(f"{name}.{kind}" for name in SCALARS for kind in ("logerr", "relerr")),
)
_SCALAR_BASELINES = {
    "fisher_trace": "plug-in tr F (same b gradients)",
    "fisher_trace_from_diag": "plug-in tr F (same b gradients)",
    "hessian_trace": "Fisher proxy tr F (same b gradients)",
    "hessian_top": "Fisher proxy λ_max F (same b gradients)",
}
BASELINES = {
    "fisher_diag.nmae": "plug-in diag F (same b gradients)",
    "obs_curv.nmae": "plug-in damped inverse (same b gradients)",
    **{f"{n}.{k}": b for n, b in _SCALAR_BASELINES.items() for k in ("logerr", "relerr")},
}


@dataclass
class DrawErrors:
    """Errors of one model's draws: ``{metric: [R]}`` for head and plug-in, log-ratios."""

    name: str
    split: str
    dataset: str
    widths: tuple[int, ...]
    activation: str
    step: int
    accuracy: float
    head: dict[str, list[float]]
    plug: dict[str, list[float]]
    logratio: dict[str, list[float]] = field(default_factory=dict)
    n_params: int = 0
    mean_loss: float = math.nan
    shrink: dict[str, list[float]] = field(default_factory=dict)


def shrink_errors(zm: ZooModel) -> list[float]:
    """NMAE of the winsorised Fisher diagonal (`baselines.winsorised_diagonal`) per draw."""
    depth = len(zm.spec.widths) + 1
    out = []
    for d in zm.draws:
        dw, db = winsorised_diagonal(d.gs)
        err = tot = 0.0
        for l in range(depth):
            for name, est in ((f"fc{l}.weight", dw[l]), (f"fc{l}.bias", db[l])):
                t = zm.targets.get(f"fisher_diag.{name}")
                if t is None or est is None:
                    continue
                err += float((est - t.double()).abs().sum())
                tot += float(t.double().abs().sum())
        out.append(err / tot if tot > 0 else math.nan)
    return out


def _zero_like(out: HeadOutput) -> HeadOutput:
    return HeadOutput(
        tuple(torch.zeros_like(w) for w in out.w),
        tuple(None if b is None else torch.zeros_like(b) for b in out.b),
        torch.zeros_like(out.scalars),
    )


def item_errors(head: LoadedHead, item: Item) -> tuple[dict, dict, dict]:
    """Per-draw errors of the head and of the plug-in on one item."""
    with torch.no_grad():
        out = head.model(item.inp)
    res = {}
    for who, o in (("head", out), ("plug", _zero_like(out))):
        parts = loss_parts(item.inp, o, item)
        logp_full = log_prediction(item.inp, o)
        logp = logp_full.scalars.double()  # [R, S]
        errs: dict[str, list[float]] = {}
        for k, name in enumerate(PARAM_TARGETS):
            errs[f"{name}.nmae"] = parts.nmae[:, k].double().tolist()
        ratios = {}
        total = 0.0
        for l in range(item.inp.depth):  # Σ of the predicted diagonal, in the model's units
            u = item.inp.unit_w[l].double()
            total = total + torch.exp(logp_full.param[l][..., 0].double()).sum((-2, -1)) * u
            if logp_full.bias[l] is not None:
                ub = item.inp.unit_b[l].double()
                total = total + torch.exp(logp_full.bias[l][..., 0].double()).sum(-1) * ub
        preds = {name: torch.exp(logp[:, s]) for s, name in enumerate(SCALAR_TARGETS)}
        preds["fisher_trace_from_diag"] = total
        truth = {name: float(item.t_s[s]) for s, name in enumerate(SCALAR_TARGETS)}
        truth["fisher_trace_from_diag"] = truth["fisher_trace"]
        for name in SCALARS:
            t, pred = truth[name], preds[name]
            if not (math.isfinite(t) and t > 0):
                nan = [math.nan] * logp.shape[0]
                errs[f"{name}.relerr"] = errs[f"{name}.logerr"] = ratios[name] = nan
                continue
            lr = torch.log(pred) - math.log(t)
            errs[f"{name}.relerr"] = ((pred - t).abs() / t).tolist()
            errs[f"{name}.logerr"] = lr.abs().tolist()
            ratios[name] = lr.tolist()
        res[who] = (errs, ratios)
    return res["head"][0], res["plug"][0], res["head"][1]


def evaluate_models(
    head: LoadedHead, models: Sequence[ZooModel], progress: Callable[[int], None] | None = None
) -> list[DrawErrors]:
    head.model.eval()
    out = []
    for zm in models:
        item = make_item(zm, next(head.model.parameters()).dtype)
        h, p, ratios = item_errors(head, item)
        s = zm.spec
        out.append(
            DrawErrors(
                zm.name,
                s.split,
                s.dataset,
                s.widths,
                s.activation,
                zm.step,
                float(zm.scalars.get("accuracy") or math.nan),
                h,
                p,
                ratios,
                sum(int(v.numel()) for v in zm.state.values()),
                sum(float(d.gs.losses.mean()) for d in zm.draws) / max(len(zm.draws), 1),
                {"fisher_diag.nmae": shrink_errors(zm)},
            )
        )
        if progress:
            progress(1)
    return out


def _mean(values: list[float]) -> float:
    v = [x for x in values if math.isfinite(x)]
    return sum(v) / len(v) if v else math.nan


def _median(values: list[float]) -> float:
    v = sorted(values)
    if not v:
        return math.nan
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else 0.5 * (v[mid - 1] + v[mid])


def summarise(rows: Sequence[DrawErrors]) -> dict[str, Any]:
    """``{metric: {head, plug, change, n_models, n_draws, baseline}}`` over `rows`."""
    out: dict[str, Any] = {}
    for m in METRICS:
        h = [x for r in rows for x in r.head.get(m, [])]
        p = [x for r in rows for x in r.plug.get(m, [])]
        pairs = [(a, b) for a, b in zip(h, p, strict=True) if math.isfinite(a) and math.isfinite(b)]
        mh, mp = _mean([a for a, _ in pairs]), _mean([b for _, b in pairs])
        wins = sum(a < b for a, b in pairs)
        out[m] = {
            "head": mh,
            "plug": mp,
            "head_median": _median([a for a, _ in pairs]),
            "plug_median": _median([b for _, b in pairs]),
            "change": mh / mp - 1.0 if pairs and mp > 0 else math.nan,
            "head_better_share": wins / len(pairs) if pairs else math.nan,
            "n_draws": len(pairs),
            "n_models": sum(any(math.isfinite(x) for x in r.head.get(m, [])) for r in rows),
            "baseline": BASELINES[m],
        }
        sh = [x for r in rows for x in r.shrink.get(m, [])]
        if sh:
            trip = [
                (a, b, c)
                for a, b, c in zip(h, p, sh, strict=True)
                if math.isfinite(a) and math.isfinite(b) and math.isfinite(c)
            ]
            ms = _mean([c for _, _, c in trip])
            mp3 = _mean([b for _, b, _ in trip])
            out[m]["shrink"] = ms
            out[m]["shrink_median"] = _median([c for _, _, c in trip])
            out[m]["shrink_change"] = ms / mp3 - 1.0 if trip and mp3 > 0 else math.nan
            out[m]["head_beats_shrink_share"] = (
                sum(a < c for a, _, c in trip) / len(trip) if trip else math.nan
            )
            out[m]["shrink_baseline"] = "winsorised diag F (same b gradients, non-learned)"
    return out


def calibration(rows: Sequence[DrawErrors]) -> dict[str, float]:
    """Root-mean-square log-ratio of the head per scalar target."""
    out = {}
    for name in SCALARS:
        v = [x for r in rows for x in r.logratio.get(name, []) if math.isfinite(x)]
        out[name] = math.sqrt(sum(x * x for x in v) / len(v)) if v else math.nan
    return out


def interval_samples(rows: Sequence[DrawErrors]) -> list[cal.Sample]:
    """Every draw's log-ratio of every scalar the head predicts, with the model's size."""
    return [
        cal.Sample(name, r.n_params, x)
        for r in rows
        for name in SCALAR_TARGETS
        for x in r.logratio.get(name, [])
        if math.isfinite(x)
    ]


def operating_ranges(rows: Sequence[DrawErrors]) -> dict[str, list[float]]:
    """Mean loss of the set (``loss``) seen on `rows`: the range the card calls in-range."""
    losses = [r.mean_loss for r in rows if math.isfinite(r.mean_loss)]
    return {"loss": [min(losses), max(losses)]} if losses else {}


def fit_intervals(
    cal_rows: Sequence[DrawErrors], test_rows: Sequence[DrawErrors], source: str
) -> cal.Calibration:
    """Intervals fitted on `cal_rows`, with coverage measured on each split of `test_rows`
    and on all of them (``all``)."""
    sizes = sorted({(r.name, r.n_params) for r in cal_rows})
    fitted = cal.fit(interval_samples(cal_rows), source=source, sizes=[p for _, p in sizes])
    cover: dict[str, Any] = {"all": cal.coverage(fitted, interval_samples(test_rows))}
    for split in sorted({r.split for r in test_rows}):
        part = [r for r in test_rows if r.split == split]
        cover[split] = cal.coverage(fitted, interval_samples(part))
    return cal.Calibration(
        fitted.level, fitted.edges, fitted.quantiles, fitted.counts, fitted.pooled, source, cover
    )


def evaluate_head(
    head: LoadedHead,
    cache_dir: Path,
    splits: Sequence[str] = ("test-dataset", "test-arch"),
    progress: Callable[[int], None] | None = None,
    calibration_split: str | None = "val",
) -> dict[str, Any]:
    """Evaluate on the zoo's held-out splits: per split and overall summaries, per-model rows;
    with `calibration_split`, the calibrated intervals fitted there and their coverage on
    `splits` (``intervals``, None when that split has no models)."""
    models = list(iter_zoo(cache_dir, tuple(splits)))
    rows = evaluate_models(head, models, progress)
    by_split = {s: summarise([r for r in rows if r.split == s]) for s in splits}
    intervals = ranges = None
    if calibration_split is not None:
        cal_rows = evaluate_models(head, list(iter_zoo(cache_dir, (calibration_split,))), progress)
        if cal_rows:
            n_models = len(cal_rows)
            source = f"zoo split {calibration_split!r} ({n_models} models)"
            intervals = fit_intervals(cal_rows, rows, source)
            ranges = operating_ranges(cal_rows)
    return {
        "splits": by_split,
        "all": summarise(rows),
        "calibration": calibration(rows),
        "intervals": intervals,
        "ranges": ranges,
        "rows": rows,
        "n_models": len(rows),
    }


def leave_one_group_out(
    rows: Sequence[DrawErrors], group_of: Callable[[DrawErrors], str], source: str
) -> cal.Calibration:
    """Intervals fitted on all `rows`, with the coverage a new, unseen group can expect:
    for each group ``G`` (an unseen task, the unseen architectures, ...), the intervals
    fitted on every *other* group and their coverage on ``G`` (``coverage[G]``), and the
    pooled hits of all groups (``coverage["all"]``)."""
    groups = sorted({group_of(r) for r in rows})
    cover: dict[str, Any] = {}
    pooled: dict[str, list[float]] = {}
    for g in groups:
        inside = [r for r in rows if group_of(r) == g]
        outside = [r for r in rows if group_of(r) != g]
        sizes = sorted({(r.name, r.n_params) for r in outside})
        fitted = cal.fit(interval_samples(outside), sizes=[p for _, p in sizes])
        got = cal.coverage(fitted, interval_samples(inside))
        cover[g] = got
        for target, c in got.items():
            acc = pooled.setdefault(target, [0.0, 0.0])
            acc[0] += c["coverage"] * c["n"]
            acc[1] += c["n"]
    cover["all"] = {
        t: {"coverage": h / n if n else math.nan, "n": int(n)} for t, (h, n) in pooled.items()
    }
    sizes = sorted({(r.name, r.n_params) for r in rows})
    final = cal.fit(interval_samples(rows), source=source, sizes=[p for _, p in sizes])
    return cal.Calibration(
        final.level, final.edges, final.quantiles, final.counts, final.pooled, source, cover
    )
