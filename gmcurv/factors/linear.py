"""Gradients of a Linear-type layer as factors: ``g[n,c] = Σ_t δ[n,c,t] a[n,t]ᵀ``.

``nn.Linear``, ``nn.Conv2d`` after unfolding and Hugging Face ``Conv1D`` (transposed weight);
the bias is the trailing input column of ones. The algebra's closed forms are in
`gmcurv.factors.linear_kernels`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from gmcurv.factors import linear_kernels as kernels
from gmcurv.factors.source import CHUNK_ELEMENTS, GradientSource, rows_gram

MATERIALISED_RATE = 2  # weight of a materialised multiply-add against a token-pair one


@dataclass(frozen=True)
class LinearFactors(GradientSource):
    """``g[n,c] = Σ_t delta[n,c,t] a[n,t]^T`` with ``delta: [N,C,T,O]``, ``a = [x, 1]``.

    ``x: [N,T,I_w]`` are the layer's inputs (kept as captured, never copied); the bias acts
    as a trailing input column of ones, handled analytically. `a` materialises ``[x, 1]``
    for callers that want the folded layout. ``names`` holds the weight (``[O, ...]``,
    flattened row-major to ``[O, I_w]``; ``[I_w, O]`` when `transposed`) and/or the bias
    (``[O]``), in that order.
    """

    delta: Tensor
    x: Tensor
    has_weight: bool
    has_bias: bool
    transposed: bool = False  # weight stored [I_w, O] (Hugging Face Conv1D, y = x W + b)

    @property
    def a(self) -> Tensor:
        """``[N, T, I]``: inputs with the bias column of ones appended (when there is a bias)."""
        x = self.x if self.has_weight else self.x[..., :0]
        if not self.has_bias:
            return x
        return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)

    @property
    def n(self) -> int:
        return self.delta.shape[0]

    @property
    def columns(self) -> int:
        return self.delta.shape[1]

    @property
    def tokens(self) -> int:
        return self.delta.shape[2]

    @property
    def device(self) -> torch.device:
        return self.delta.device

    @property
    def dtype(self) -> torch.dtype:
        return self.delta.dtype

    def weight_bias_names(self) -> tuple[str | None, str | None]:
        names = list(self.names)
        w = names.pop(0) if self.has_weight else None
        b = names[0] if self.has_bias else None
        return w, b

    def pack(self, weight: Tensor | None, bias: Tensor | None) -> dict[str, Tensor]:
        """``[..., O, I_w]`` weight part and ``[..., O]`` bias part -> parameter layout."""
        w, b = self.weight_bias_names()
        out = {}
        if w is not None and weight is not None:
            if self.transposed:
                weight = weight.transpose(-1, -2)
            out[w] = weight.reshape(*weight.shape[:-2], *self.shapes[0])
        if b is not None and bias is not None:
            out[b] = bias
        return out

    def materialize(self, rows: slice) -> dict[str, Tensor]:
        d = self.delta[rows]
        weight = torch.einsum("ncto,nti->ncoi", d, self.x[rows]) if self.has_weight else None
        bias = d.sum(2) if self.has_bias else None
        return self.pack(weight, bias)

    def _token_route(self) -> bool:
        """Use token-pair kernels (cost ~T^2 (O+I)) rather than materialising (~T O I)?"""
        t, o, i = self.tokens, self.delta.shape[-1], self.x.shape[-1] + 1
        return t == 1 or t * (o + i) < o * i

    def sq_norms(self) -> Tensor:
        if not self._token_route():
            return super().sq_norms()
        return kernels.sq_norms(self.delta, self.x, self.has_weight, self.has_bias)

    def gram(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """Token pairs (`kernels.gram`: large GEMMs over half the example pairs,
        ``N(N+1)/2 T² (C² O + I)``) or gradients materialised a slab of output units at a
        time for all examples (``N C T O I`` in small-inner-dimension GEMMs, then the
        memory-bound products of ``N C`` rows), whichever costs less; the materialised
        route's multiply-adds count `MATERIALISED_RATE` times (it ran at 10-12 G/s against
        the token route's 22-25 G/s on GPT-2 124M's blocks, 8 x 128 tokens, float32, one
        CPU thread: 0.06-4.1 s against 0.04-1.3 s per block)."""
        n, c, t = self.n, self.columns, self.tokens
        o, i = self.delta.shape[-1], self.x.shape[-1] + 1
        token = kernels.token_pair_cost(n, c, t, o, i)
        materialised = MATERIALISED_RATE * (n * c * (t + n * c) * o * i)
        if t == 1 or token <= materialised:
            return kernels.gram(self.delta, self.x, self.has_weight, self.has_bias, dtype)
        return self._materialised_gram().to(dtype)

    def _materialised_gram(self) -> Tensor:
        """``K = Σ_slabs G_s G_sᵀ`` with ``G_s[(n,c)] = Σ_t δ[n,c,t,s] a[n,t]ᵀ`` the rows
        ``s`` of every example's gradient (never all of one example's gradient at once,
        never a pair of examples recomputed); products by `rows_gram`, float64 out."""
        a = self.a[:, None]  # [N, 1, T, I]
        n, c, _, o = self.delta.shape
        rows = n * c
        K = torch.zeros(rows, rows, dtype=torch.float64, device=self.device)
        step = max(1, CHUNK_ELEMENTS // max(1, rows * a.shape[-1]))
        for lo in range(0, o, step):
            d = self.delta[..., lo : lo + step].transpose(-1, -2)  # [N, C, s, T]
            K += rows_gram(torch.matmul(d, a).reshape(rows, -1))
        return K

    def diag(self) -> dict[str, Tensor]:
        return self.pack(*kernels.diag(self.delta, self.x, self.has_weight, self.has_bias))

    def jvp(self, vector: Mapping[str, Tensor]) -> Tensor:
        w, b = self.weight_bias_names()
        out = self.delta.new_zeros(self.n, self.columns)
        if w is not None:
            W = vector[w].to(self.delta.dtype)
            W = W.transpose(0, 1) if self.transposed else W.reshape(self.delta.shape[-1], -1)
            out = out + torch.einsum("ncto,oi,nti->nc", self.delta, W, self.x)
        if b is not None:
            out = out + torch.einsum("ncto,o->nc", self.delta, vector[b].to(self.delta.dtype))
        return out

    def vjp(self, u: Tensor) -> dict[str, Tensor]:
        ud = torch.einsum("nc,ncto->nto", u.to(self.delta.dtype), self.delta)
        weight = torch.einsum("nto,nti->oi", ud, self.x) if self.has_weight else None
        bias = ud.sum((0, 1)) if self.has_bias else None
        return self.pack(weight, bias)

    def select(self, index: Tensor) -> LinearFactors:
        return replace(self, delta=self.delta[index], x=self.x[index])

    @classmethod
    def cat(cls, parts: Sequence[GradientSource]) -> LinearFactors:
        first = parts[0]
        assert isinstance(first, LinearFactors)
        return replace(
            first,
            delta=torch.cat([p.delta for p in parts]),  # type: ignore[attr-defined]
            x=torch.cat([p.x for p in parts]),  # type: ignore[attr-defined]
        )
