"""Per-layer-role blend of the head's Fisher-diagonal log-ratio with structured estimators.

The equivariant head (`model.GradMetaNet`) outputs a log-ratio ``r`` to the plug-in per
parameter. Head v1.2 replaces its Fisher-diagonal channel by a linear map, one per layer
role ``ρ`` (first, hidden, output layer; weights and biases separately)::

    r'_q = θ_ρ · φ_q,   φ_q = (1, r_q, Δ_M, Δ_S, Δ_K, s, r_q s, Δ_M s)       (weights)
                        φ_q = (1, r_q, Δ_M, s, r_q s, Δ_M s)                   (biases)

with ``Δ_X = log X_q - log P_q`` (clamped to ±`CLAMP`) for the model-Fisher diagonal
rescaled to the plug-in's layer total (``M``, `modelfisher`), the per-entry shrinkage
towards K-FAC (``S``) and K-FAC (``K``), and ``s`` the log relative standard error of the
plug-in entry — all read off the head's input (`features.encode`). ``θ = (0, 1, 0, ...)``
reproduces the head, ``θ = 0`` the plug-in. The few coefficients are fitted on training
models with the head frozen (``bench/gradmetanet/fit_layer_blend.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gmcurv.gradmetanet.features import (
    BIAS_MODEL_FISHER,
    EDGE_MODEL_FISHER,
    LOG_SCALE,
)

ROLES = ("first", "hidden", "output")
WEIGHT_TERMS = 8
BIAS_TERMS = 6
CLAMP = 5.0  # bound on the log-ratios of the structured estimators to the plug-in


def layer_role(l: int, depth: int) -> int:
    """0 first, 1 hidden, 2 output (a one-layer model is its output layer)."""
    return 2 if l == depth - 1 else (0 if l == 0 else 1)


def weight_terms(r: Tensor, e: Tensor) -> Tensor:
    """``φ`` of the weights, ``[..., O, I, WEIGHT_TERMS]`` from ``r`` and the edges ``e``."""
    lp = e[..., 0]

    def delta(col: int) -> Tensor:
        return ((e[..., col] - lp) / LOG_SCALE).clamp(-CLAMP, CLAMP)

    dm, ds, dk = delta(EDGE_MODEL_FISHER), delta(5), delta(1)
    s = e[..., 4] / LOG_SCALE
    return torch.stack([torch.ones_like(r), r, dm, ds, dk, s, r * s, dm * s], -1)


def bias_terms(r: Tensor, e: Tensor) -> Tensor:
    """``φ`` of the biases, ``[..., O, BIAS_TERMS]``."""
    dm = ((e[..., BIAS_MODEL_FISHER] - e[..., 0]) / LOG_SCALE).clamp(-CLAMP, CLAMP)
    s = e[..., 3] / LOG_SCALE
    return torch.stack([torch.ones_like(r), r, dm, s, r * s, dm * s], -1)


class LayerBlend(nn.Module):
    """``θ`` per role (see module doc), initialised to reproduce the head."""

    def __init__(self) -> None:
        super().__init__()
        w = torch.zeros(len(ROLES), WEIGHT_TERMS)
        b = torch.zeros(len(ROLES), BIAS_TERMS)
        w[:, 1] = 1.0
        b[:, 1] = 1.0
        self.theta_w = nn.Parameter(w)
        self.theta_b = nn.Parameter(b)

    def forward(self, l: int, depth: int, r: Tensor, edges: Tensor, bias: bool = False) -> Tensor:
        """The blended Fisher log-ratio of layer ``l``'s weights (or biases)."""
        k = layer_role(l, depth)
        if bias:
            return bias_terms(r, edges) @ self.theta_b[k].to(r.dtype)
        return weight_terms(r, edges) @ self.theta_w[k].to(r.dtype)
