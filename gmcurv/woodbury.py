"""The damped inverse Fisher through the ``N C x N C`` kernel (Woodbury), never ``P x P``.

With ``J`` the ``[N C, P]`` matrix of per-example, per-column gradients (rows ``g[n,c]``),
``F = (1/N) J^T J``, ``K = J J^T`` and ``H = F + eps I``, the Woodbury identity gives

    H^-1 = (1/eps) (I - J^T (K + N eps I)^-1 J),

so with ``j_q = J e_q`` (column ``q`` of ``J``: ``j_q[n,c] = g[n,c]_q``, for a linear layer
``Σ_t delta[n,c,t,o] a[n,t,i]``) and ``A = K + N eps I = L L^T`` (Cholesky):

- diagonal: ``[H^-1]_qq = (1/eps) (1 - ||L^-1 j_q||^2)``, clamped to the bounds
  ``1/(F_qq + eps) <= [H^-1]_qq <= 1/eps``;
- column: ``H^-1 e_q = (1/eps) (e_q - J^T A^-1 j_q)``;
- weights ``Q`` held at zero (removed): the same formulas for ``H_RR`` (the Hessian on the
  remaining coordinates ``R``) hold with ``K_R = K - J_Q J_Q^T``, the kernel of the remaining
  columns; and the OBS problem ``min ½ δw^T H δw  s.t.  δw_Q = -w_Q`` has the exact solution

      δw_R = J_R^T (K_R + N eps I)^-1 u,   u = J_Q w_Q,
      ½ δw^T H δw = (eps / 2) (||w_Q||^2 + u^T (K_R + N eps I)^-1 u),

  (push-through identity on ``H_RR δw_R = H_RQ w_Q``; the loss increase is the Schur
  complement ``½ w_Q^T ([H^-1]_QQ)^-1 w_Q``), all in ``N C``-dimensional space.

``structure='block'`` treats ``F`` as block-diagonal over capture blocks (one kernel per
layer, as WoodFisher does); ``'global'`` uses the full ``F`` (one kernel summed over blocks).
Columns of ``J`` are formed a chunk of parameters at a time (``[N C, m]``), so memory stays
``O((N C)^2 + N C m)`` plus the factors; cost ``O((N C)^2 P + (N C)^3)``.

References: Hassibi & Stork 1993 (OBS); Singh & Alistarh 2020 (WoodFisher, block-diagonal
Woodbury inverse of the empirical Fisher); Frantar, Kurtic & Alistarh 2021 (M-FAC).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from gmcurv.capture import Block, DecomposedGradients
from gmcurv.errors import ConfigError, UnsupportedError
from gmcurv.factors import (
    DenseGradients,
    EmbeddingFactors,
    GradientSource,
    LinearFactors,
    SumOfSources,
)
from gmcurv.fisher import fisher_trace

STRUCTURES = ("block", "global")
COLUMN_CHUNK = 1 << 20  # at most ~1M entries of J (N C x m) formed at once
DEFAULT_DAMPING = 1e-2  # eps = damping * tr(F) / P, see `default_eps`
ProgressFn = Callable[[float], None]  # k more units of work done (here: kernel groups/blocks)


# ------------------------------------------------------------------------- columns of J
def _linear_columns(src: LinearFactors, name: str, start: int, stop: int) -> Tensor:
    """``[N, C, stop-start]`` columns of a linear/conv block for flat indices of `name`."""
    is_weight = src.has_weight and name == src.names[0]
    d = src.delta  # [N, C, T, O]
    if not is_weight:  # bias: Σ_t delta
        return d[..., start:stop].sum(2)
    if src.transposed:  # [I, O] layout (Hugging Face Conv1D)
        width = src.shapes[0][1]  # O
        i0, i1 = start // width, -(-stop // width)
        g = torch.einsum("nti,ncto->ncio", src.x[..., i0:i1], d)
        g = g.reshape(*g.shape[:2], -1)
        return g[..., start - i0 * width : stop - i0 * width]
    width = math.prod(src.shapes[0][1:])  # I_w
    o0, o1 = start // width, -(-stop // width)
    x = src.x[..., :width]  # [N, T, I_w]
    g = torch.einsum("ncto,nti->ncoi", d[..., o0:o1], x)  # [N, C, b, I_w]
    g = g.reshape(*g.shape[:2], -1)
    off = o0 * width
    return g[..., start - off : stop - off]


def _embedding_columns(src: EmbeddingFactors, start: int, stop: int) -> Tensor:
    """Columns of a ``[V, O]`` embedding table: ``Σ_{t: index[n,t] = v} delta[n,c,t,o]``."""
    width = src.shapes[0][1]
    v0, v1 = start // width, -(-stop // width)
    rows = torch.arange(v0, v1, device=src.index.device)
    onehot = (src.index[:, :, None] == rows).to(src.delta.dtype)  # [N, T, b]
    g = torch.einsum("ntv,ncto->ncvo", onehot, src.delta)
    g = g.reshape(*g.shape[:2], -1)
    off = v0 * width
    return g[..., start - off : stop - off]


def param_columns(src: GradientSource, name: str, start: int, stop: int) -> Tensor:
    """``J[:, q]`` for flat indices ``q in [start, stop)`` of parameter `name`: ``[N, C, m]``."""
    if isinstance(src, LinearFactors):
        return _linear_columns(src, name, start, stop)
    if isinstance(src, EmbeddingFactors):
        return _embedding_columns(src, start, stop)
    if isinstance(src, DenseGradients):
        pos = 0
        for n, s in zip(src.names, src.shapes, strict=True):
            if n == name:
                return src.g[..., pos + start : pos + stop]
            pos += math.prod(s)
        raise KeyError(name)
    if isinstance(src, SumOfSources):
        parts = [param_columns(p, name, start, stop) for p in src.parts if name in p.names]
        return sum(parts[1:], parts[0])
    raise UnsupportedError(f"no column access for gradient source {type(src).__name__}")


def _chunk_width(n_rows: int) -> int:
    """Parameters per chunk so that the formed columns ``[N C, m]`` stay bounded."""
    return max(1, COLUMN_CHUNK // max(1, n_rows))


def column_chunks(
    block: Block, keep: Mapping[str, Tensor | None] | None = None
) -> Iterator[tuple[str, Tensor, Tensor]]:
    """``(param, flat indices, J columns [N C, m] float64)`` over a block's parameters.

    With `keep` (``{param: bool tensor}``), only the columns where it is True are returned
    (parameters missing from `keep` are skipped, a None mask keeps all of them).
    """
    src = block.source
    rows = src.n * src.columns
    for name, shape in zip(src.names, src.shapes, strict=True):
        size = math.prod(shape)
        step = _chunk_width(rows)
        if keep is not None and name not in keep:
            continue
        mask = None if keep is None else keep[name]
        flat_keep = None if mask is None else mask.reshape(-1)
        for start in range(0, size, step):
            stop = min(start + step, size)
            idx = torch.arange(start, stop, device=src.device)
            if flat_keep is not None:
                sel = flat_keep[start:stop]
                if not bool(sel.any()):
                    continue
                idx = idx[sel]
            g = param_columns(src, name, start, stop).reshape(rows, -1).double()
            if flat_keep is not None:
                g = g[:, flat_keep[start:stop]]
            yield name, idx, g


def remaining_kernel(block: Block, removed: Mapping[str, Tensor] | None = None) -> Tensor:
    """``K_R = J_R J_R^T``: the block's kernel over the columns not in `removed` (float64).

    Formed from whichever side is smaller: ``K - J_Q J_Q^T`` or ``Σ`` over remaining columns.
    """
    mine = {k: v for k, v in (removed or {}).items() if k in block.params}
    n_removed = sum(int(v.sum()) for v in mine.values())
    if n_removed == 0:
        return block.source.gram()
    rows = block.source.n * block.source.columns
    K = torch.zeros(rows, rows, dtype=torch.float64, device=block.source.device)
    if 2 * n_removed > block.dim:  # sum over the remaining columns
        keep = {k: ~mine[k] if k in mine else None for k in block.params}
        for _, _, g in column_chunks(block, keep):
            K.addmm_(g, g.T)
        return K
    for _, _, g in column_chunks(block, mine):
        K.addmm_(g, g.T)
    return block.source.gram() - K


def default_eps(dg: DecomposedGradients, damping: float = DEFAULT_DAMPING) -> float:
    """``eps = damping * tr(F) / P``: damping relative to the mean Fisher eigenvalue.

    Scale-free: rescaling the loss by ``s`` rescales ``F`` and ``eps`` by ``s^2``, which leaves
    OBS rankings and weight updates unchanged.
    """
    if not damping > 0 or not math.isfinite(damping):
        raise ConfigError(
            f"--damping must be a positive finite number, got {damping}",
            hint="e.g. --damping 0.01 (relative to the mean Fisher eigenvalue)",
        )
    mean = fisher_trace(dg) / max(1, dg.n_params)
    if not mean > 0:
        raise UnsupportedError(
            "the Fisher is zero on this data (all per-example gradients vanish)",
            hint="OBS needs curvature; use --criterion magnitude",
        )
    return damping * mean


# ----------------------------------------------------------------------- the damped inverse
def _cholesky(A: Tensor) -> Tensor:
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise UnsupportedError(
            "the damped Fisher kernel is not positive definite (eps too small for float64 "
            "round-off)",
            hint="raise --damping",
        )
    return L


def _union(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out[k] | v if k in out else v
    return out


@dataclass
class KernelGroup:
    """Blocks sharing one kernel: ``A = K_R + N eps I`` and its Cholesky factor ``L``."""

    blocks: tuple[Block, ...]
    A: Tensor
    chol: Tensor

    @classmethod
    def build(
        cls, blocks: tuple[Block, ...], removed: Mapping[str, Tensor], shift: float
    ) -> KernelGroup:
        """``A = Σ_blocks K_R + shift I`` (``shift = N eps``), symmetrised, and its factor."""
        A = remaining_kernel(blocks[0], removed)
        for b in blocks[1:]:
            A += remaining_kernel(b, removed)
        A = 0.5 * (A + A.T)  # exact symmetry for the Cholesky factorisation
        A.diagonal().add_(shift)
        return cls(blocks, A, _cholesky(A))

    def downdated(self, new: Mapping[str, Tensor]) -> KernelGroup:
        """``A - J_new J_newᵀ`` for newly removed weights `new` (self if none are here)."""
        mine = [
            {k: v for k, v in new.items() if k in b.params and bool(v.any())} for b in self.blocks
        ]
        if not any(mine):
            return self
        A = self.A.clone()
        for b, cols_of in zip(self.blocks, mine, strict=True):
            for _, _, cols in column_chunks(b, cols_of) if cols_of else ():
                A.addmm_(cols, cols.T, alpha=-1.0)
        return KernelGroup(self.blocks, A, _cholesky(A))

    def solve(self, rhs: Tensor) -> Tensor:
        """``A^-1 rhs``."""
        return torch.cholesky_solve(rhs, self.chol)

    def vjp(self, v: Tensor) -> dict[str, Tensor]:
        """``Jᵀ v`` over the group's blocks, float64."""
        out: dict[str, Tensor] = {}
        for b in self.blocks:
            for k, t in b.source.vjp(v.to(b.source.dtype)).items():
                out[k] = t.double()
        return out

    def inverse_diagonal(
        self, block: Block, removed: Mapping[str, Tensor], eps: float, n: int
    ) -> dict[str, Tensor]:
        """``[H_RR^-1]_qq = (1/eps)(1 - ||L^-1 j_q||²)`` for `block`'s parameters, clamped
        to ``[1/(F_qq + eps), 1/eps]`` (removed weights: ``1/eps``)."""
        inv = 1.0 / eps
        out = {
            name: torch.full(shape, inv, dtype=torch.float64, device=self.A.device)
            for name, shape in zip(block.params, block.shapes, strict=True)
        }
        keep = {k: ~removed[k] for k in block.params if k in removed}
        for name, idx, cols in column_chunks(
            block, {k: keep.get(k) for k in block.params} if keep else None
        ):
            z = torch.linalg.solve_triangular(self.chol, cols, upper=False)
            fqq = cols.pow(2).sum(0) / n
            val = inv * (1.0 - z.pow(2).sum(0))
            out[name].view(-1)[idx] = torch.maximum(val, 1.0 / (fqq + eps)).clamp_max(inv)
        return out


