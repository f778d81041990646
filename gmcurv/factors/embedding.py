"""Gradients of an embedding table as factors: ``g[n,c][v, :] = Σ_{t: index[n,t] = v}
delta[n,c,t,:]`` (one-hot inputs kept as indices, never materialised)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from gmcurv.factors.source import GradientSource


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

    @property
    def device(self) -> torch.device:
        return self.delta.device

    @property
    def dtype(self) -> torch.dtype:
        return self.delta.dtype

    def materialize(self, rows: slice) -> dict[str, Tensor]:
        d = self.delta[rows]
        r, c, _, o = d.shape
        return {self.names[0]: self.scatter_into(d.new_zeros(r, c, self.shapes[0][0], o), rows)}

    def scatter_into(self, out: Tensor, rows: slice) -> Tensor:
        """``out += g[rows]`` in place (``out: [r, C, V, O]``, e.g. a tied head's own
        gradient: no ``[V, O]`` zeros and no sum of two tables), returned."""
        d, idx = self.delta[rows], self.index[rows]
        r, c, t, o = d.shape
        return out.scatter_add_(2, idx[:, None, :, None].expand(r, c, t, o), d)

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

    def gram(self, dtype: torch.dtype = torch.float64) -> Tensor:
        if not self._token_route():
            return super().gram(dtype)
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
        return K.to(dtype)

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
