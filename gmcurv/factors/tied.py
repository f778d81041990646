"""Gradients of parameters reached through several modules (tied weights): the sum of the
parts, with cross terms in token form so a tied ``[V, O]`` gradient is never materialised."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from gmcurv.factors.embedding import EmbeddingFactors
from gmcurv.factors.linear import LinearFactors
from gmcurv.factors.source import GradientSource


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

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    def materialize(self, rows: slice) -> dict[str, Tensor]:
        """The parts' gradients summed: embedding parts last, scattered straight into a
        gradient materialised here (a tied head's: no ``[V, O]`` zeros, no extra sum)."""
        out: dict[str, Tensor] = {}
        owned: set[str] = set()  # tensors made here, safe to add into in place
        tables = [p for p in self.parts if isinstance(p, EmbeddingFactors)]
        for part in [p for p in self.parts if not isinstance(p, EmbeddingFactors)] + tables:
            if isinstance(part, EmbeddingFactors) and part.names[0] in owned:
                part.scatter_into(out[part.names[0]], rows)
                continue
            for k, v in part.materialize(rows).items():
                if k not in out:
                    out[k] = v
                    if isinstance(part, LinearFactors):  # fresh products, never views
                        owned.add(k)
                elif k in owned:
                    out[k].add_(v)
                else:
                    out[k] = out[k] + v
                    owned.add(k)
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

    def gram(
        self, dtype: torch.dtype = torch.float64, known: Mapping[int, Tensor] | None = None
    ) -> Tensor:
        """``K = Σ_p K_p + Σ_{p<q} (X_pq + X_pq^T)``, ``X_pq[(n,c),(m,c')] = <g^p[n,c], g^q[m,c']>``
        in token form (one example's rows at a time), each ``K_p`` by its own closed form
        or taken from `known` (part index -> its Gram, already computed by the caller);
        the generic chunked route when a part has no token form."""
        forms = [_token_form(p) for p in self.parts]
        if any(f is None for f in forms):
            return super().gram(dtype)
        known = known or {}
        K = sum(known[i] if i in known else p.gram() for i, p in enumerate(self.parts))
        for i in range(len(forms)):
            for j in range(i + 1, len(forms)):
                for name in forms[i].keys() & forms[j].keys():  # type: ignore[union-attr]
                    X = _cross_gram(*forms[i][name], *forms[j][name])  # type: ignore[index]
                    K = K + X + X.T
        return K.to(dtype)  # type: ignore[union-attr]

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


# A matrix gradient in token form: g[n,c] = Σ_t rows[n,c,t] ⊗ cols[n,c,t], each side either
# dense ``[N, C or 1, T, D]`` or one-hot, kept as indices ``[N, T]``.
Side = Tensor  # dense [N, C|1, T, D] (float) or indices [N, T] (int64)


def _token_form(part: GradientSource) -> dict[str, tuple[Side, Side]] | None:
    """``{name: (rows, cols)}`` for linear (weight ``Σ_t δ_t x_t^T``, bias ``Σ_t δ_t 1``) and
    embedding (``Σ_t e_{i_t} δ_t^T``) factors; None for other sources."""
    if isinstance(part, LinearFactors):
        w, b = part.weight_bias_names()
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


def _to_double_if_dense(a: Side, b: Side) -> tuple[Side, Side]:
    """Both sides in float64 when both are dense, else unchanged."""
    if a.is_floating_point() and b.is_floating_point():
        return a.double(), b.double()
    return a, b


def _cross_gram(rows_a: Side, cols_a: Side, rows_b: Side, cols_b: Side) -> Tensor:
    """``X[(n,c),(m,c')] = <g_a[n,c], g_b[m,c']>`` (float64, ``[N C, N C]``) for two token
    forms of the same matrix: ``Σ_{t,s} (rows_a·rows_b)(cols_a·cols_b)``, row by row."""
    dense = [t for t in (rows_a, cols_a, rows_b, cols_b) if t.is_floating_point()]
    n = rows_a.shape[0]
    c = max(t.shape[1] for t in dense)
    # float64 before dense-dense products; a side gathered by the other's indices is
    # converted after the gather (the same numbers, without a float64 copy of, e.g., a tied
    # head's [N, C, T, V] deltas)
    rows_a, rows_b = _to_double_if_dense(rows_a, rows_b)
    cols_a, cols_b = _to_double_if_dense(cols_a, cols_b)
    X = torch.empty(n * c, n * c, dtype=torch.float64, device=dense[0].device)
    for e in range(n):
        left = _pair_products(rows_a[e], rows_b)
        right = _pair_products(cols_a[e], cols_b)
        left = left.double() if left.is_floating_point() else left
        right = right.double() if right.is_floating_point() else right
        prod = (left * right).sum((1, 4))  # [C|1, M, K|1]
        X[e * c : (e + 1) * c] = prod.expand(c, n, c).reshape(c, n * c)
    return X
