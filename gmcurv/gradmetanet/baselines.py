"""The exact engine on the head's own ``b`` examples: what ``--method learned`` prints beside
the head, so that a user sees what the head adds.

On the set ``S`` of ``b`` examples the head reads (means over ``S``):

- plug-in, the empirical Fisher of the set: ``tr F_S``, ``λ_max(F_S)`` (`features.PlugIn`);
- the GGN of the set (the exact Fisher of a softmax, from the C-class square-root factors,
  ``G_S = (1/b) Σ_n Σ_c g[n,c] g[n,c]^T``): ``tr G_S`` and ``λ_max(G_S)`` (Gram route);
- the exact Hessian trace of the set, ``tr ∇²L_S`` (`targets.batch_hessian_diagonal_sum`).

All three are exact on ``S`` and estimate the full-data value with the sampling error of
``b`` examples; none is learned.

`winsorised_diagonal` is the strongest *non-learned* estimator of the full-data Fisher
diagonal from the same ``b`` gradients that we found (the shrinkage baseline the head's
card compares with): each example's contribution ``g_n²`` is scaled by
``min(1, c / s_n)``, ``s_n = ||g_n||²`` and ``c`` the `WINSOR_QUANTILE` quantile of the
``s_n`` of the set, so that the few examples that dominate a heavy-tailed set count less::

    F̂_q = (1/b) Σ_n min(1, c / s_n) g_n[q]²

It trades a downward bias for much less variance (mean absolute error is what the card
scores). James-Stein shrinkage of the plug-in towards its K-FAC (``E[δ²] E[a²]``) or rank-1
pooled estimate was measured too and does worse than the plug-in on these MLPs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from gmcurv.batch import Batch
from gmcurv.capture import Capturer
from gmcurv.fisher import fisher_eigen, fisher_trace
from gmcurv.gradmetanet.features import GradientSet, MLPChain, PlugIn
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


WINSOR_QUANTILE = 0.95  # chosen on the tasks zoo's val + calib splits (see the card)


def winsorised_diagonal(
    gs: GradientSet, quantile: float = WINSOR_QUANTILE
) -> tuple[list[Tensor], list[Tensor | None]]:
    """Winsorised Fisher diagonal of a gradient set (see module doc): per layer the weight
    table ``[O, I]`` and the bias vector ``[O]`` (None without a bias), float64."""
    sq = sum(
        d.pow(2).sum(1) * (x.pow(2).sum(1) + (0.0 if bb is None else 1.0))
        for d, x, bb in zip(gs.delta, gs.x, gs.bias, strict=True)
    )  # s_n = ||g_n||^2
    cap = torch.quantile(sq, quantile)
    w = torch.where(sq > cap, cap / sq.clamp_min(1e-300), torch.ones_like(sq)) / gs.b
    diag_w, diag_b = [], []
    for x, d, bb in zip(gs.x, gs.delta, gs.bias, strict=True):
        d2 = d.pow(2)
        diag_w.append(torch.einsum("n,nj,ni->ji", w, d2, x.pow(2)))
        diag_b.append(None if bb is None else torch.einsum("n,nj->j", w, d2))
    return diag_w, diag_b
