"""The model-Fisher diagonal of an MLP from its decomposed gradients (label noise averaged out).

Example ``n``'s delta at layer ``l`` is linear in the output delta ``v_n = p_n - e_{y_n}``
(cross-entropy, ``p_n`` the softmax)::

    delta_{L-1}[n] = v_n,    delta_l[n] = σ'(z_l[n]) ⊙ (W_{l+1}^T delta_{l+1}[n])

so the delta it would have had with label ``c`` is the same backward pass from
``p_n - e_c``. Averaging over ``c ~ p_n`` gives the per-example diagonal of
``J_l^T (diag p_n - p_n p_n^T) J_l`` (the output-space curvature of the loss, pulled back)::

    m_l[n, j] = Σ_c p_nc delta_l^{(c)}[n, j]^2
    M_l[j, i] = mean_n m_l[n, j] x_l[n, i]^2          (bias: mean_n m_l[n, j])

``M`` is the model-Fisher (GGN) diagonal on the same ``b`` examples: the empirical Fisher
diagonal's label draws replaced by their expectation under the model, so it is far less
noisy than the plug-in but biased wherever the model's probabilities are off. The head
reads it rescaled to the plug-in's total per layer (`scaled_model_fisher`): its shape,
the plug-in's scale.

Everything comes from what the gradient set already holds: ``p_n = v_n + e_{y_n}`` (the
label is the one negative entry of ``v_n``), and ``σ'(z_l)`` from the layer's output
``x_{l+1} = σ(z_l)`` for activations that can be inverted that way, otherwise (GELU, SiLU)
from the ratio ``delta_l / (W_{l+1}^T delta_{l+1})`` where its denominator is not
negligible (zero elsewhere).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class GradientSet(Protocol):
    """What is read of `gmcurv.gradmetanet.features.GradientSet` (which imports this)."""

    x: tuple[Tensor, ...]
    delta: tuple[Tensor, ...]
    weight: tuple[Tensor, ...]
    activation: str

    @property
    def b(self) -> int: ...

    @property
    def depth(self) -> int: ...


_RATIO_TOL = 1e-9  # |W^T delta| below this times its largest value: σ' not readable, set 0


def activation_slope(gs: GradientSet, l: int) -> Tensor:
    """``σ'(z_l)`` of hidden layer ``l`` (``0 <= l < L-1``) per example, ``[b, O_l]``."""
    x = gs.x[l + 1]
    act = gs.activation
    if act == "relu":
        return (x > 0).to(x.dtype)
    if act == "leaky_relu":
        return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, 0.01))
    if act == "tanh":
        return 1.0 - x * x
    if act == "sigmoid":
        return x * (1.0 - x)
    if act == "identity":
        return torch.ones_like(x)
    if act == "elu":
        return torch.where(x > 0, torch.ones_like(x), x + 1.0)
    if act == "softplus":
        return -torch.expm1(-x)
    den = gs.delta[l + 1] @ gs.weight[l + 1]  # [b, O_l]
    ok = den.abs() > _RATIO_TOL * den.abs().max().clamp_min(1e-300)
    return torch.where(ok, gs.delta[l] / torch.where(ok, den, torch.ones_like(den)), 0.0)


def output_probabilities(gs: GradientSet) -> Tensor:
    """``p_n = delta_out[n] + e_{y_n}``, ``y_n`` the only negative entry, ``[b, C]``."""
    d = gs.delta[-1]
    p = d.clone()
    p[torch.arange(d.shape[0]), d.argmin(1)] += 1.0
    return p.clamp_min(0.0)


def label_averaged_squares(gs: GradientSet) -> list[Tensor]:
    """``m_l[n, j] = Σ_c p_nc delta_l^{(c)}[n, j]^2`` per layer ``l``, ``[b, O_l]``."""
    p = output_probabilities(gs)
    C = p.shape[1]
    v = p[None] - torch.eye(C, dtype=p.dtype)[:, None, :]  # [C, b, C]: p_n - e_c
    out: list[Tensor] = [torch.empty(0)] * gs.depth
    for l in range(gs.depth - 1, -1, -1):
        if l < gs.depth - 1:
            v = (v @ gs.weight[l + 1]) * activation_slope(gs, l)[None]
        out[l] = torch.einsum("nc,cnj->nj", p, v * v)
    return out


def model_fisher_diagonal(gs: GradientSet) -> tuple[list[Tensor], list[Tensor]]:
    """``M_l`` ``[O_l, I_l]`` and its bias part ``[O_l]`` per layer (see module doc)."""
    ms = label_averaged_squares(gs)
    w = [m.T @ x.pow(2) / gs.b for m, x in zip(ms, gs.x, strict=True)]
    return w, [m.mean(0) for m in ms]


def rescaled(shape: Tensor, plug: Tensor) -> Tensor:
    """``shape · Σ plug / Σ shape``; the plug-in itself where ``shape`` sums to zero."""
    total = float(shape.sum())
    return shape * (float(plug.sum()) / total) if total > 0 else plug
