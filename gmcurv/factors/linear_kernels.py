"""Closed forms for Linear-layer gradients ``g[n,c] = Σ_t δ[n,c,t] a[n,t]ᵀ``, ``a = [x, 1]``.

Inner products of such gradients factor over token pairs, ``<g[n,c], g[m,c']> =
Σ_{t,s} (δ[n,c,t]·δ[m,c',s]) (a[n,t]·a[m,s])``, costing ``~T² (O + I)`` per pair of
examples against ``~O I`` for materialised gradients (`gmcurv.factors.linear` picks the
route). ``δ: [N, C, T, O]``, ``x: [N, T, I]``; `has_weight` / `has_bias` say which parts of
``a`` the block holds (a bias is the trailing input column of ones).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gmcurv.factors.source import rows_gram

CACHE_ELEMENTS = 1 << 18  # ~1 MB of float32: chunks for streaming reductions stay in cache


def pair_kernel(xx: Tensor, has_weight: bool, has_bias: bool) -> Tensor:
    """Input-side kernel ``a·a' = w x·x' + b`` from ``xx = x·x'`` (weight/bias flags)."""
    out = xx if has_weight else torch.zeros_like(xx)
    return out + 1.0 if has_bias else out


def sq_norms(delta: Tensor, x: Tensor, has_weight: bool, has_bias: bool) -> Tensor:
    """``||g[n,c]||² = Σ_{t,s} (δ_t·δ_s)(a_t·a_s)``, shape ``[N, C]``."""
    if delta.shape[2] == 1:
        xx = x[:, 0].pow(2).sum(-1)[:, None]
        return delta[:, :, 0].pow(2).sum(-1) * pair_kernel(xx, has_weight, has_bias)
    dd = torch.einsum("ncto,ncso->ncts", delta, delta)
    aa = pair_kernel(torch.einsum("nti,nsi->nts", x, x), has_weight, has_bias)
    return torch.einsum("ncts,nts->nc", dd, aa)


