"""Loss/accuracy over sparsity levels: the masking sweep and the one-shot OBS-update sweep.

At each level ``f`` the ``round(f · n_prunable)`` least salient weights (per tensor with
``scope='layer'``; ties broken by position, `gmcurv.pruning.select_masks`) are removed and
the model is evaluated on the evaluation data:

- masking: ``w ← w ⊙ (1 - R)``, no update;
- OBS update: ``w_R ← w_R + δw_R`` with the exact multi-weight OBS solution for the whole
  removed set (`gmcurv.saliency.compensation`), reported with the quadratic model's
  predicted increase ``½ δwᵀ(F + eps I)δw``. When a level's set contains the previous
  one, the previous level's reduced inverse is reduced further (`DampedFisher.without`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

from gmcurv.data import DataSample
from gmcurv.estimate import Estimate
from gmcurv.objective import Objective
from gmcurv.pruning import apply_masks, count_removed, evaluate, select_masks, target_counts
from gmcurv.saliency.compensation import add_update
from gmcurv.woodbury import DampedFisher


@dataclass(frozen=True)
class SweepPoint:
    """Loss and accuracy after removing `fraction` of the prunable weights."""

    fraction: float
    n_removed: int
    loss: Estimate
    accuracy: Estimate | None
    predicted_increase: Estimate | None = None


def masking_sweep(
    objective: Objective,
    ev: DataSample,
    weights: Mapping[str, Tensor],
    saliency: Mapping[str, Tensor],
    sizes: Mapping[str, int],
    levels: Sequence[float],
    scope: str,
    removed: Mapping[str, Tensor],
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[SweepPoint]:
    """Loss/accuracy after masking the least salient weights at each level (no update);
    `progress(1)` per level."""
    points = []
    for f in levels:
        m = select_masks(saliency, target_counts(sizes, f, scope), removed)
        res = evaluate(objective, ev, batch_size, apply_masks(weights, m))
        points.append(SweepPoint(f, count_removed(m), res.loss, res.accuracy))
        if progress is not None:
            progress(1)
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
    progress: Callable[[int], None] | None = None,
) -> list[SweepPoint]:
    """Loss/accuracy after removing the least salient weights by `saliency` at each level
    and applying the exact one-shot OBS update of the rest (`DampedFisher.remove`), with
    the quadratic model's predicted increase. The ranking may come from anywhere (exact
    OBS, or the learned head); the update is always exact. `progress(1)` per level."""
    points = []
    current, prev = inverse, None
    for f in levels:
        m = select_masks(saliency, target_counts(sizes, f, scope), removed)
        nested = prev is not None and all(bool((prev[k] <= m[k]).all()) for k in m)
        current = (current if nested else inverse).without(m)
        delta, inc = current.remove(weights)
        new = apply_masks(add_update(weights, delta), m)
        res = evaluate(objective, ev, batch_size, new)
        pred = Estimate.exact_value(inc, n, "quadratic model ½δwᵀ(F+εI)δw")
        points.append(SweepPoint(f, count_removed(m), res.loss, res.accuracy, pred))
        prev = m
        if progress is not None:
            progress(1)
    return points
