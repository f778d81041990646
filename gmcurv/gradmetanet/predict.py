"""``--method learned``: full-sample curvature of an MLP from ``b`` gradients and the head.

`predict_curvature` draws ``b`` examples of DATA at random (seeded), captures their
decomposed empirical-Fisher gradients, encodes them (`features.encode`) and runs the head.
It returns the head's predictions — Fisher trace and diagonal, OBS curvature, Hessian trace
and top Hessian eigenvalue — and the plug-in estimates on the same ``b`` gradients.

Every predicted scalar is an `Estimate` with ``n_samples = b`` and ``method`` naming the
head; it has no ``stderr`` but a calibrated ``interval`` (``interval_level`` 0.8): the 10-90 %
quantiles of the head's held-out log errors for that quantity and the model's size bin
(`gmcurv.gradmetanet.calibration`, recorded in the head by ``gmcurv head eval --record``),
with its measured coverage on unseen datasets and architectures in the model card. A head
without a recorded calibration gives no interval and ``converged = False``.

Beside the head, `LearnedCurvature` carries the exact engine on the same ``b`` examples
(`baselines.same_set_baselines`: plug-in Fisher, GGN, exact Hessian trace) and the inputs
outside the head's training range (`head.RangeFlag`).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from gmcurv.batch import Batch
from gmcurv.capture import Capturer
from gmcurv.data import DataSample
from gmcurv.errors import GmcurvWarning
from gmcurv.estimate import Estimate
from gmcurv.gradmetanet.baselines import SameSetBaselines, same_set_baselines
from gmcurv.gradmetanet.features import PlugIn, check_supported, encode, gradient_set, plug_in
from gmcurv.gradmetanet.head import LoadedHead, RangeFlag
from gmcurv.gradmetanet.model import decode
from gmcurv.objective import Objective

DEFAULT_SET_SIZE = 128


@dataclass(frozen=True)
class LearnedCurvature:
    """The head's answer for one model (parameter layout tensors are float64)."""

    b: int
    n: int
    method: str
    fisher_trace: Estimate
    hessian_trace: Estimate
    hessian_top: Estimate
    fisher_diag: dict[str, Tensor]
    obs_curv: dict[str, Tensor]
    plug: PlugIn
    plug_diag: dict[str, Tensor]
    plug_obs_curv: dict[str, Tensor]
    index: Tensor
    seconds: float
    per_layer_trace: dict[str, float]
    same_set: SameSetBaselines | None = None
    out_of_range: tuple[RangeFlag, ...] = ()
    n_params: int = 0
    head_path: str = ""
    coverage: tuple[float, float] | None = None  # measured range of the interval's coverage


def sample_batch(data: DataSample, b: int, seed: int, device, dtype) -> tuple[Batch, Tensor]:
    """``b`` examples of `data` drawn without replacement (local generator), in data order."""
    n = data.n
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(n, generator=gen)[: min(b, n)].sort().values
    wanted = index.tolist()
    parts_x, parts_y = [], []
    pos, k = 0, 0
    for batch in data.batches(max(256, b), device, dtype):
        m = len(batch)
        rows = []
        while k < len(wanted) and wanted[k] < pos + m:
            rows.append(wanted[k] - pos)
            k += 1
        if rows:
            sel = torch.tensor(rows)
            x = batch.inputs
            parts_x.append({kk: v[sel] for kk, v in x.items()} if isinstance(x, dict) else x[sel])
            parts_y.append(None if batch.targets is None else batch.targets[sel])
        pos += m
        if k == len(wanted):
            break
    if isinstance(parts_x[0], dict):
        inputs = {kk: torch.cat([p[kk] for p in parts_x]) for kk in parts_x[0]}
    else:
        inputs = torch.cat(parts_x)
    targets = None if parts_y[0] is None else torch.cat(parts_y)
    return Batch(inputs, targets, 0), index


def learned_estimate(
    head: LoadedHead, target: str, value: float, n_params: int, b: int, method: str
) -> Estimate:
    """The head's value of `target` with its calibrated interval (see module doc)."""
    cal = head.calibration
    interval = None if cal is None else cal.interval(target, value, n_params)
    ok = math.isfinite(value) and interval is not None
    return Estimate(
        value,
        None,
        b,
        method if cal is not None else f"{method}, uncalibrated",
        ok,
        interval=interval,
        interval_level=None if interval is None or cal is None else cal.level,
    )