class DampedFisher:
    """``H = F + eps I`` restricted to the coordinates not in `removed`, via Woodbury.

    `removed` (``{param: bool tensor}``, True = held at zero) excludes columns of ``J``;
    ``structure`` is ``'block'`` (block-diagonal ``F``) or ``'global'``. `progress(1)` is
    called per kernel group built (`n_groups` of them).
    """

    def __init__(
        self,
        dg: DecomposedGradients,
        eps: float,
        structure: str = "block",
        removed: Mapping[str, Tensor] | None = None,
        groups: list[KernelGroup] | None = None,
        progress: ProgressFn | None = None,
    ):
        if structure not in STRUCTURES:
            raise ConfigError(f"unknown Fisher structure {structure!r}", hint=f"use {STRUCTURES}")
        if not eps > 0:
            raise ConfigError(f"the damping eps must be positive, got {eps}")
        self.dg, self.eps, self.structure = dg, float(eps), structure
        self.removed = {k: v.bool() for k, v in (removed or {}).items()}
        if not groups:
            groups = []
            for blocks in self.group_blocks(dg, structure):
                groups.append(KernelGroup.build(blocks, self.removed, dg.n * self.eps))
                _tick(progress)
        self.groups = groups

    @staticmethod
    def group_blocks(dg: DecomposedGradients, structure: str) -> list[tuple[Block, ...]]:
        """The blocks sharing each kernel: one group per block, or all in one (global)."""
        return [(b,) for b in dg.blocks] if structure == "block" else [tuple(dg.blocks)]

    def without(
        self, more: Mapping[str, Tensor], progress: ProgressFn | None = None
    ) -> DampedFisher:
        """The same operator with the weights in `more` also removed (kernel downdated).

        Costs one pass over the newly removed columns, ``O((N C)^2 |new| + (N C)^3)``;
        `progress(1)` per kernel group.
        """
        new = {
            k: v.bool() & ~self.removed[k] if k in self.removed else v.bool()
            for k, v in more.items()
        }
        groups = []
        for g in self.groups:
            groups.append(g.downdated(new))
            _tick(progress)
        return DampedFisher(self.dg, self.eps, self.structure, _union(self.removed, new), groups)

    @property
    def n(self) -> int:
        return self.dg.n

    @property
    def device(self) -> torch.device:
        return self.dg.losses.device

    def inverse_diagonal(self, progress: ProgressFn | None = None) -> dict[str, Tensor]:
        """``[H_RR^-1]_qq`` per parameter (float64; entries of removed weights are ``1/eps``);
        `progress(1)` per block."""
        out: dict[str, Tensor] = {}
        for g in self.groups:
            for b in g.blocks:
                out.update(g.inverse_diagonal(b, self.removed, self.eps, self.n))
                _tick(progress)
        return out

    def inverse_column(self, name: str, index: int) -> dict[str, Tensor]:
        """``H_RR^-1 e_q = (1/eps)(e_q - Jᵀ A^-1 j_q)`` for flat index `index` of `name`
        (parameter layout, float64)."""
        g, block = self._group_of(name)
        j = param_columns(block.source, name, index, index + 1).reshape(-1, 1).double()
        out = {k: -t for k, t in g.vjp(g.solve(j).reshape(self.n, -1)).items()}
        out[name].view(-1)[index] += 1.0
        return {k: self._mask(k, t) / self.eps for k, t in out.items()}

    def remove(self, weights: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], float]:
        """Exact OBS update for removing every weight in `removed` at once.

        Returns ``δw`` (``-w`` on removed entries, the optimal compensation elsewhere) for the
        parameters of all groups, and the predicted loss increase ``½ δwᵀ H δw =
        (eps/2)(||w_Q||² + uᵀ A^-1 u)`` with ``u = J_Q w_Q``.
        """
        delta: dict[str, Tensor] = {}
        increase = 0.0
        for g in self.groups:
            u, wq_sq = self._removed_projection(g, weights)
            v = g.solve(u)
            increase += 0.5 * self.eps * (wq_sq + float(u.T @ v))
            for k, t in g.vjp(v.reshape(self.n, -1)).items():
                t = self._mask(k, t)
                m = self.removed.get(k)
                if m is not None:
                    t = torch.where(m, -weights[k].detach().double(), t)
                delta[k] = t
        return delta, increase

    # ------------------------------------------------------------------------ internals
    def _removed_projection(
        self, g: KernelGroup, weights: Mapping[str, Tensor]
    ) -> tuple[Tensor, float]:
        """``u = J_Q w_Q`` ``[N C, 1]`` over the group's blocks, and ``||w_Q||²``."""
        u = torch.zeros(self.n * self.dg.columns, 1, dtype=torch.float64, device=self.device)
        wq_sq = 0.0
        for b in g.blocks:
            wq = {}
            for name in b.params:
                m = self.removed.get(name)
                w = weights[name].detach().double()
                wq[name] = w * m if m is not None else torch.zeros_like(w)
                wq_sq += float(wq[name].pow(2).sum())
            if wq_sq > 0:
                dt = b.source.dtype
                u += b.source.jvp({k: t.to(dt) for k, t in wq.items()}).double().reshape(-1, 1)
        return u, wq_sq

    def _group_of(self, name: str) -> tuple[KernelGroup, Block]:
        for g in self.groups:
            for b in g.blocks:
                if name in b.params:
                    return g, b
        raise KeyError(name)

    def _mask(self, name: str, t: Tensor) -> Tensor:
        """Zero the removed coordinates (they are not free variables)."""
        m = self.removed.get(name)
        return t if m is None else t.masked_fill(m, 0.0)


def _tick(progress: ProgressFn | None) -> None:
    if progress is not None:
        progress(1)
