"""``gmcurv saliency`` without ``--prune``: per-tensor statistics and the sparsity curves.

One curvature capture at the checkpoint's weights gives every criterion's per-weight
saliency (`gmcurv.saliency.criteria`); their per-tensor statistics are taken over the
weights not already pruned. Each criterion then gets a masking curve over the levels
``f ∈ LEVELS`` (loss/accuracy after removing the least salient ``round(f · n)`` weights), and
``obs`` also an ``obs+update`` curve with the exact one-shot OBS compensation and its
predicted increase (`gmcurv.saliency.sweep`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import Tensor

from gmcurv.data import DataSample
from gmcurv.estimate import Estimate
from gmcurv.objective import Objective
from gmcurv.pruning import Evaluation, check_fraction, count_removed, evaluate
from gmcurv.saliency.criteria import CONVENTION, criteria_statistics, curvature_needs
from gmcurv.saliency.curvature import CurvatureSettings, PhaseFn, ProgressFn, announcer
from gmcurv.saliency.selection import fits, prunable_names, removed_from_masks
from gmcurv.saliency.sweep import SweepPoint, masking_sweep, obs_update_sweep
from gmcurv.woodbury import DEFAULT_DAMPING

LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)


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
    phase: PhaseFn | None = None,
) -> SaliencyAnalysis:
    """Per-tensor saliency statistics of each criterion and the loss/accuracy curves.

    The curves mask the least salient ``fraction`` of prunable weights (no update); with
    `update_curve` an ``obs+update`` curve adds the exact one-shot OBS compensation.
    `phase(label, total)` announces each step (`curvature_at`'s, then the curves, counted
    in model evaluations), `progress(k)` counts its units.
    """
    levels = sorted(check_fraction(f) for f in levels)
    names = prunable_names(objective, include_bias, masks)
    removed = removed_from_masks(masks, objective)
    weights = {k: p.detach().clone() for k, p in objective.params.items()}
    update_curve = update_curve and "obs" in criteria
    settings = CurvatureSettings(
        fisher, mc_samples, damping, structure, batch_size, seed, probes, budget_bytes, progress,
        phase,
    )  # fmt: skip
    curv = settings.at(objective, data, curvature_needs(criteria, False), removed)
    ev = eval_data or data
    baseline = evaluate(objective, ev, batch_size)
    sizes = {k: weights[k].numel() for k in names}
    scores, stderrs, layers = criteria_statistics(criteria, weights, names, removed, curv, fisher)
    usable = [f for f in levels if fits(sizes, f, scope, removed)]
    curves = len(criteria) + int(update_curve)
    announcer(phase)("pruning curves (model evaluations)", curves * len(usable))
    sweep = {
        crit: masking_sweep(
            objective, ev, weights, scores[crit], sizes, usable, scope, removed, batch_size,
            progress,
        )
        for crit in criteria
    }  # fmt: skip
    if update_curve:
        assert curv.inverse is not None
        sweep["obs+update"] = obs_update_sweep(
            objective, ev, weights, scores["obs"], curv.inverse, sizes, usable, scope,
            removed, batch_size, data.n, progress,
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
