"""Pruning saliency — magnitude, OBD, OBS, Hessian OBD — and pruning with OBS updates.

The saliency of weight ``q`` is the predicted increase of the mean loss when ``w_q`` is set
to zero, under the quadratic model ``L(w + δw) ≈ L(w) + ½ δw^T H δw`` (the gradient term is
dropped: a trained model sits near a minimum). The ½ is part of every value:

==============  =========================================  ===================================
``magnitude``   ``|w_q|``                                   no curvature (not a loss)
``obd``         ``½ F_qq w_q^2``                            LeCun et al. 1990; diagonal ``F``
``obs``         ``w_q^2 / (2 [(F + eps I)^-1]_qq)``         Hassibi & Stork 1993; the others
                                                            compensate (`gmcurv.woodbury`)
``obd-hessian`` ``½ H_qq w_q^2``                            ``diag H`` from ``E[z ⊙ Hz]``
==============  =========================================  ===================================

``F`` is the Fisher of the chosen type (empirical / mc / exact) on DATA; ``eps = damping ·
tr(F)/P`` (`gmcurv.woodbury.default_eps`). OBS uses ``F`` block-diagonal over layers
(WoodFisher) or whole (``structure='global'``).

`prune_model` removes a fraction of the prunable weights. Without update the weights are
simply masked. With the OBS update, pruning runs in `rounds` (iterative OBS): each round
re-captures the gradients at the current weights, ranks the remaining weights by the
criterion (OBS saliency w.r.t. ``H_RR``, the curvature of the still-free weights), removes
the next share and applies the *exact* multi-weight OBS solution ``δw_R = J_R^T (K_R +
N eps I)^-1 J_Q w_Q`` for everything removed so far (`DampedFisher.remove`). One round is
the one-shot simultaneous OBS of Hassibi & Stork 1993 for a set of weights (as in
WoodFisher's multi-weight variant, Singh & Alistarh 2020); several rounds re-linearise the
model between removals, the greedy scheme of OBC (Frantar et al. 2022) applied to the
Fisher in chunks instead of one weight at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gmcurv import distributed
from gmcurv.capture import DecomposedGradients, capture_all, plan_capture
from gmcurv.capture.budget import preflight_capture
from gmcurv.data import DataSample
from gmcurv.errors import ConfigError, UnsupportedError
from gmcurv.estimate import Estimate
from gmcurv.fisher import fisher_diagonal
from gmcurv.memory import preflight
from gmcurv.objective import Objective
from gmcurv.pruning import (
    Evaluation,
    apply_masks,
    check_fraction,
    count_removed,
    evaluate,
    prunable_params,
    round_target,
    select_masks,
    target_counts,
)
from gmcurv.woodbury import DEFAULT_DAMPING, DampedFisher, default_eps

CRITERIA = ("magnitude", "obd", "obs", "obd-hessian")
LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)
DEFAULT_ROUNDS = 8
STATS = ("mean", "min", "p05", "p25", "median", "p75", "p95", "max")
_QUANTILES = {"min": 0.0, "p05": 0.05, "p25": 0.25, "median": 0.5, "p75": 0.75, "p95": 0.95}
CONVENTION = (
    "saliency = predicted increase of the mean loss when the weight is zeroed, "
    "½ δwᵀHδw: magnitude |w_q|; obd ½ F_qq w_q²; obs w_q² / (2 [(F + eps I)⁻¹]_qq) "
    "(the other weights compensate); obd-hessian ½ H_qq w_q²"
)

ProgressFn = Callable[[int], None]


# ----------------------------------------------------------------------- curvature at a point
@dataclass
class Curvature:
    """What the criteria need at the current weights (only the parts asked for)."""

    dg: DecomposedGradients | None = None
    eps: float | None = None
    fisher_diag: dict[str, Tensor] | None = None
    inverse: DampedFisher | None = None
    inverse_diag: dict[str, Tensor] | None = None
    hessian_diag: dict[str, Tensor] | None = None
    hessian_stderr: dict[str, Tensor] | None = None
    probes: int = 0


def _needs(criteria: Sequence[str], update: bool) -> set[str]:
    unknown = [c for c in criteria if c not in CRITERIA]
    if unknown:
        raise ConfigError(f"unknown --criterion {unknown[0]!r}", hint=f"use one of {CRITERIA}")
    needs: set[str] = set()
    if "obd" in criteria:
        needs.add("fisher_diag")
    if "obs" in criteria:
        needs.add("inverse")
    if update:
        needs.add("kernel")
    if "obd-hessian" in criteria:
        needs.add("hessian")
    return needs


def kernel_bytes(rows: int, groups: int) -> int:
    """Float64 memory of the Woodbury kernels: ``A`` and its Cholesky factor per group."""
    return (2 * groups + 2) * rows * rows * 8


def curvature_at(
    objective: Objective,
    data: DataSample,
    needs: set[str],
    *,
    fisher: str = "empirical",
    mc_samples: int = 1,
    damping: float = DEFAULT_DAMPING,
    structure: str = "block",
    removed: Mapping[str, Tensor] | None = None,
    batch_size: int = 256,
    seed: int = 0,
    probes: int = 32,
    budget_bytes: int | None = None,
    progress: ProgressFn | None = None,
) -> Curvature:
    """Capture gradients at the objective's current weights and derive what `needs` lists:
    ``fisher_diag`` (OBD), ``inverse`` (OBS saliency), ``kernel`` (factors kept for an OBS
    update), ``hessian`` (Hessian diagonal)."""
    curv = Curvature()
    if needs & {"fisher_diag", "inverse", "kernel"}:
        est = preflight_capture(
            objective, data, batch_size, fisher, mc_samples, budget_bytes, keep=True
        )
        if needs & {"inverse", "kernel"}:
            n_total = data.n * distributed.current().world  # factors are gathered
            rows = n_total * est.columns
            groups = (
                1 if structure == "global" else len(plan_capture(objective.model, objective.params))
            )
            preflight(
                kernel_bytes(rows, groups) + n_total * (est.factors + est.dense),
                budget_bytes,
                f"the damped inverse Fisher of {n_total} examples x {est.columns} column(s)",
                "use --samples to take fewer examples for the Fisher, --fisher empirical, "
                "or --layers to restrict",
            )
        dg = capture_all(
            objective, data, batch_size, fisher, mc_samples, seed, progress, budget_bytes
        )
        curv.dg = dg
        curv.eps = default_eps(dg, damping)
        if "fisher_diag" in needs:
            curv.fisher_diag = {k: v.double() for k, v in fisher_diagonal(dg).items()}
        if "inverse" in needs:
            curv.inverse = DampedFisher(dg, curv.eps, structure, removed)
            curv.inverse_diag = curv.inverse.inverse_diagonal()
    if "hessian" in needs:
        curv.hessian_diag, curv.hessian_stderr = _hessian_diagonal(
            objective, data, batch_size, probes, seed
        )
        curv.probes = probes
    return curv


@dataclass(frozen=True)
class CurvatureSettings:
    """How `curvature_at` captures and damps, shared by the analysis and every pruning round."""

    fisher: str = "empirical"
    mc_samples: int = 1
    damping: float = DEFAULT_DAMPING
    structure: str = "block"
    batch_size: int = 256
    seed: int = 0
    probes: int = 32
    budget_bytes: int | None = None
    progress: ProgressFn | None = None

    def at(
        self,
        objective: Objective,
        data: DataSample,
        needs: set[str],
        removed: Mapping[str, Tensor] | None,
        round_: int = 1,
    ) -> Curvature:
        """`curvature_at` the objective's current weights (seed advanced per round)."""
        return curvature_at(
            objective, data, needs, fisher=self.fisher, mc_samples=self.mc_samples,
            damping=self.damping, structure=self.structure, removed=removed,
            batch_size=self.batch_size, seed=self.seed + round_ - 1, probes=self.probes,
            budget_bytes=self.budget_bytes, progress=self.progress,
        )  # fmt: skip


