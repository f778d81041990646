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

The package, one concept per module (each imports only the ones above it):

- `curvature` — what the criteria need at the current weights (`curvature_at`);
- `criteria` — the per-weight values of the table and their per-tensor statistics;
- `selection` — which weights may go, given a checkpoint's masks;
- `compensation` — the OBS update of the remaining weights, the quadratic model's cost;
- `sweep` — loss/accuracy curves over sparsity levels, masked or OBS-updated;
- `analysis` — `saliency_analysis`, everything ``gmcurv saliency`` reports without --prune;
- `rounds` — `prune_model`, pruning in rounds of iterative OBS.
"""

from __future__ import annotations

from gmcurv.saliency.analysis import LEVELS, LayerSaliency, SaliencyAnalysis, saliency_analysis
from gmcurv.saliency.criteria import (
    CONVENTION,
    CRITERIA,
    STATS,
    criteria_statistics,
    criterion_method,
    curvature_needs,
    layer_statistics,
    saliencies,
)
from gmcurv.saliency.curvature import (
    Curvature,
    CurvatureSettings,
    ProgressFn,
    curvature_at,
    kernel_bytes,
)
from gmcurv.saliency.rounds import (
    DEFAULT_ROUNDS,
    LayerSparsity,
    PruneResult,
    Ranker,
    effective_rounds,
    prune_model,
)
from gmcurv.saliency.sweep import SweepPoint, masking_sweep, obs_update_sweep

__all__ = [
    "CONVENTION",
    "CRITERIA",
    "DEFAULT_ROUNDS",
    "LEVELS",
    "STATS",
    "Curvature",
    "CurvatureSettings",
    "LayerSaliency",
    "LayerSparsity",
    "ProgressFn",
    "PruneResult",
    "Ranker",
    "SaliencyAnalysis",
    "SweepPoint",
    "criteria_statistics",
    "criterion_method",
    "curvature_at",
    "curvature_needs",
    "effective_rounds",
    "kernel_bytes",
    "layer_statistics",
    "masking_sweep",
    "obs_update_sweep",
    "prune_model",
    "saliencies",
    "saliency_analysis",
]
