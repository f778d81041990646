"""Per-example gradients kept as factors, and their algebra.

Index letters, used in every einsum: ``n`` example, ``c`` Fisher column (one for the
empirical Fisher, ``k`` for Monte Carlo, one per class for the exact one), ``t``/``s``
token or position, ``o`` output unit, ``i`` input unit, ``v`` vocabulary row.

Every source represents the gradients ``g[n, c] ∈ R^D`` of one block of parameters
(``D`` scalars), with ``F_block = (1/N) Σ_{n,c} g[n,c] g[n,c]^T``:

- `LinearFactors`: ``g[n,c] = Σ_t delta[n,c,t,:] a[n,t,:]^T`` (``nn.Linear``, ``nn.Conv2d``
  after unfolding; a bias is the trailing column of ones in ``a``);
- `EmbeddingFactors`: ``g[n,c] = Σ_t e_{index[n,t]} delta[n,c,t,:]^T`` (one-hot inputs kept as
  indices, never materialised);
- `DenseGradients`: ``g`` stored as is (norm layers, parameters of other modules);
- `SumOfSources`: the gradient of a parameter reached by several modules (tied weights).

Each source answers the same questions — squared norms, Gram kernel, diagonal, ``J v``,
``J^T u`` and dense materialisation — with a closed form on its factors where one exists
and, in the base class, by materialising ``g`` a chunk of examples at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 24  # materialise at most ~16M gradient entries at once
CACHE_ELEMENTS = 1 << 18  # ~1 MB of float32: chunks for streaming reductions stay in cache
GEMM_CHUNK = 1024  # inner-dimension chunk of a lower-precision Gram product (`rows_gram`)


def rows_gram(a: Tensor, b: Tensor | None = None) -> Tensor:
    """``a b^T`` (``b = a`` by default) for row matrices ``[M, D]``, ``[M', D]``.

    Float64 inputs: one float64 product. Lower-precision inputs (float32 factors) are
    multiplied in their own dtype — half the time and memory traffic of float64 — over
    inner-dimension chunks of at most `GEMM_CHUNK` summed in float64 (a single chunk stays
    in the inputs' dtype; callers convert). Each entry then carries a relative error (with
    respect to ``|a_i| |b_j|``) of at most ``GEMM_CHUNK · eps`` and about
    ``sqrt(GEMM_CHUNK) · eps`` in practice, the order of the rounding the float32 factors
    already carry; eigenvalues of a Gram kernel built this way move by at most that error
    times ``tr K`` (``|ΔK| <= ε g g^T`` with ``g_i = |a_i|``), and in practice by
    ~``1e-9`` relative on the benchmark workloads.
    """
    b = a if b is None else b
    if a.dtype == torch.float64 or a.shape[1] <= GEMM_CHUNK:
        return a @ b.T
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for lo in range(0, a.shape[1], GEMM_CHUNK):
        out.add_(a[:, lo : lo + GEMM_CHUNK] @ b[:, lo : lo + GEMM_CHUNK].T)
    return out


@dataclass(frozen=True)
class GradientSource:
    """Gradients ``g[n, c]`` of the parameters `names` (shapes `shapes`), see module doc."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    # ------------------------------------------------------------------ to be provided
    @property
    def n(self) -> int:
        raise NotImplementedError

    @property
    def columns(self) -> int:
        raise NotImplementedError

    def materialize(self, rows: slice) -> dict[str, Tensor]:
        """``{name: [r, C, *shape]}`` for examples `rows`."""
        raise NotImplementedError

    def select(self, index: Tensor) -> GradientSource:
        """The same source restricted to examples `index`."""
        raise NotImplementedError

    @classmethod
    def cat(cls, parts: Sequence[GradientSource]) -> GradientSource:
        """Concatenate along examples."""
        raise NotImplementedError

    # ------------------------------------------------------------------ generic algebra
    @property
    def dim(self) -> int:
        """D, the number of scalars in the block."""
        return sum(math.prod(s) for s in self.shapes)

    def nbytes(self) -> int:
        """Memory held by this source's tensors."""
        total = 0
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                total += v.numel() * v.element_size()
            elif isinstance(v, tuple):
                total += sum(p.nbytes() for p in v if isinstance(p, GradientSource))
        return total

    def row_chunks(self) -> Iterator[slice]:
        step = max(1, CHUNK_ELEMENTS // max(1, self.columns * self.dim))
        for start in range(0, self.n, step):
            yield slice(start, min(start + step, self.n))

    def flat(self, rows: slice) -> Tensor:
        """``[r, C, D]`` gradients, parameters concatenated in `names` order."""
        g = self.materialize(rows)
        r = rows.stop - rows.start
        return torch.cat([g[k].reshape(r, self.columns, -1) for k in self.names], dim=-1)

    def sq_norms(self) -> Tensor:
        """``||g[n, c]||^2``, shape ``[N, C]``."""
        return torch.cat([self.flat(sl).pow(2).sum(-1) for sl in self.row_chunks()])

    def gram(self) -> Tensor:
        """``K[(n,c), (n',c')] = <g[n,c], g[n',c']>`` in float64, shape ``[N C, N C]``."""
        chunks = list(self.row_chunks())
        if len(chunks) == 1:
            g = self.flat(chunks[0]).reshape(self.n * self.columns, -1)
            return rows_gram(g).double()
        size = self.n * self.columns
        K = torch.empty(size, size, dtype=torch.float64, device=self._device())
        c = self.columns
        for i, si in enumerate(chunks):
            gi = self.flat(si).reshape(-1, self.dim)
            for sj in chunks[i:]:
                gj = gi if sj == si else self.flat(sj).reshape(-1, self.dim)
                block = rows_gram(gi, gj).double()
                K[si.start * c : si.stop * c, sj.start * c : sj.stop * c] = block
                K[sj.start * c : sj.stop * c, si.start * c : si.stop * c] = block.T
        return K

    def diag(self) -> dict[str, Tensor]:
        """``Σ_{n,c} g[n,c]^2`` per parameter (the Fisher diagonal times N)."""
        out: dict[str, Tensor] = {}
        for sl in self.row_chunks():
            for k, v in self.materialize(sl).items():
                sq = v.pow(2).sum((0, 1))
                out[k] = sq if k not in out else out[k] + sq
        return out

    def jvp(self, vector: Mapping[str, Tensor]) -> Tensor:
        """``J v``: ``<g[n,c], v>`` for a direction in parameter layout, shape ``[N, C]``."""
        v = torch.cat([vector[k].reshape(-1) for k in self.names])
        return torch.cat([self.flat(sl) @ v.to(self._dtype()) for sl in self.row_chunks()])

    def vjp(self, u: Tensor) -> dict[str, Tensor]:
        """``J^T u = Σ_{n,c} u[n,c] g[n,c]`` in parameter layout."""
        out: dict[str, Tensor] = {}
        for sl in self.row_chunks():
            for k, v in self.materialize(sl).items():
                part = torch.einsum("nc,nc...->...", u[sl].to(v.dtype), v)
                out[k] = part if k not in out else out[k] + part
        return out

    def _device(self) -> torch.device:
        raise NotImplementedError

    def _dtype(self) -> torch.dtype:
        raise NotImplementedError


# ------------------------------------------------------------------------------------ linear
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

    def _device(self) -> torch.device:
        return self.delta.device

    def _dtype(self) -> torch.dtype:
        return self.delta.dtype

    def _names(self) -> tuple[str | None, str | None]:
        names = list(self.names)
        w = names.pop(0) if self.has_weight else None
        b = names[0] if self.has_bias else None
        return w, b

    def _pack(self, weight: Tensor | None, bias: Tensor | None) -> dict[str, Tensor]:
        """``[..., O, I_w]`` weight part and ``[..., O]`` bias part -> parameter layout."""
        w, b = self._names()
        out = {}
        if w is not None and weight is not None:
            if self.transposed:
                weight = weight.transpose(-1, -2)
            out[w] = weight.reshape(*weight.shape[:-2], *self.shapes[0])
        if b is not None and bias is not None:
            out[b] = bias
        return out

    def _pair_kernel(self, xx: Tensor) -> Tensor:
        """Input-side kernel ``a·a' = w x·x' + b`` from ``xx = x·x'`` (weight/bias flags)."""
        out = xx if self.has_weight else torch.zeros_like(xx)
        return out + 1.0 if self.has_bias else out

    def materialize(self, rows: slice) -> dict[str, Tensor]:
        d = self.delta[rows]
        weight = torch.einsum("ncto,nti->ncoi", d, self.x[rows]) if self.has_weight else None
        bias = d.sum(2) if self.has_bias else None
        return self._pack(weight, bias)

    def _token_route(self) -> bool:
        """Use token-pair kernels (cost ~T^2 (O+I)) rather than materialising (~T O I)?"""
        t, o, i = self.tokens, self.delta.shape[-1], self.x.shape[-1] + 1
        return t == 1 or t * (o + i) < o * i

    def sq_norms(self) -> Tensor:
        if self.tokens == 1:
            xx = self.x[:, 0].pow(2).sum(-1)[:, None]
            return self.delta[:, :, 0].pow(2).sum(-1) * self._pair_kernel(xx)
        if not self._token_route():
            return super().sq_norms()
        dd = torch.einsum("ncto,ncso->ncts", self.delta, self.delta)
        aa = self._pair_kernel(torch.einsum("nti,nsi->nts", self.x, self.x))
        return torch.einsum("ncts,nts->nc", dd, aa)

    def gram(self) -> Tensor:
        # per pair of examples: token pairs cost T^2 (O+I), materialised gradients O I
        t, o, i = self.tokens, self.delta.shape[-1], self.x.shape[-1] + 1
        if t > 1 and t * t * (o + i) >= o * i:
            return super().gram()
        if t == 1:
            return self._dense_gram()
        d = self.delta.double()
        x = self.x.double()
        n, c, t, _ = d.shape
        # one example's rows at a time: memory O(C T N C T) instead of O((N C T)^2)
        K = torch.empty(n * c, n * c, dtype=torch.float64, device=d.device)
        dflat = d.reshape(n * c, t, -1)
        for e in range(n):
            rows = dflat[e * c : (e + 1) * c]  # [C, T, O]
            ddx = torch.einsum("cto,yso->ctys", rows, dflat)  # [C, T, NC, T]
            aa = self._pair_kernel(torch.einsum("ti,msi->tms", x[e], x))  # [T, N, T]
            aax = aa.repeat_interleave(c, dim=1)  # [T, NC, T]
            K[e * c : (e + 1) * c] = torch.einsum("ctys,tys->cy", ddx, aax)
        return K

    def _dense_gram(self) -> Tensor:
        """One prediction per example: ``K = (Δ Δ^T) ⊙ (A A^T)`` (``Δ: [N C, O]`` output
        grads, ``A = [x, 1]``), both products by `rows_gram` in the factors' dtype, the
        Hadamard product in place, float64 out."""
        n, c = self.n, self.columns
        dd = rows_gram(self.delta[:, :, 0].reshape(n * c, -1))
        x = self.x[:, 0]
        if self.has_weight:
            aa = rows_gram(x)
            if self.has_bias:
                aa.add_(1.0)
        else:
            aa = x.new_full((n, n), 1.0 if self.has_bias else 0.0)
        if c > 1:
            aa = aa.repeat_interleave(c, 0).repeat_interleave(c, 1)
        if dd.dtype != aa.dtype:
            dd = dd.double()
        return dd.mul_(aa).double()

    def diag(self) -> dict[str, Tensor]:
        if self.tokens != 1:
            return self._token_diag()
        d2 = self.delta[:, :, 0].pow(2)  # [N, C, O]
        weight = torch.einsum("nco,ni->oi", d2, self.x[:, 0].pow(2)) if self.has_weight else None
        bias = d2.sum((0, 1)) if self.has_bias else None
        return self._pack(weight, bias)

    def _token_diag(self) -> dict[str, Tensor]:
        """``Σ_{n,c} (Σ_t delta[n,c,t] x[n,t]^T)^2`` for sequences, streamed over examples.

        Each example's gradient must be formed (the square does not factor over tokens);
        examples go in chunks of about ``CACHE_ELEMENTS`` entries, so the ``[r, C, O, I]``
        slab is squared and summed while it is still in cache (memory traffic, not FLOPs,
        bounds this reduction).
        """
        n, c, _, o = self.delta.shape
        i = self.x.shape[-1]
        step = max(1, CACHE_ELEMENTS // max(1, c * o * i))
        weight = self.delta.new_zeros(o, i) if self.has_weight else None
        bias = self.delta.new_zeros(o) if self.has_bias else None
        for start in range(0, n, step):
            d = self.delta[start : start + step]  # [r, C, T, O]
            if weight is not None:
                x = self.x[start : start + step]  # [r, T, I]
                g = torch.matmul(d.transpose(-1, -2), x[:, None])  # [r, C, O, I]
                weight += g.pow_(2).sum((0, 1))
            if bias is not None:
                bias += d.sum(2).pow_(2).sum((0, 1))
        return self._pack(weight, bias)

    def jvp(self, vector: Mapping[str, Tensor]) -> Tensor:
        w, b = self._names()
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
        return self._pack(weight, bias)

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


# --------------------------------------------------------------------------------- embedding
@dataclass(frozen=True)
class EmbeddingFactors(GradientSource):
    """``g[n,c][v, :] = Σ_{t: index[n,t] = v} delta[n,c,t,:]`` for a ``[V, O]`` table."""

    delta: Tensor  # [N, C, T, O]
    index: Tensor  # [N, T] int64

    @property
    def n(self) -> int:
        return self.delta.shape[0]

    @property
    def columns(self) -> int:
        return self.delta.shape[1]

    def _device(self) -> torch.device:
        return self.delta.device

    def _dtype(self) -> torch.dtype:
        return self.delta.dtype

    def materialize(self, rows: slice) -> dict[str, Tensor]:
        d, idx = self.delta[rows], self.index[rows]
        r, c, t, o = d.shape
        v = self.shapes[0][0]
        out = d.new_zeros(r, c, v, o)
        scatter_idx = idx[:, None, :, None].expand(r, c, t, o)
        return {self.names[0]: out.scatter_add_(2, scatter_idx, d)}

    def _same(self, other_index: Tensor | None = None) -> Tensor:
        other = self.index if other_index is None else other_index
        return (self.index[:, :, None, None] == other[None, None]).to(self.delta.dtype)

    def _token_route(self) -> bool:
        """Token-pair kernels (cost ~T^2 O per pair) rather than materialising (~V O)?"""
        return self.delta.shape[2] ** 2 < self.shapes[0][0]

    def sq_norms(self) -> Tensor:
        if not self._token_route():
            return super().sq_norms()
        dd = torch.einsum("ncto,ncso->ncts", self.delta, self.delta)
        same = (self.index[:, :, None] == self.index[:, None, :]).to(dd.dtype)  # [N, T, T]
        return torch.einsum("ncts,nts->nc", dd, same)

    def gram(self) -> Tensor:
        if not self._token_route():
            return super().gram()
        d = self.delta.double()
        n, c, t, _ = d.shape
        dflat = d.reshape(n * c, t, -1)
        K = torch.empty(n * c, n * c, dtype=torch.float64, device=d.device)
        for x in range(n):
            same = (self.index[x][:, None, None] == self.index[None]).double()  # [T, N, S]
            ddx = torch.einsum("cto,yso->ctys", dflat[x * c : (x + 1) * c], dflat)
            K[x * c : (x + 1) * c] = torch.einsum(
                "ctys,tys->cy", ddx, same.repeat_interleave(c, dim=1)
            )
        return K

    def diag(self) -> dict[str, Tensor]:
        v, o = self.shapes[0]
        n, c, t, _ = self.delta.shape
        # segment-sum the tokens of each (example, row) pair, then square and scatter to rows
        keys = (torch.arange(n, device=self.index.device)[:, None] * v + self.index).reshape(-1)
        uniq, inv = torch.unique(keys, return_inverse=True)
        d = self.delta.permute(0, 2, 1, 3).reshape(n * t, c * o)
        seg = self.delta.new_zeros(len(uniq), c * o).index_add_(0, inv, d)
        sq = seg.pow(2).reshape(len(uniq), c, o).sum(1)
        out = self.delta.new_zeros(v, o).index_add_(0, uniq % v, sq)
        return {self.names[0]: out}

    def jvp(self, vector: Mapping[str, Tensor]) -> Tensor:
        table = vector[self.names[0]].to(self.delta.dtype)
        return torch.einsum("ncto,nto->nc", self.delta, table[self.index])

    def vjp(self, u: Tensor) -> dict[str, Tensor]:
        v, o = self.shapes[0]
        rows = torch.einsum("nc,ncto->nto", u.to(self.delta.dtype), self.delta).reshape(-1, o)
        out = self.delta.new_zeros(v, o).index_add_(0, self.index.reshape(-1), rows)
        return {self.names[0]: out}

    def select(self, index: Tensor) -> EmbeddingFactors:
        return replace(self, delta=self.delta[index], index=self.index[index])

    @classmethod
    def cat(cls, parts: Sequence[GradientSource]) -> EmbeddingFactors:
        first = parts[0]
        assert isinstance(first, EmbeddingFactors)
        return replace(
            first,
            delta=torch.cat([p.delta for p in parts]),  # type: ignore[attr-defined]
            index=torch.cat([p.index for p in parts]),  # type: ignore[attr-defined]
        )


# ------------------------------------------------------------------------------------- dense
@dataclass(frozen=True)
class DenseGradients(GradientSource):
    """Explicit per-example gradients ``g: [N, C, D]`` (parameters concatenated, flattened)."""

    g: Tensor

    @property
    def n(self) -> int:
        return self.g.shape[0]

    @property
    def columns(self) -> int:
        return self.g.shape[1]

    def _device(self) -> torch.device:
        return self.g.device

    def _dtype(self) -> torch.dtype:
        return self.g.dtype

    def flat(self, rows: slice) -> Tensor:
        return self.g[rows]

    def materialize(self, rows: slice) -> dict[str, Tensor]:
        g = self.g[rows]
        out, pos = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            k = math.prod(shape)
            out[name] = g[..., pos : pos + k].reshape(*g.shape[:2], *shape)
            pos += k
        return out

    def row_chunks(self) -> Iterator[slice]:
        yield slice(0, self.n)

    def select(self, index: Tensor) -> DenseGradients:
        return replace(self, g=self.g[index])

    @classmethod
    def cat(cls, parts: Sequence[GradientSource]) -> DenseGradients:
        return replace(parts[0], g=torch.cat([p.g for p in parts]))  # type: ignore[attr-defined]


# -------------------------------------------------------------------------------------- sums
@dataclass(frozen=True)
class SumOfSources(GradientSource):
    """Gradient of parameters reached through several modules (tied weights): the sum."""

    parts: tuple[GradientSource, ...]

    @property
    def n(self) -> int:
        return self.parts[0].n

    @property
    def columns(self) -> int:
        return self.parts[0].columns

    def _device(self) -> torch.device:
        return self.parts[0]._device()

    def _dtype(self) -> torch.dtype:
        return self.parts[0]._dtype()

    def materialize(self, rows: slice) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for part in self.parts:
            for k, v in part.materialize(rows).items():
                out[k] = v if k not in out else out[k] + v
        return out

    def sq_norms(self) -> Tensor:
        """``||Σ_p g^p||² = Σ_p ||g^p||² + 2 Σ_{p<q} <g^p, g^q>`` with the cross terms in
        token form (`_token_form`), never materialising a tied ``[V, O]`` gradient; the
        generic chunked route when a part has no token form."""
        forms = [_token_form(p) for p in self.parts]
        if any(f is None for f in forms):
            return super().sq_norms()
        out = sum(p.sq_norms() for p in self.parts)
        for i in range(len(forms)):
            for j in range(i + 1, len(forms)):
                for name in forms[i].keys() & forms[j].keys():  # type: ignore[union-attr]
                    out = out + 2 * _cross(*forms[i][name], *forms[j][name])  # type: ignore[index]
        return out  # type: ignore[return-value]

    def gram(self) -> Tensor:
        """``K = Σ_p K_p + Σ_{p<q} (X_pq + X_pq^T)``, ``X_pq[(n,c),(m,c')] = <g^p[n,c], g^q[m,c']>``
        in token form (one example's rows at a time), each ``K_p`` by its own closed form;
        the generic chunked route when a part has no token form."""
        forms = [_token_form(p) for p in self.parts]
        if any(f is None for f in forms):
            return super().gram()
        K = sum(p.gram() for p in self.parts)
        for i in range(len(forms)):
            for j in range(i + 1, len(forms)):
                for name in forms[i].keys() & forms[j].keys():  # type: ignore[union-attr]
                    X = _cross_gram(*forms[i][name], *forms[j][name])  # type: ignore[index]
                    K = K + X + X.T
        return K  # type: ignore[return-value]

    def jvp(self, vector: Mapping[str, Tensor]) -> Tensor:
        return sum(p.jvp(vector) for p in self.parts)  # type: ignore[return-value]

    def vjp(self, u: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for part in self.parts:
            for k, v in part.vjp(u).items():
                out[k] = v if k not in out else out[k] + v
        return out

    def select(self, index: Tensor) -> SumOfSources:
        return replace(self, parts=tuple(p.select(index) for p in self.parts))

    @classmethod
    def cat(cls, parts: Sequence[GradientSource]) -> SumOfSources:
        first = parts[0]
        assert isinstance(first, SumOfSources)
        merged = tuple(
            type(group[0]).cat(group)
            for group in zip(*[p.parts for p in parts], strict=True)  # type: ignore[attr-defined]
        )
        return replace(first, parts=merged)


# ----------------------------------------------------------------- token forms (tied weights)
# A matrix gradient in token form: g[n,c] = Σ_t rows[n,c,t] ⊗ cols[n,c,t], each side either
# dense ``[N, C or 1, T, D]`` or one-hot, kept as indices ``[N, T]``.
Side = Tensor  # dense [N, C|1, T, D] (float) or indices [N, T] (int64)


def _token_form(part: GradientSource) -> dict[str, tuple[Side, Side]] | None:
    """``{name: (rows, cols)}`` for linear (weight ``Σ_t δ_t x_t^T``, bias ``Σ_t δ_t 1``) and
    embedding (``Σ_t e_{i_t} δ_t^T``) factors; None for other sources."""
    if isinstance(part, LinearFactors):
        w, b = part._names()
        x = part.x[:, None]  # [N, 1, T, I]
        forms = {}
        if w is not None:
            forms[w] = (part.delta, x)
        if b is not None:
            forms[b] = (part.delta, x.new_ones(*x.shape[:-1], 1))
        return forms
    if isinstance(part, EmbeddingFactors):
        return {part.names[0]: (part.index, part.delta)}
    return None


def _side_products(a: Side, b: Side, dtype: torch.dtype) -> Tensor:
    """``P[n, c, t, s] = a[n,c,t] · b[n,c,s]`` (``c`` broadcast where a side has none)."""
    a_idx, b_idx = not a.is_floating_point(), not b.is_floating_point()
    if a_idx and b_idx:
        return (a[:, None, :, None] == b[:, None, None, :]).to(dtype)
    if a_idx:
        return _side_products(b, a, dtype).transpose(2, 3)
    if b_idx:  # a[n, c, t, b[n, s]]
        n, c, t, _ = a.shape
        return torch.gather(a, 3, b[:, None, None, :].expand(n, c, t, b.shape[1]))
    return torch.einsum("ncto,ncso->ncts", a, b)


def _cross(rows_a: Side, cols_a: Side, rows_b: Side, cols_b: Side) -> Tensor:
    """``<g_a[n,c], g_b[n,c]>`` for two token forms of the same matrix, ``[N, C]``."""
    dtype = next(t.dtype for t in (rows_a, cols_a, rows_b, cols_b) if t.is_floating_point())
    left = _side_products(rows_a, rows_b, dtype)
    right = _side_products(cols_a, cols_b, dtype)
    return (left * right).sum((2, 3))


def _pair_products(a: Side, b: Side) -> Tensor:
    """``P[c, t, m, k, s] = a[c, t] · b[m, k, s]`` for one example's side `a` (dense
    ``[C|1, T, D]`` or indices ``[T]``) against all examples' `b` (``[M, K|1, S, D]`` or
    ``[M, S]``); size-1 axes where a side has no column axis."""
    a_idx, b_idx = not a.is_floating_point(), not b.is_floating_point()
    if a_idx and b_idx:
        return (a[:, None, None] == b[None, :, None, :])[None]  # [1, T, M, 1, S] (bool)
    if a_idx:  # b[m, k, s, a[t]]
        return b[..., a].permute(3, 0, 1, 2)[None]  # [1, T, M, K, S]
    if b_idx:  # a[c, t, b[m, s]]
        return a[:, :, b][:, :, :, None]  # [C, T, M, 1, S]
    return torch.einsum("ctd,mksd->ctmks", a, b)


def _cross_gram(rows_a: Side, cols_a: Side, rows_b: Side, cols_b: Side) -> Tensor:
    """``X[(n,c),(m,c')] = <g_a[n,c], g_b[m,c']>`` (float64, ``[N C, N C]``) for two token
    forms of the same matrix: ``Σ_{t,s} (rows_a·rows_b)(cols_a·cols_b)``, row by row."""
    dense = [t for t in (rows_a, cols_a, rows_b, cols_b) if t.is_floating_point()]
    n = rows_a.shape[0]
    c = max(t.shape[1] for t in dense)
    rows_a, cols_a, rows_b, cols_b = (
        t.double() if t.is_floating_point() else t for t in (rows_a, cols_a, rows_b, cols_b)
    )
    X = torch.empty(n * c, n * c, dtype=torch.float64, device=dense[0].device)
    for e in range(n):
        left = _pair_products(rows_a[e], rows_b)
        right = _pair_products(cols_a[e], cols_b)
        prod = (left * right).sum((1, 4))  # [C|1, M, K|1]
        X[e * c : (e + 1) * c] = prod.expand(c, n, c).reshape(c, n * c)
    return X