def predict_curvature(
    objective: Objective,
    data: DataSample,
    b: int = DEFAULT_SET_SIZE,
    seed: int = 0,
    *,
    head: LoadedHead,
    baselines: bool = True,
) -> LearnedCurvature:
    """Run the head on ``b`` random examples of `data` (see module doc); with `baselines`
    also the exact engine on the same examples."""
    chain = check_supported(objective, "empirical")
    widths = [int(objective.params[w].shape[0]) for w in chain.weights[:-1]]
    head.check(chain, widths)  # refuses what the head does not support
    t0 = time.perf_counter()
    batch, index = sample_batch(data, b, seed, objective.device, objective.dtype)
    dg = Capturer(objective, "empirical", 1, seed)(batch)
    gs = gradient_set(dg, chain, objective.params)
    pl = plug_in(dg, chain)
    inp = encode(gs, pl, next(head.model.parameters()).dtype)
    with torch.no_grad():
        pred = decode(inp, head.model(inp))
    seconds = time.perf_counter() - t0
    flags = tuple(head.out_of_range(chain, widths, float(gs.losses.mean())))
    if flags:
        warnings.warn(
            "outside the GradMetaNet head's training range: "
            + "; ".join(f.text() for f in flags)
            + " — its card's errors and intervals may not hold; compare with --method both",
            GmcurvWarning,
            stacklevel=2,
        )
    same = same_set_baselines(objective, batch, chain, pl, seed) if baselines else None
    n_params = sum(int(objective.params[k].numel()) for k in objective.params)
    fisher_diag, obs, plug_diag, plug_obs, per_layer = {}, {}, {}, {}, {}
    for l, path in enumerate(chain.paths):
        w, bn = chain.weights[l], chain.biases[l]
        fisher_diag[w], obs[w] = pred.param[l][..., 0], pred.param[l][..., 1]
        plug_diag[w], plug_obs[w] = pl.diag_w[l], pl.obs_w[l]
        total = float(pred.param[l][..., 0].sum())
        bias = pred.bias[l]
        if bn is not None and bias is not None:
            fisher_diag[bn], obs[bn] = bias[..., 0], bias[..., 1]
            plug_diag[bn], plug_obs[bn] = pl.diag_b[l], pl.obs_b[l]
            total += float(bias[..., 0].sum())
        per_layer[path] = total
    n_used = gs.b
    method = f"learned (GradMetaNet head v{head.version}, b={n_used})"

    def est(i: int, target: str) -> Estimate:
        return learned_estimate(head, target, float(pred.scalars[i]), n_params, n_used, method)

    return LearnedCurvature(
        b=n_used,
        n=data.n,
        method=method,
        fisher_trace=est(0, "fisher_trace"),
        hessian_trace=est(1, "hessian_trace"),
        hessian_top=est(2, "hessian_top"),
        fisher_diag=fisher_diag,
        obs_curv=obs,
        plug=pl,
        plug_diag=plug_diag,
        plug_obs_curv=plug_obs,
        index=index,
        seconds=seconds,
        per_layer_trace=per_layer,
        same_set=same,
        out_of_range=flags,
        n_params=n_params,
        head_path=str(head.path),
        coverage=measured_coverage(head),
    )


def measured_coverage(head: LoadedHead) -> tuple[float, float] | None:
    """Lowest and highest coverage of the head's intervals measured on held-out splits
    (per split and target, pooled entries ``all`` excluded), or None."""
    cal = head.calibration
    if cal is None:
        return None
    values = [
        c["coverage"]
        for split, per in cal.coverage.items()
        if not split.endswith("all")
        for c in per.values()
        if c.get("n") and math.isfinite(c["coverage"])
    ]
    return (min(values), max(values)) if values else None


def relative_error(learned: float, exact: float) -> float:
    """``|learned - exact| / |exact|`` (NaN when the exact value is 0 or missing)."""
    if exact is None or not math.isfinite(exact) or exact == 0:
        return math.nan
    return abs(learned - exact) / abs(exact)


