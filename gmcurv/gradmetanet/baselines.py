"""The exact engine on the head's own ``b`` examples: what ``--method learned`` prints beside
the head, so that a user sees what the head adds.

On the set ``S`` of ``b`` examples the head reads (means over ``S``):

- plug-in, the empirical Fisher of the set: ``tr F_S``, ``λ_max(F_S)`` (`features.PlugIn`);
- the GGN of the set (the exact Fisher of a softmax, from the C-class square-root factors,
  ``G_S = (1/b) Σ_n Σ_c g[n,c] g[n,c]^T``): ``tr G_S`` and ``λ_max(G_S)`` (Gram route);
- the exact Hessian trace of the set, ``tr ∇²L_S`` (`targets.batch_hessian_diagonal_sum`).

All three are exact on ``S`` and estimate the full-data value with the sampling error of
``b`` examples; none is learned.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from gmcurv.batch import Batch
from gmcurv.capture import Capturer
from gmcurv.fisher import fisher_eigen, fisher_trace
from gmcurv.gradmetanet.features import MLPChain, PlugIn
from gmcurv.gradmetanet.targets import batch_hessian_diagonal_sum
from gmcurv.objective import Objective


@dataclass(frozen=True)
class SameSetBaselines:
    """Exact curvature of the head's ``b`` examples (see module doc); ``seconds`` their cost."""

    b: int
    fisher_trace: float
    fisher_top: float
    ggn_trace: float
    ggn_top: float
    hessian_trace: float
    seconds: float


def same_set_baselines(
    objective: Objective, batch: Batch, chain: MLPChain, plug: PlugIn, seed: int = 0
) -> SameSetBaselines:
    """GGN trace and top eigenvalue and the exact Hessian trace on `batch` (+ the plug-in)."""
    t0 = time.perf_counter()
    dg = Capturer(objective, "exact", 1, seed)(batch)
    ggn_trace = fisher_trace(dg)
    ggn_top = float(fisher_eigen(dg, k=1, seed=seed).values[0])
    hdiag = batch_hessian_diagonal_sum(objective, batch, chain)
    b = len(batch)
    hessian_trace = float(sum(v.sum() for v in hdiag.values())) / b
    return SameSetBaselines(
        b, plug.trace, plug.top, ggn_trace, ggn_top, hessian_trace, time.perf_counter() - t0
    )
