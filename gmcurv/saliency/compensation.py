"""Removing weights: the OBS update of the others and the quadratic model's predicted cost.

Removing the set ``Q`` (``δw_Q = -w_Q``) under ``½ δwᵀ(F + eps I)δw`` costs, without
compensation, ``½ (‖J δw‖²/n + eps ‖w_Q‖²)`` (``F = JᵀJ/n``, per layer block or whole).
With compensation the remaining weights ``R`` move by the exact multi-weight OBS solution
``δw_R = J_Rᵀ (K_R + n eps I)⁻¹ J_Q w_Q`` (Hassibi & Stork 1993; Singh & Alistarh 2020),
computed by `gmcurv.woodbury.DampedFisher.remove`, which also returns its cost.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from gmcurv.saliency.curvature import Curvature
from gmcurv.woodbury import DampedFisher


def add_update(weights: Mapping[str, Tensor], delta: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``w + δw`` (in float64, cast back to each weight's dtype) for the tensors in `delta`."""
    return {k: (w.double() + delta[k]).to(w.dtype) if k in delta else w for k, w in weights.items()}


def compensate(
    curv: Curvature,
    weights: dict[str, Tensor],
    removed: Mapping[str, Tensor],
    update: bool,
    structure: str,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, Tensor], float | None]:
    """The weights after removing `removed` — with the exact OBS update of the others when
    `update` — and the predicted loss increase (None without a Fisher). `progress(1)` per
    kernel group downdated or built."""
    if update:
        assert curv.dg is not None and curv.eps is not None
        op = (
            curv.inverse.without(removed, progress)
            if curv.inverse is not None
            else DampedFisher(curv.dg, curv.eps, structure, removed, progress=progress)
        )
        delta, inc = op.remove(weights)
        return add_update(weights, delta), inc
    if curv.dg is not None and curv.eps is not None:
        return weights, masking_increase(curv, weights, removed, structure)
    return weights, None


def masking_increase(
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