def gram(
    delta: Tensor, x: Tensor, has_weight: bool, has_bias: bool, dtype: torch.dtype = torch.float64
) -> Tensor:
    """``K[(n,c),(m,c')] = Σ_{t,s} (δ[n,c,t]·δ[m,c',s])(a[n,t]·a[m,s])``, returned in `dtype`.

    By blocks of examples (at least `GEMM_ROWS` rows, at most `PAIR_ELEMENTS` token pairs),
    each block's rows against its own and the later examples' rows only (``K`` is
    symmetric: about half the products): ``D_b D_{>=b}ᵀ`` (inner dimension ``O``) and
    ``A_b A_{>=b}ᵀ`` (inner ``I``) as large GEMMs by `rows_gram` (float32 factors: float32
    products over inner chunks of ``GEMM_CHUNK`` summed in float64; float64 factors:
    float64 products), their Hadamard product (in the products' dtype) summed over token
    pairs in float64. Cost about ``(N T)²/2 (C² O + I)`` multiply-adds in large GEMMs.
    """
    if delta.shape[2] == 1:
        return one_token_gram(delta, x, has_weight, has_bias, dtype)
    n, c, t, o = delta.shape
    d = delta.contiguous().reshape(n * c * t, o)  # a view when C = 1 (or contiguous)
    a = inputs_with_bias(x, has_weight, has_bias)  # [N, T, I']
    a_all = a.reshape(n * t, -1)
    K = torch.empty(n * c, n * c, dtype=torch.float64, device=delta.device)
    step = max(1, min(-(-GEMM_ROWS // (c * t)), PAIR_ELEMENTS // (c * t * n * c * t)))
    for lo in range(0, n, step):
        hi, m = min(n, lo + step), n - lo
        r = hi - lo
        dd = rows_gram(d[lo * c * t : hi * c * t], d[lo * c * t :])  # [r C T, m C T]
        if a.shape[-1]:
            aa = rows_gram(a_all[lo * t : hi * t], a_all[lo * t :]).to(dd.dtype)  # [r T, m T]
        else:  # neither weight nor bias: no gradient
            aa = dd.new_zeros(r * t, m * t)
        prod = dd.view(r, c, t, m, c, t) * aa.view(r, 1, t, m, 1, t)
        blk = prod.sum(-1, dtype=torch.float64).sum(2).reshape(r * c, m * c)
        K[lo * c : hi * c, lo * c :] = blk
        K[lo * c :, lo * c : hi * c] = blk.T
    return K.to(dtype)


def inputs_with_bias(x: Tensor, has_weight: bool, has_bias: bool) -> Tensor:
    """``a = [x, 1]`` restricted to the parts the block holds (``[N, T, I']``)."""
    parts = [x] if has_weight else []
    if has_bias:
        parts.append(x.new_ones(*x.shape[:-1], 1))
    if not parts:
        return x[..., :0]
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


PAIR_ELEMENTS = 1 << 22  # token pairs of `gram` formed at once (32 MB of float64)
GEMM_ROWS = 256  # rows of a block's side in `gram` (fewer: the GEMMs lose efficiency)
TOKEN_PAIR_OVERHEAD = 256  # per token pair: the Hadamard product and its sums


def token_pair_cost(n: int, c: int, t: int, o: int, i: int) -> int:
    """Cost of `gram` in multiply-adds (about half the pairs of examples): both sides'
    GEMMs plus `TOKEN_PAIR_OVERHEAD` per token pair."""
    return n * (n + 1) // 2 * t * t * (c * c * o + i + TOKEN_PAIR_OVERHEAD)


def one_token_gram(
    delta: Tensor, x: Tensor, has_weight: bool, has_bias: bool, dtype: torch.dtype = torch.float64
) -> Tensor:
    """One prediction per example: ``K = (Δ Δᵀ) ⊙ (A Aᵀ)`` (``Δ: [N C, O]``, ``A = [x, 1]``),
    both products by `rows_gram` in the factors' dtype, the Hadamard product in place,
    returned in `dtype`."""
    n, c = delta.shape[0], delta.shape[1]
    dd = rows_gram(delta[:, :, 0].reshape(n * c, -1))
    x0 = x[:, 0]
    if has_weight:
        aa = rows_gram(x0)
        if has_bias:
            aa.add_(1.0)
    else:
        aa = x0.new_full((n, n), 1.0 if has_bias else 0.0)
    if c > 1:
        aa = aa.repeat_interleave(c, 0).repeat_interleave(c, 1)
    if dd.dtype != aa.dtype:
        dd = dd.double()
    return dd.mul_(aa).to(dtype)


def diag(
    delta: Tensor, x: Tensor, has_weight: bool, has_bias: bool
) -> tuple[Tensor | None, Tensor | None]:
    """``Σ_{n,c} g[n,c]²`` as (weight ``[O, I]``, bias ``[O]``) parts: ``(δ²)ᵀ x²`` for
    one token, else `token_diag`."""
    if delta.shape[2] != 1:
        return token_diag(delta, x, has_weight, has_bias)
    d2 = delta[:, :, 0].pow(2)  # [N, C, O]
    weight = torch.einsum("nco,ni->oi", d2, x[:, 0].pow(2)) if has_weight else None
    bias = d2.sum((0, 1)) if has_bias else None
    return weight, bias


def token_diag(
    delta: Tensor, x: Tensor, has_weight: bool, has_bias: bool
) -> tuple[Tensor | None, Tensor | None]:
    """``Σ_{n,c} (Σ_t δ[n,c,t] x[n,t]ᵀ)²`` for sequences, streamed over examples.

    Each example's gradient must be formed (the square does not factor over tokens);
    examples go in chunks of about ``CACHE_ELEMENTS`` entries, so the ``[r, C, O, I]``
    slab is squared and summed while it is still in cache (memory traffic, not FLOPs,
    bounds this reduction).
    """
    n, c, _, o = delta.shape
    i = x.shape[-1]
    step = max(1, CACHE_ELEMENTS // max(1, c * o * i))
    weight = delta.new_zeros(o, i) if has_weight else None
    bias = delta.new_zeros(o) if has_bias else None
    for start in range(0, n, step):
        d = delta[start : start + step]  # [r, C, T, O]
        if weight is not None:
            xs = x[start : start + step]  # [r, T, I]
            g = torch.matmul(d.transpose(-1, -2), xs[:, None])  # [r, C, O, I]
            weight += g.pow_(2).sum((0, 1))
        if bias is not None:
            bias += d.sum(2).pow_(2).sum((0, 1))
    return weight, bias
