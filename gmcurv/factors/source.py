"""The interface every per-example gradient source implements, with the generic algebra:
squared norms, Gram kernel, diagonal, ``J v`` and ``Jᵀ u`` by materialising the gradients
``g[n, c]`` a chunk of examples at a time (subclasses override with closed forms)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 24  # materialise at most ~16M gradient entries at once
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
    """Gradients ``g[n, c]`` of the parameters `names` (shapes `shapes`), see `gmcurv.factors`."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    # ------------------------------------------------------------------ to be provided
    @property
    def n(self) -> int:
        raise NotImplementedError

    @property
    def columns(self) -> int:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
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

    def gram(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """``K[(n,c), (n',c')] = <g[n,c], g[n',c']>``, shape ``[N C, N C]``, returned in
        `dtype` (float64 by default; `gmcurv.fisher.gram_kernel` asks for the factors' own
        dtype when it sums lower-precision blocks, skipping conversions)."""
        return chunked_gram(self, dtype)

    def diag(self) -> dict[str, Tensor]:
        """``Σ_{n,c} g[n,c]^2`` per parameter (the Fisher diagonal times N)."""
        return _sum_over_chunks(self, lambda _sl, v: v.pow(2).sum((0, 1)))

    def jvp(self, vector: Mapping[str, Tensor]) -> Tensor:
        """``J v``: ``<g[n,c], v>`` for a direction in parameter layout, shape ``[N, C]``."""
        v = torch.cat([vector[k].reshape(-1) for k in self.names])
        return torch.cat([self.flat(sl) @ v.to(self.dtype) for sl in self.row_chunks()])

    def vjp(self, u: Tensor) -> dict[str, Tensor]:
        """``J^T u = Σ_{n,c} u[n,c] g[n,c]`` in parameter layout."""
        return _sum_over_chunks(
            self, lambda sl, v: torch.einsum("nc,nc...->...", u[sl].to(v.dtype), v)
        )


def _sum_over_chunks(src: GradientSource, term) -> dict[str, Tensor]:
    """``Σ_chunks term(rows, g[rows][name])`` per parameter."""
    out: dict[str, Tensor] = {}
    for sl in src.row_chunks():
        for k, v in src.materialize(sl).items():
            part = term(sl, v)
            out[k] = part if k not in out else out[k] + part
    return out


def chunked_gram(src: GradientSource, dtype: torch.dtype = torch.float64) -> Tensor:
    """The Gram kernel (in `dtype`) from materialised gradients, by blocks of example
    chunks (each block computed once and mirrored)."""
    chunks = list(src.row_chunks())
    if len(chunks) == 1:
        g = src.flat(chunks[0]).reshape(src.n * src.columns, -1)
        return rows_gram(g).to(dtype)
    size = src.n * src.columns
    K = torch.empty(size, size, dtype=dtype, device=src.device)
    c = src.columns
    for i, si in enumerate(chunks):
        gi = src.flat(si).reshape(-1, src.dim)
        for sj in chunks[i:]:
            gj = gi if sj == si else src.flat(sj).reshape(-1, src.dim)
            block = rows_gram(gi, gj).to(dtype)
            K[si.start * c : si.stop * c, sj.start * c : sj.stop * c] = block
            K[sj.start * c : sj.stop * c, si.start * c : si.stop * c] = block.T
    return K