def _hessian_diagonal(
    objective: Objective, data: DataSample, batch_size: int, probes: int, seed: int
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``diag H ≈ mean_s z_s ⊙ H z_s`` (Rademacher) with per-entry standard errors."""
    try:
        from gmcurv.stochastic import hessian_diagonal
    except ImportError:
        raise UnsupportedError(
            "--criterion obd-hessian needs the stochastic Hessian diagonal "
            "(gmcurv.stochastic), which this build does not have",
            hint="use --criterion obd or obs",
        ) from None
    from gmcurv.operator import CurvatureOperator

    op = CurvatureOperator(objective, data, batch_size, kind="hessian")
    res = hessian_diagonal(op, probes, seed)
    value, stderr = _diag_parts(res, op)
    return value, stderr


def _diag_parts(res: Any, op: Any) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(value, stderr) of `gmcurv.stochastic.DiagonalEstimate` in parameter layout."""
    value, stderr = res.as_dicts(op.space)
    return (
        {k: v.double() for k, v in value.items()},
        {k: v.double() for k, v in stderr.items()},
    )


# --------------------------------------------------------------------------------- criteria
def saliencies(
    criterion: str, weights: Mapping[str, Tensor], names: Sequence[str], curv: Curvature
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """Per-weight saliency (float64) of the parameters `names`, and its standard error
    (None when exact). See the module doc for the formulas and the ½ convention."""
    w = {k: weights[k].detach().double() for k in names}
    if criterion == "magnitude":
        return {k: v.abs() for k, v in w.items()}, None
    if criterion == "obd":
        assert curv.fisher_diag is not None
        return {k: 0.5 * curv.fisher_diag[k] * v.pow(2) for k, v in w.items()}, None
    if criterion == "obs":
        assert curv.inverse_diag is not None
        return {k: v.pow(2) / (2.0 * curv.inverse_diag[k]) for k, v in w.items()}, None
    if criterion == "obd-hessian":
        assert curv.hessian_diag is not None and curv.hessian_stderr is not None
        value = {k: 0.5 * curv.hessian_diag[k] * v.pow(2) for k, v in w.items()}
        se = {k: 0.5 * curv.hessian_stderr[k] * v.pow(2) for k, v in w.items()}
        return value, se
    raise ConfigError(f"unknown --criterion {criterion!r}", hint=f"use one of {CRITERIA}")


def criterion_method(criterion: str, curv: Curvature, fisher: str) -> str:
    """How a criterion's values were obtained, for the `Estimate.method` field."""
    if criterion == "magnitude":
        return "|w|"
    if criterion == "obd":
        return f"½ F_qq w² ({fisher} Fisher)"
    if criterion == "obs":
        return f"w² / (2 [(F + eps I)⁻¹]_qq) ({fisher} Fisher, eps {curv.eps:.3g})"
    return f"½ H_qq w² (diag H = mean z ⊙ Hz over {curv.probes} Rademacher probes)"


def layer_statistics(
    values: Tensor, method: str, stderr: Tensor | None = None
) -> dict[str, Estimate]:
    """Mean and quantiles of one tensor's saliencies.

    Exact values carry no stderr; for a stochastic criterion the mean's stderr combines the
    per-weight errors (``sqrt(Σ se²)/n``, independence assumed) and a quantile's is that of
    the weight sitting at the quantile.
    """
    flat = values.reshape(-1).double()
    n = flat.numel()
    order = torch.argsort(flat, stable=True)
    se_flat = None if stderr is None else stderr.reshape(-1).double()
    out: dict[str, Estimate] = {}
    mean_se = None if se_flat is None else float(se_flat.pow(2).sum().sqrt()) / n
    out["mean"] = Estimate(float(flat.mean()), mean_se, n, method)
    for name, q in _QUANTILES.items():
        pos = int(order[min(n - 1, round(q * (n - 1)))])
        se = None if se_flat is None else float(se_flat[pos])
        out[name] = Estimate(float(flat[pos]), se, n, f"{method}, {name}")
    last = int(order[-1])
    out["max"] = Estimate(
        float(flat[last]), None if se_flat is None else float(se_flat[last]), n, f"{method}, max"
    )
    return {k: out[k] for k in STATS}


# --------------------------------------------------------------------------------- analysis
@dataclass(frozen=True)
class SweepPoint:
    """Loss and accuracy after removing `fraction` of the prunable weights."""

    fraction: float
    n_removed: int
    loss: Estimate
    accuracy: Estimate | None
    predicted_increase: Estimate | None = None


@dataclass(frozen=True)
class LayerSaliency:
    """One prunable tensor: its size and the statistics of each criterion."""

    n_params: int
    stats: dict[str, dict[str, Estimate]]


@dataclass(frozen=True)
class SaliencyAnalysis:
    """Everything ``gmcurv saliency`` reports without ``--prune``."""

    criteria: list[str]
    fisher: str
    columns: int
    damping: float
    eps: float | None
    structure: str
    scope: str
    convention: str
    n_examples: int
    n_eval: int
    n_params: int
    n_prunable: int
    n_already_pruned: int
    baseline: Evaluation
    layers: dict[str, LayerSaliency]
    sweep: dict[str, list[SweepPoint]]
    # per-weight values of each criterion (float64) and their standard errors (stochastic
    # criteria only), for ``--save-scores``
    scores: dict[str, dict[str, Tensor]] = field(default_factory=dict, repr=False)
    score_stderr: dict[str, dict[str, Tensor]] = field(default_factory=dict, repr=False)


def _removed_from_masks(
    masks: Mapping[str, Tensor] | None, objective: Objective
) -> dict[str, Tensor]:
    """Removal masks (True = pruned) from a checkpoint's keep-masks (1 = kept)."""
    out = {}
    for k, m in (masks or {}).items():
        if k in objective.params:
            out[k] = (m == 0).to(objective.device)
    return out


def _set_weights(objective: Objective, weights: Mapping[str, Tensor]) -> None:
    with torch.no_grad():
        for k, p in objective.params.items():
            if k in weights:
                p.copy_(weights[k].to(p.dtype))


def saliency_analysis(
    objective: Objective,
    data: DataSample,
    *,
    eval_data: DataSample | None = None,
    criteria: Sequence[str] = ("magnitude", "obd", "obs"),
    levels: Sequence[float] = LEVELS,
    scope: str = "global",
    fisher: str = "empirical",
    mc_samples: int = 1,
    damping: float = DEFAULT_DAMPING,
    structure: str = "block",
    include_bias: bool = False,
    masks: Mapping[str, Tensor] | None = None,
    batch_size: int = 256,
    seed: int = 0,
    probes: int = 32,
    update_curve: bool = True,
    budget_bytes: int | None = None,
    progress: ProgressFn | None = None,
) -> SaliencyAnalysis:
    """Per-tensor saliency statistics of each criterion and the loss/accuracy curves.

    The curves mask the least salient ``fraction`` of prunable weights (no update); with
    `update_curve` an ``obs+update`` curve adds the exact one-shot OBS compensation.
    """
    levels = sorted(check_fraction(f) for f in levels)
    names = _prunable(objective, include_bias, masks)
    removed = _removed_from_masks(masks, objective)
    weights = {k: p.detach().clone() for k, p in objective.params.items()}
    update_curve = update_curve and "obs" in criteria
    settings = CurvatureSettings(
        fisher, mc_samples, damping, structure, batch_size, seed, probes, budget_bytes, progress
    )
    curv = settings.at(objective, data, _needs(criteria, False), removed)
    ev = eval_data or data
    baseline = evaluate(objective, ev, batch_size)
    sizes = {k: weights[k].numel() for k in names}
    scores, stderrs, layers = _criteria_statistics(criteria, weights, names, removed, curv, fisher)
    usable = [f for f in levels if _fits(sizes, f, scope, removed)]
    sweep = {
        crit: _masking_sweep(
            objective, ev, weights, scores[crit], sizes, usable, scope, removed, batch_size
        )
        for crit in criteria
    }
    if update_curve:
        assert curv.inverse is not None
        sweep["obs+update"] = obs_update_sweep(
            objective, ev, weights, scores["obs"], curv.inverse, sizes, usable, scope,
            removed, batch_size, data.n,
        )  # fmt: skip
    return SaliencyAnalysis(
        criteria=list(criteria),
        fisher=fisher,
        columns=curv.dg.columns if curv.dg is not None else 0,
        damping=damping,
        eps=curv.eps,
        structure=structure,
        scope=scope,
        convention=CONVENTION,
        n_examples=data.n,
        n_eval=ev.n,
        n_params=objective.space.size,
        n_prunable=sum(sizes.values()),
        n_already_pruned=count_removed({k: v for k, v in removed.items() if k in sizes}),
        baseline=baseline,
        layers={k: LayerSaliency(sizes[k], layers[k]) for k in names},
        sweep=sweep,
        scores=scores,
        score_stderr=stderrs,
    )


def _criteria_statistics(
    criteria: Sequence[str],
    weights: Mapping[str, Tensor],
    names: Sequence[str],
    removed: Mapping[str, Tensor],
    curv: Curvature,
    fisher: str,
) -> tuple[dict[str, dict[str, Tensor]], dict[str, dict[str, Tensor]], dict[str, dict]]:
    """Per criterion: the per-weight saliencies, their stderrs (stochastic criteria) and the
    per-tensor statistics over the weights not already removed."""
    scores: dict[str, dict[str, Tensor]] = {}
    stderrs: dict[str, dict[str, Tensor]] = {}
    layers: dict[str, dict[str, dict[str, Estimate]]] = {k: {} for k in names}
    for crit in criteria:
        sal, se = saliencies(crit, weights, names, curv)
        scores[crit] = sal
        if se is not None:
            stderrs[crit] = se
        method = criterion_method(crit, curv, fisher)
        for k in names:
            keep = ~removed[k] if k in removed else torch.ones_like(sal[k], dtype=torch.bool)
            if bool(keep.any()):
                layers[k][crit] = layer_statistics(
                    sal[k][keep], method, None if se is None else se[k][keep]
                )
    return scores, stderrs, layers


def _masking_sweep(
    objective: Objective,
    ev: DataSample,
    weights: Mapping[str, Tensor],
    saliency: Mapping[str, Tensor],
    sizes: Mapping[str, int],
    levels: Sequence[float],
    scope: str,
    removed: Mapping[str, Tensor],
    batch_size: int,
) -> list[SweepPoint]:
    """Loss/accuracy after masking the least salient weights at each level (no update)."""
    points = []
    for f in levels:
        m = select_masks(saliency, target_counts(sizes, f, scope), removed)
        res = evaluate(objective, ev, batch_size, apply_masks(weights, m))
        points.append(SweepPoint(f, count_removed(m), res.loss, res.accuracy))
    return points


def obs_update_sweep(
    objective: Objective,
    ev: DataSample,
    weights: Mapping[str, Tensor],
    saliency: Mapping[str, Tensor],
    inverse: DampedFisher,
    sizes: Mapping[str, int],
    levels: Sequence[float],
    scope: str,
    removed: Mapping[str, Tensor],
    batch_size: int,
    n: int,
) -> list[SweepPoint]:
    """Loss/accuracy after removing the least salient weights by `saliency` at each level
    and applying the exact one-shot OBS update of the rest (`DampedFisher.remove`), with
    the quadratic model's predicted increase. The ranking may come from anywhere (exact
    OBS, or the learned head); the update is always exact."""
    points = []
    current, prev = inverse, None
    for f in levels:
        m = select_masks(saliency, target_counts(sizes, f, scope), removed)
        nested = prev is not None and all(bool((prev[k] <= m[k]).all()) for k in m)
        current = (current if nested else inverse).without(m)
        delta, inc = current.remove(weights)
        new = apply_masks(
            {k: (w.double() + delta[k]).to(w.dtype) if k in delta else w
             for k, w in weights.items()},
            m,
        )  # fmt: skip
        res = evaluate(objective, ev, batch_size, new)
        pred = Estimate.exact_value(inc, n, "quadratic model ½δwᵀ(F+εI)δw")
        points.append(SweepPoint(f, count_removed(m), res.loss, res.accuracy, pred))
        prev = m
    return points


def _prunable(
    objective: Objective, include_bias: bool, masks: Mapping[str, Tensor] | None
) -> list[str]:
    names = prunable_params(objective, include_bias)
    extra = [k for k in (masks or {}) if k in objective.params and k not in names]
    order = list(objective.params)
    names = sorted([*names, *extra], key=order.index)
    if not names:
        raise ConfigError(
            "no prunable parameters: the selected parameters are all biases or norm scales",
            hint="add --include-bias, or widen --layers",
        )
    return names


def _fits(sizes: Mapping[str, int], f: float, scope: str, removed: Mapping[str, Tensor]) -> bool:
    """Whether pruning `f` keeps at least the already-removed weights removed."""
    target = target_counts(sizes, f, scope)
    if isinstance(target, int):
        return target >= count_removed({k: v for k, v in removed.items() if k in sizes})
    return all(target[k] >= int(removed[k].sum()) for k in sizes if k in removed)


# ---------------------------------------------------------------------------------- pruning
@dataclass(frozen=True)
class LayerSparsity:
    n_params: int
    n_removed: int
    sparsity: float

    @classmethod
    def of(cls, n_params: int, removed: Tensor) -> LayerSparsity:
        k = int(removed.sum())
        return cls(n_params, k, k / n_params)


@dataclass(frozen=True)
class PruneResult:
    """A pruned model: new weights, removal masks and what it cost."""

    criterion: str
    fraction: float
    scope: str
    update: bool
    rounds: int
    structure: str
    fisher: str
    columns: int
    damping: float
    eps: list[float]
    n_prunable: int
    n_removed: int
    n_already_pruned: int
    layers: dict[str, LayerSparsity]
    predicted_increase: Estimate | None
    before: Evaluation
    after: Evaluation
    weights: dict[str, Tensor] = field(repr=False)
    masks: dict[str, Tensor] = field(repr=False)

    def summary(self) -> dict[str, Any]:
        """The JSON-able part (no tensors)."""
        skip = {"weights", "masks"}
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in skip}


def prune_model(
    objective: Objective,
    data: DataSample,
    fraction: float,
    *,
    criterion: str = "obs",
    scope: str = "global",
    update: bool | None = None,
    rounds: int = DEFAULT_ROUNDS,
    eval_data: DataSample | None = None,
    fisher: str = "empirical",
    mc_samples: int = 1,
    damping: float = DEFAULT_DAMPING,
    structure: str = "block",
    include_bias: bool = False,
    masks: Mapping[str, Tensor] | None = None,
    batch_size: int = 256,
    seed: int = 0,
    probes: int = 32,
    budget_bytes: int | None = None,
    progress: ProgressFn | None = None,
    ranker: Callable[[Mapping[str, Tensor], int, Mapping[str, Tensor]], dict[str, Tensor]]
    | None = None,
    ranker_name: str | None = None,
) -> PruneResult:
    """Remove exactly ``round(fraction * n_prunable)`` weights (see the module doc).

    `update` defaults to True for OBS; `rounds` only matters with the update. The
    objective's parameters are restored afterwards; the new ones are in the result.
    `ranker(weights, round, removed)`: saliencies of the prunable weights to rank by instead of
    `criterion`'s exact ones (e.g. the learned head's, at the objective's current weights);
    the OBS update stays exact. `ranker_name` is then the reported criterion.
    """
    fraction = check_fraction(fraction)
    if rounds < 1:
        raise ConfigError(f"--rounds must be at least 1, got {rounds}")
    update = (criterion == "obs") if update is None else update
    rounds = effective_rounds(criterion, update, rounds)
    names = _prunable(objective, include_bias, masks)
    removed = {k: v for k, v in _removed_from_masks(masks, objective).items() if k in names}
    original = {k: p.detach().clone() for k, p in objective.params.items()}
    sizes = {k: original[k].numel() for k in names}
    already = count_removed(removed)
    _check_below_target(sizes, fraction, scope, removed)
    ev = eval_data or data
    before = evaluate(objective, ev, batch_size)
    settings = CurvatureSettings(
        fisher, mc_samples, damping, structure, batch_size, seed, probes, budget_bytes, progress
    )
    needs = _needs([] if ranker is not None else [criterion], update)
    final = target_counts(sizes, fraction, scope)
    current = dict(original)
    log = _RoundLog()
    try:
        for r in range(1, rounds + 1):
            _set_weights(objective, current)
            curv = settings.at(objective, data, needs, removed, r)
            if ranker is not None:
                sal = {k: v for k, v in ranker(current, r, removed).items() if k in sizes}
            else:
                sal, _ = saliencies(criterion, current, names, curv)
            removed = select_masks(sal, round_target(final, removed, r, rounds), removed)
            current, inc = _compensate(curv, current, removed, update, structure)
            log.add(curv, inc)
            current = apply_masks(current, removed)
    finally:
        _set_weights(objective, original)
    what = "½δwᵀ(F+εI)δw" + (f", summed over {rounds} rounds" if rounds > 1 else "")
    return PruneResult(
        criterion=ranker_name or criterion if ranker is not None else criterion,
        fraction=fraction,
        scope=scope,
        update=update,
        rounds=rounds,
        structure=structure,
        fisher=fisher,
        columns=log.columns,
        damping=damping,
        eps=log.eps,
        n_prunable=sum(sizes.values()),
        n_removed=count_removed(removed),
        n_already_pruned=already,
        layers={k: LayerSparsity.of(sizes[k], removed[k]) for k in names},
        predicted_increase=log.estimate(data.n, f"quadratic model {what}"),
        before=before,
        after=evaluate(objective, ev, batch_size, current),
        weights={k: v.detach() for k, v in current.items()},
        masks=removed,
    )


def effective_rounds(criterion: str, update: bool | None, rounds: int) -> int:
    """Rounds `prune_model` runs: `rounds` with the OBS update (the default for OBS), else 1."""
    return rounds if ((criterion == "obs") if update is None else update) else 1


def _check_below_target(
    sizes: Mapping[str, int], fraction: float, scope: str, removed: Mapping[str, Tensor]
) -> None:
    if not _fits(sizes, fraction, scope, removed):
        target = target_counts(sizes, fraction, scope)
        raise ConfigError(
            f"the checkpoint already has {count_removed(removed):,} of {sum(sizes.values()):,} "
            f"prunable weights pruned, more than --prune {fraction:g} asks for ({target})",
            hint="ask for a larger fraction than the current sparsity",
        )


@dataclass
class _RoundLog:
    """The eps and Fisher columns of each round, and the summed predicted loss increase."""

    eps: list[float] = field(default_factory=list)
    columns: int = 0
    predicted: float | None = None

    def add(self, curv: Curvature, increase: float | None) -> None:
        if curv.eps is not None and curv.dg is not None:
            self.eps.append(curv.eps)
            self.columns = curv.dg.columns
        if increase is not None:
            self.predicted = (self.predicted or 0.0) + increase

    def estimate(self, n: int, method: str) -> Estimate | None:
        return None if self.predicted is None else Estimate.exact_value(self.predicted, n, method)


def _compensate(
    curv: Curvature,
    weights: dict[str, Tensor],
    removed: Mapping[str, Tensor],
    update: bool,
    structure: str,
) -> tuple[dict[str, Tensor], float | None]:
    """The weights after removing `removed` — with the exact OBS update of the others when
    `update` — and the predicted loss increase (None without a Fisher)."""
    if update:
        assert curv.dg is not None and curv.eps is not None
        op = (
            curv.inverse.without(removed)
            if curv.inverse is not None
            else DampedFisher(curv.dg, curv.eps, structure, removed)
        )
        delta, inc = op.remove(weights)
        new = {
            k: (w.double() + delta[k]).to(w.dtype) if k in delta else w for k, w in weights.items()
        }
        return new, inc
    if curv.dg is not None and curv.eps is not None:
        return weights, _masking_increase(curv, weights, removed, structure)
    return weights, None


def _masking_increase(
    curv: Curvature, weights: Mapping[str, Tensor], removed: Mapping[str, Tensor], structure: str
) -> float:
    """``½ δwᵀ (F + eps I) δw`` for ``δw = -w_Q`` (no compensation), from ``J δw``."""
    dg = curv.dg
    assert dg is not None and curv.eps is not None
    total, sq = 0.0, 0.0
    ju = None
    for b in dg.blocks:
        vec = {}
        for k in b.params:
            w = weights[k].detach().to(b.source.dtype)
            vec[k] = w * removed[k] if k in removed else torch.zeros_like(w)
            sq += float(vec[k].double().pow(2).sum())
        part = b.source.jvp(vec).double()
        if structure == "block":
            total += float(part.pow(2).sum()) / dg.n
        else:
            ju = part if ju is None else ju + part
    if ju is not None:
        total += float(ju.pow(2).sum()) / dg.n
    return 0.5 * (total + curv.eps * sq)
