"""`prune_model`: remove a fraction of the prunable weights, in rounds of iterative OBS.

Exactly ``round(fraction · n_prunable)`` weights go (`gmcurv.pruning.target_counts`).
Without update they are simply masked (one round). With the OBS update pruning runs in
``rounds`` rounds; round ``r`` re-captures the gradients at the current weights, ranks the
remaining weights by the criterion (OBS saliency w.r.t. ``H_RR``, the curvature of the
still-free weights), removes the next share (`gmcurv.pruning.round_target`) and applies the
*exact* multi-weight OBS solution ``δw_R = J_Rᵀ (K_R + n eps I)⁻¹ J_Q w_Q`` for everything
removed so far (`gmcurv.saliency.compensation`). One round is the one-shot simultaneous OBS
of Hassibi & Stork 1993 for a set of weights (WoodFisher's multi-weight variant, Singh &
Alistarh 2020); several rounds re-linearise the model between removals, the greedy scheme
of OBC (Frantar et al. 2022) applied to the Fisher in chunks instead of one weight at a
time. The predicted increase is the quadratic model's ``½ δwᵀ(F + eps I)δw`` summed over
the rounds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from gmcurv.data import DataSample
from gmcurv.errors import ConfigError
from gmcurv.estimate import Estimate
from gmcurv.objective import Objective
from gmcurv.pruning import (
    Evaluation,
    apply_masks,
    check_fraction,
    count_removed,
    evaluate,
    round_target,
    select_masks,
    target_counts,
)
from gmcurv.saliency.compensation import compensate
from gmcurv.saliency.criteria import curvature_needs, saliencies
from gmcurv.saliency.curvature import (
    Curvature,
    CurvatureSettings,
    PhaseFn,
    ProgressFn,
    announcer,
)
from gmcurv.saliency.selection import check_below_target, prunable_names, removed_from_masks
from gmcurv.woodbury import DEFAULT_DAMPING, DampedFisher

DEFAULT_ROUNDS = 8

# ranker(weights, round, removed) -> saliencies of the prunable weights to rank by
Ranker = Callable[[Mapping[str, Tensor], int, Mapping[str, Tensor]], dict[str, Tensor]]
# the same, given the round's curvature: what a round ranks by
_Rank = Callable[[dict[str, Tensor], int, Mapping[str, Tensor], Curvature], dict[str, Tensor]]


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


def effective_rounds(criterion: str, update: bool | None, rounds: int) -> int:
    """Rounds `prune_model` runs: `rounds` with the OBS update (the default for OBS), else 1."""
    return rounds if ((criterion == "obs") if update is None else update) else 1


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
    ranker: Ranker | None = None,
    ranker_name: str | None = None,
    phase: PhaseFn | None = None,
) -> PruneResult:
    """Remove exactly ``round(fraction * n_prunable)`` weights (see the module doc).

    `update` defaults to True for OBS; `rounds` only matters with the update. The
    objective's parameters are restored afterwards; the new ones are in the result.
    `ranker(weights, round, removed)`: saliencies of the prunable weights to rank by instead of
    `criterion`'s exact ones (e.g. the learned head's, at the objective's current weights);
    the OBS update stays exact. `ranker_name` is then the reported criterion.
    `phase(label, total)` announces each step of each round, `progress(k)` counts its units.
    """
    fraction = check_fraction(fraction)
    if rounds < 1:
        raise ConfigError(f"--rounds must be at least 1, got {rounds}")
    update = (criterion == "obs") if update is None else update
    rounds = effective_rounds(criterion, update, rounds)
    names = prunable_names(objective, include_bias, masks)
    removed = {k: v for k, v in removed_from_masks(masks, objective).items() if k in names}
    original = {k: p.detach().clone() for k, p in objective.params.items()}
    sizes = {k: original[k].numel() for k in names}
    already = count_removed(removed)
    check_below_target(sizes, fraction, scope, removed)
    ev = eval_data or data
    before = evaluate(objective, ev, batch_size)
    settings = CurvatureSettings(
        fisher, mc_samples, damping, structure, batch_size, seed, probes, budget_bytes, progress,
        phase,
    )  # fmt: skip
    needs = curvature_needs([] if ranker is not None else [criterion], update)
    rank = _ranking(criterion, names, sizes, ranker)
    final = target_counts(sizes, fraction, scope)
    current, removed, log = _run_rounds(
        objective, data, settings, needs, rank, final, rounds, update, original, removed
    )
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


def _ranking(
    criterion: str, names: Sequence[str], sizes: Mapping[str, int], ranker: Ranker | None
) -> _Rank:
    """What a round ranks by: `ranker`'s values (restricted to the prunable tensors) or the
    criterion's exact saliencies at the round's curvature."""
    if ranker is not None:
        return lambda w, r, removed, curv: {
            k: v for k, v in ranker(w, r, removed).items() if k in sizes
        }
    return lambda w, r, removed, curv: saliencies(criterion, w, names, curv)[0]


def _run_rounds(
    objective: Objective,
    data: DataSample,
    settings: CurvatureSettings,
    needs: set[str],
    rank: _Rank,
    final: int | dict[str, int],
    rounds: int,
    update: bool,
    original: dict[str, Tensor],
    removed: dict[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, Tensor], _RoundLog]:
    """Each round: curvature at the current weights, rank, remove the round's share,
    compensate. Returns the final weights and removal masks and the rounds' log; the
    objective's parameters are restored to `original` whatever happens."""
    current = dict(original)
    log = _RoundLog()
    outer = settings
    try:
        for r in range(1, rounds + 1):
            _set_weights(objective, current)
            settings = replace(outer, phase=_in_round(outer.phase, r, rounds))
            curv = settings.at(objective, data, needs, removed, r)
            sal = rank(current, r, removed, curv)
            removed = select_masks(sal, round_target(final, removed, r, rounds), removed)
            if update and curv.dg is not None:
                groups = DampedFisher.group_blocks(curv.dg, settings.structure)
                announcer(settings.phase)("OBS update (kernel groups)", len(groups))
            current, inc = compensate(
                curv, current, removed, update, settings.structure, settings.progress
            )
            log.add(curv, inc)
            current = apply_masks(current, removed)
    finally:
        _set_weights(objective, original)
    return current, removed, log


def _in_round(phase: PhaseFn | None, r: int, rounds: int) -> PhaseFn | None:
    """`phase` with the labels prefixed by ``round r/rounds:`` (when there are several)."""
    if phase is None or rounds == 1:
        return phase
    return lambda label, total: phase(f"round {r}/{rounds}: {label}", total)


def _set_weights(objective: Objective, weights: Mapping[str, Tensor]) -> None:
    with torch.no_grad():
        for k, p in objective.params.items():
            if k in weights:
                p.copy_(weights[k].to(p.dtype))


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
