"""Fisher columns of the softmax cross-entropy, per token, weighted by ``w`` (`tokens`).

With ``p = softmax(f)``, ``∂ℓ/∂f = p - e_y`` and the output Hessian is
``Λ = diag(p) - p pᵀ = Σ_c s_c s_cᵀ`` with ``s_c = sqrt(p_c) (e_c - p)``:

- empirical: one column ``w (p - e_y)`` at the observed label ``y``;
- mc: ``k`` columns ``w (p - e_ŷ) / sqrt(k)`` at labels ``ŷ ~ p`` drawn by inverse CDF from
  per-example uniforms;
- exact: one column ``w_t s_c`` per (token, class), zero on the other tokens.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def empirical_columns(p: Tensor, targets: Tensor, w: Tensor) -> Tensor:
    """``[1, N, *tok, C]``: ``w (p - e_y)`` (ignored tokens have ``w = 0``), as ``w p`` with
    ``w`` subtracted at ``y`` in place (no one-hot of the vocabulary's size)."""
    w = w.expand(*p.shape[:-1], 1)
    cols = w * p
    return cols.scatter_add_(-1, targets.clamp_min(0).unsqueeze(-1), -w).unsqueeze(0)


def mc_columns(
    p: Tensor, w: Tensor, uniforms: Tensor, mc_samples: int, out: Tensor | None = None
) -> Tensor:
    """``[k, N, *tok, C]`` from `uniforms` ``[N, k, *tok]``: ``ŷ`` is the class whose
    cumulative probability first exceeds the uniform (`torch.searchsorted` on the
    non-decreasing CDF: the number of classes with ``cdf <= u``). Built as ``w p`` with the
    drawn entry replaced by ``w (p_ŷ - 1)`` (no one-hot tensor; bitwise the same as
    ``w (p - e_ŷ)``), then divided by ``sqrt(k)`` when ``k > 1``; written into `out`
    (e.g. a view of a padded buffer) when given."""
    n_classes = p.shape[-1]
    u = uniforms.to(p.dtype).movedim(1, 0)  # [k, N, *tok] uniforms
    k_samples = u.shape[0]
    if out is None:
        out = p.new_empty(k_samples, *p.shape)
    cdf = p.cumsum(-1)
    for k in range(k_samples):
        draws = torch.searchsorted(cdf, u[k].unsqueeze(-1).contiguous(), right=True)
        draws = draws.clamp_max_(n_classes - 1)  # [N, *tok, 1]
        col = torch.mul(w, p, out=out[k])
        col.scatter_(-1, draws, w * (p.gather(-1, draws) - 1.0))
        if mc_samples != 1:
            col.div_(math.sqrt(mc_samples))
    return out


def exact_columns(p: Tensor, w: Tensor) -> Tensor:
    """``[T C, N, *tok, C]``: columns ``w_t sqrt(p_c) (e_c - p)`` for every (token, class),
    zero elsewhere."""
    n = p.shape[0]
    tok_shape, n_classes = p.shape[1:-1], p.shape[-1]
    n_tok = math.prod(tok_shape)
    pf = p.reshape(n, n_tok, n_classes)
    wf = w.reshape(n, n_tok, 1)
    eye = torch.eye(n_classes, dtype=p.dtype, device=p.device)
    # s[n, t, c, :] = w_t sqrt(p_c) (e_c - p_t)
    s = wf.unsqueeze(-1) * pf.sqrt().unsqueeze(-1) * (eye - pf.unsqueeze(-2))
    cols = p.new_zeros(n_tok, n_classes, n, n_tok, n_classes)
    idx = torch.arange(n_tok, device=p.device)
    cols[idx, :, :, idx, :] = s.permute(1, 2, 0, 3)
    return cols.reshape(n_tok * n_classes, *p.shape)


def hessian_vp(p: Tensor, w: Tensor, v: Tensor) -> Tensor:
    """``w Λ v = w (p ⊙ v - p <p, v>)`` per token."""
    return w * (p * v - p * (p * v).sum(-1, keepdim=True))