@dataclass(frozen=True)
class LearnedSaliency:
    """OBD / OBS saliencies from the head's predicted curvature, and what pruning costs.

    ``obd_q = ½ F̂_qq w_q²`` and ``obs_q = ½ r̂_q w_q²`` (``r̂`` the predicted OBS curvature
    ``1/[(F + eps I)^-1]_qq``), on the prunable weights; `sweep` evaluates, at each level,
    masking the least salient weights (global scope): ``obd``, ``obs`` by the head's
    saliencies (no update); with `compare`, also ``obs+update`` (the head's OBS ranking +
    the exact one-shot OBS update on DATA) beside ``exact obs+update`` (exact OBS
    saliencies + the same update) and ``magnitude`` — the pruning comparison.
    """

    curvature: LearnedCurvature
    saliency: dict[str, dict[str, Tensor]]  # criterion -> {param: tensor}
    layers: dict[str, dict[str, dict[str, Estimate]]]  # param -> criterion -> statistics
    sweep: dict[str, list[dict]]  # criterion -> [{fraction, n_removed, loss, accuracy}]
    baseline: dict


def head_obs_saliency(
    objective: Objective, data: DataSample, b: int, seed: int, head: LoadedHead
) -> dict[str, Tensor]:
    """``½ r̂_q w_q²`` of every parameter at the objective's current weights (the ranking
    ``saliency --prune --method learned`` uses)."""
    lc = predict_curvature(objective, data, b, seed, head=head, baselines=False)
    return {
        k: 0.5 * lc.obs_curv[k] * objective.params[k].detach().double().pow(2) for k in lc.obs_curv
    }


def _point(p) -> dict:
    return {
        "fraction": p.fraction,
        "n_removed": p.n_removed,
        "loss": p.loss,
        "accuracy": p.accuracy,
        "predicted_increase": p.predicted_increase,
    }


def learned_saliency(
    objective: Objective,
    data: DataSample,
    *,
    b: int = DEFAULT_SET_SIZE,
    seed: int = 0,
    head: LoadedHead,
    levels: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9),
    eval_data: DataSample | None = None,
    batch_size: int = 256,
    compare: bool = True,
) -> LearnedSaliency:
    """Saliencies from `predict_curvature` and a pruning sweep on `eval_data` (or `data`)."""
    from gmcurv.pruning import apply_masks, evaluate, prunable_params, select_masks
    from gmcurv.saliency import curvature_at, layer_statistics, obs_update_sweep, saliencies

    lc = predict_curvature(objective, data, b, seed, head=head)
    names = prunable_params(objective)
    w = {k: objective.params[k].detach().double() for k in names}
    sal = {
        "obd": {k: 0.5 * lc.fisher_diag[k] * w[k].pow(2) for k in names},
        "obs": {k: 0.5 * lc.obs_curv[k] * w[k].pow(2) for k in names},
    }
    layers = {k: {c: layer_statistics(sal[c][k], f"{c} ({lc.method})") for c in sal} for k in names}
    target = eval_data or data
    base = evaluate(objective, target, batch_size)
    weights = {k: v.detach() for k, v in objective.params.items()}
    total = sum(w[k].numel() for k in names)
    sweep: dict[str, list[dict]] = {}
    for c, s in sal.items():
        points = []
        for f in levels:
            count = round(f * total)
            masks = select_masks(s, count)
            ev = evaluate(objective, target, batch_size, apply_masks(weights, masks))
            points.append(
                {"fraction": f, "n_removed": count, "loss": ev.loss, "accuracy": ev.accuracy}
            )
        sweep[c] = points
    if compare:
        curv = curvature_at(objective, data, {"inverse"}, batch_size=batch_size, seed=seed)
        assert curv.inverse is not None
        sizes = {k: w[k].numel() for k in names}
        exact_obs, _ = saliencies("obs", weights, names, curv)
        for label, ranking in (("obs+update", sal["obs"]), ("exact obs+update", exact_obs)):
            pts = obs_update_sweep(
                objective, target, weights, ranking, curv.inverse, sizes, sorted(levels),
                "global", {}, batch_size, data.n,
            )  # fmt: skip
            sweep[label] = [_point(p) for p in pts]
        mag = {k: w[k].abs() for k in names}
        points = []
        for f in levels:
            count = round(f * total)
            ev = evaluate(
                objective, target, batch_size, apply_masks(weights, select_masks(mag, count))
            )
            points.append(
                {"fraction": f, "n_removed": count, "loss": ev.loss, "accuracy": ev.accuracy}
            )
        sweep["magnitude"] = points
    return LearnedSaliency(
        lc, sal, layers, sweep, {"loss": base.loss, "accuracy": base.accuracy, "n": target.n}
    )
