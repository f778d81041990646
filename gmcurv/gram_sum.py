"""The Gram kernel summed over blocks, ``K = Σ_blocks K_block`` (``[N C, N C]``), formed
by lower-triangular row panels.

Blocks whose kernel is a Hadamard product of two factor Grams — one-token Linear layers,
``K_l = (Δ_l Δ_lᵀ) ⊙ (A_l A_lᵀ)`` with ``Δ_l: [N C, O]`` the cotangent rows and
``A_l = [x, 1]`` the inputs (repeated per column; ``A_l A_lᵀ = x xᵀ + 1``, the bias added
after the product so its inner dimension stays the inputs' own) — are summed panel by
panel: for the rows ``P`` of a panel only the columns up to its diagonal tile are formed,
``K[P, :p1] = Σ_l (Δ_l[P] Δ_l[:p1]ᵀ) ⊙ (A_l[P] A_l[:p1]ᵀ)`` (about ``(1 + 1/panels) / 2``
of the products of the full kernels, like a ``syrk``), each panel's Hadamard products and
sum over layers done in place while the panel is in cache, its diagonal tile symmetrised.
No per-layer ``(N C)²`` temporaries. The panels may stay as they are (`LowerGram`:
products read each stored entry once, no mirroring) or the strict upper triangle is
mirrored tile by tile (``K`` exactly symmetric); a first block product can be taken while
each panel is in cache (`summed_gram_product`). Other blocks' kernels
(`GradientSource.gram`) are added whole to the mirrored panels; several-token Linear
blocks on their materialised route by lower row panels of each slab (`_slab_panels`).

Precision is that of `gmcurv.fisher.gram_kernel`: products in the factors' dtype (inner
dimensions above `GEMM_CHUNK` chunked by `rows_gram`), sums in float32 when every block is
float32, float64 otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gmcurv.factors import GradientSource, LinearFactors
from gmcurv.factors.source import GEMM_CHUNK, rows_gram

PANEL_ROWS = 256  # panel height: 2 MB of float32 per 2,048 columns
MIN_PANELS = 2  # fewer row panels than this: the full products are as cheap


@dataclass(frozen=True)
class HadamardFactors:
    """``K = (Δ Δᵀ) ⊙ (X Xᵀ + b)``: cotangent rows ``Δ: [N C, O]``, the weight's inputs
    ``X: [N C, I]`` (None: no weight, ``X Xᵀ = 0``) and ``b = 1`` with a bias. The bias is
    added to ``X Xᵀ`` rather than kept as an input column of ones, so the products keep
    the inputs' own (often aligned) inner dimension."""

    delta: Tensor
    x: Tensor | None
    bias: bool


def hadamard_factors(src: GradientSource) -> HadamardFactors | None:
    """The block's `HadamardFactors`, or None when its kernel is not of that form (several
    tokens, embeddings, dense, tied; no parameters)."""
    if not isinstance(src, LinearFactors) or src.tokens != 1:
        return None
    if not (src.has_weight or src.has_bias):
        return None
    n, c = src.n, src.columns
    delta = src.delta[:, :, 0].reshape(n * c, -1)
    x = src.x[:, 0] if src.has_weight else None  # [N, I]
    if x is not None and c > 1:
        x = x.repeat_interleave(c, 0)
    return HadamardFactors(delta, x, src.has_bias)


def _gram_into(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """``a bᵀ`` into `out` (`rows_gram` precision: chunked above `GEMM_CHUNK`)."""
    if a.dtype == torch.float64 or a.shape[1] <= GEMM_CHUNK:
        return torch.mm(a, b.T, out=out)
    return out.copy_(rows_gram(a, b))


def summed_gram(
    sources: Sequence[GradientSource],
    size: int,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """``K = Σ K_block`` (module doc) in float32 when every source is float32, else float64.

    `progress(r)`: ``size`` units in all, shared between the blocks — ``r`` rows of a
    panel times the panelled blocks' share, or a whole block's share when it is added.
    """
    return summed_gram_product(sources, size, device, progress, None)[0]


def summed_gram_product(
    sources: Sequence[GradientSource],
    size: int,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
    first: Tensor | None = None,
    lower: bool = False,
    diagonals: dict[int, Tensor] | None = None,
):
    """`summed_gram` and, for a block ``V = first`` (``[size, b]``), the product ``K V`` in
    ``K``'s dtype, taken panel by panel while each row panel is still in cache
    (``K V[P] += K[P, :p1] V[:p1]``, ``K V[:p0] += K[P, :p0]ᵀ V[P]``: one pass over ``K``
    saved, e.g. block Lanczos's first product, `block_krylov.block_lanczos`'s `first`),
    None without `first`. The diagonal tiles are symmetrised before their product, so
    ``K V`` is the product with the (exactly symmetric) ``K``, up to rounding.

    `lower`: return ``K`` as a `LowerGram` (its lower panels only: no mirroring, and
    products that read half of ``K``) instead of a full tensor. `diagonals`: filled with
    ``{i: diag K_i}`` (float64, ``||g_i[n,c]||²``) for each source ``i`` whose kernel is
    formed whole (not by panels): its squared norms at no extra cost."""
    low = bool(sources) and all(s.dtype == torch.float32 for s in sources)
    acc = torch.float32 if low else torch.float64
    found = [(s, hadamard_factors(s)) for s in sources]
    pairs = [f for _, f in found if f is not None]
    whole = [s for s, f in found if f is None]
    K: Tensor | None = None
    share = size / max(1, len(sources))
    KV = None
    rows = size  # one panel: a full matrix
    if pairs and math.ceil(size / PANEL_ROWS) >= MIN_PANELS:
        tick = (lambda r: progress(r * len(pairs) / len(sources))) if progress else None
        # the panels' product only when they are all of K (else one product at the end)
        K, KV = _panel_sum(pairs, size, acc, tick, None if whole else first)
        rows = PANEL_ROWS
        if whole:  # whole blocks are added to all of K: mirror the panels first
            K, rows = _mirror_lower(K), size
    else:
        whole = list(sources)
    index = {id(s): i for i, s in enumerate(sources)}
    for s in whole:
        part = _block_gram(s, torch.float64 if diagonals is not None else acc)
        if diagonals is not None:
            diagonals[index[id(s)]] = part.diagonal().clone()
            part = part.to(acc)  # a fresh tensor (or float64 already): summed into in place
        K = part if K is None else K.add_(part)
        if progress:
            progress(share)
    if K is None:
        K = torch.zeros(size, size, dtype=acc, device=device)
    gram = LowerGram(K, rows)
    if first is not None and KV is None:
        KV = gram.matmat(first.to(acc))
    return (gram if lower else gram.full()), KV


class LowerGram:
    """A symmetric kernel held as lower row panels of `rows` rows: panel ``P = [p0, p1)``
    holds ``K[P, :p1]`` (its diagonal tile symmetric), the strict upper triangle beyond
    the diagonal tiles is left unset until `full` mirrors it. Products read each stored
    entry once, ``(K Y)[P] = K[P, :p1] Y[:p1] + Σ_{Q > P} K[Q, P]ᵀ Y[Q]``: half the memory
    traffic of a full product. ``rows >= n``: a full matrix."""

    def __init__(self, data: Tensor, rows: int):
        self.data, self.rows, self._full = data, rows, rows >= data.shape[0]
        self._buf: Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    def diagonal(self) -> Tensor:
        return self.data.diagonal()

    def full(self) -> Tensor:
        """The whole ``K`` (mirrored in place the first time)."""
        if not self._full:
            _mirror_lower(self.data)
            self._full = True
        return self.data

    def matmat(self, Y: Tensor) -> Tensor:
        """``K Y`` in ``K``'s dtype."""
        Y = Y.to(self.dtype)
        if self._full:
            return self.data @ Y
        return self._panels(Y, lambda p0, p1: self.data[p0:p1, :p1])

    def exact(self, Y: Tensor) -> Tensor:
        """``K Y`` in float64 (``K``'s entries are exact in float64), converting one row
        panel at a time into a reused buffer."""
        Y = Y.to(torch.float64)
        if self.dtype == torch.float64:
            return self.matmat(Y)
        n = self.shape[0]
        rows = min(n, PANEL_ROWS if self._full else self.rows)
        if self._buf is None:
            self._buf = torch.empty(rows * n, dtype=torch.float64, device=self.device)
        buf = self._buf
        if self._full:  # every row of K: panels of whole rows
            out = Y.new_empty(n, Y.shape[1])
            for p0 in range(0, n, rows):
                p1 = min(n, p0 + rows)
                panel = buf[: (p1 - p0) * n].view(p1 - p0, n).copy_(self.data[p0:p1])
                torch.mm(panel, Y, out=out[p0:p1])
            return out

        def panel64(p0: int, p1: int) -> Tensor:
            return buf[: (p1 - p0) * p1].view(p1 - p0, p1).copy_(self.data[p0:p1, :p1])

        return self._panels(Y, panel64)

    def _panels(self, Y: Tensor, panel_of: Callable[[int, int], Tensor]) -> Tensor:
        n = self.shape[0]
        out = Y.new_empty(n, Y.shape[1])
        for p0 in range(0, n, self.rows):
            p1 = min(n, p0 + self.rows)
            panel = panel_of(p0, p1)
            torch.mm(panel, Y[:p1], out=out[p0:p1])
            if p0:
                out[:p0].addmm_(panel[:, :p0].T, Y[p0:p1])
        return out


def _panel_sum(
    pairs: list[HadamardFactors],
    size: int,
    dtype: torch.dtype,
    progress: Callable[[int], None] | None,
    first: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``Σ_l (Δ_l Δ_lᵀ) ⊙ (X_l X_lᵀ + b_l)`` by lower-triangular row panels of
    `PANEL_ROWS` rows (diagonal tiles symmetrised, the rest of the upper triangle unset:
    `LowerGram`); with `first`, also ``K first`` (`summed_gram_product`)."""
    device = pairs[0].delta.device
    factors = [(f.delta.to(dtype), None if f.x is None else f.x.to(dtype), f.bias) for f in pairs]
    K = torch.empty(size, size, dtype=dtype, device=device)
    left = torch.empty(PANEL_ROWS * size, dtype=dtype, device=device)
    right = torch.empty(PANEL_ROWS * size, dtype=dtype, device=device)
    V = None if first is None else first.to(dtype)
    KV = None if V is None else torch.zeros(size, V.shape[1], dtype=dtype, device=device)
    for p0 in range(0, size, PANEL_ROWS):
        p1 = min(size, p0 + PANEL_ROWS)
        panel = K[p0:p1, :p1]
        dd = left[: (p1 - p0) * p1].view(p1 - p0, p1)
        aa = right[: (p1 - p0) * p1].view(p1 - p0, p1)
        for i, (delta, x, bias) in enumerate(factors):
            _gram_into(delta[p0:p1], delta[:p1], dd)
            if x is None:  # bias only: X Xᵀ + 1 = 1
                (panel.copy_ if i == 0 else panel.add_)(dd)
                continue
            _gram_into(x[p0:p1], x[:p1], aa)
            if bias:
                aa.add_(1.0)
            if i == 0:
                torch.mul(dd, aa, out=panel)
            else:
                panel.addcmul_(dd, aa)
        tile = panel[:, p0:p1]
        tile.copy_(tile.tril() + tile.tril(-1).T)  # exactly symmetric, like the mirror
        if KV is not None and V is not None:
            KV[p0:p1] += panel @ V[:p1]
            if p0:
                KV[:p0] += panel[:, :p0].T @ V[p0:p1]
        if progress:
            progress(p1 - p0)
    return K, KV


MIRROR_TILE = 128  # transposed copies tile by tile: a tile pair stays in L2
SLAB_PANELS = 8  # row panels of a materialised several-token block (at most)
MIN_SLAB_ROWS = 64  # ... of at least this many rows


def _block_gram(src: GradientSource, dtype: torch.dtype) -> Tensor:
    """One block's whole kernel in `dtype`: `GradientSource.gram`, except several-token
    Linear blocks on their materialised route (`LinearFactors.gram` picks it when it costs
    less than the token pairs), which `_slab_panels` forms by lower row panels."""
    if isinstance(src, LinearFactors) and src.tokens > 1:
        from gmcurv.factors import linear_kernels as kernels
        from gmcurv.factors.linear import MATERIALISED_RATE

        n, c, t = src.n, src.columns, src.tokens
        o, i = src.delta.shape[-1], src.x.shape[-1] + 1
        token = kernels.token_pair_cost(n, c, t, o, i)
        if token > MATERIALISED_RATE * (n * c * (t + n * c) * o * i):
            return _slab_panels(src).to(dtype)
    return src.gram(dtype)


def _slab_panels(src: LinearFactors) -> Tensor:
    """``K = Σ_slabs G_s G_sᵀ`` (float64) with ``G_s[(n,c)] = Σ_t δ[n,c,t,s] a[n,t]ᵀ`` the
    gradients' rows for a slab ``s`` of output units (`LinearFactors._materialised_gram`),
    each slab's products by lower row panels (``G_s[P] G_s[:p1]ᵀ``, `rows_gram`): with
    ``p`` panels ``(1 + 1/p) / 2`` of the full products (8 panels: 56 %), then mirrored."""
    from gmcurv.factors.source import CHUNK_ELEMENTS

    a = src.a[:, None]  # [N, 1, T, I]
    n, c, _, o = src.delta.shape
    rows = n * c
    panels = max(1, min(SLAB_PANELS, rows // MIN_SLAB_ROWS))
    height = -(-rows // panels)
    K = torch.zeros(rows, rows, dtype=torch.float64, device=src.device)
    step = max(1, CHUNK_ELEMENTS // max(1, rows * a.shape[-1]))
    for lo in range(0, o, step):
        d = src.delta[..., lo : lo + step].transpose(-1, -2)  # [N, C, s, T]
        G = torch.matmul(d, a).reshape(rows, -1)
        for p0 in range(0, rows, height):
            p1 = min(rows, p0 + height)
            K[p0:p1, :p1] += rows_gram(G[p0:p1], G[:p1])
    return _mirror_lower(K)


def _mirror_lower(K: Tensor) -> Tensor:
    """Fill ``K``'s strict upper triangle from its lower one, in place (exactly symmetric;
    the diagonal tiles' products need not be symmetric bitwise)."""
    size = K.shape[0]
    for p0 in range(0, size, MIRROR_TILE):
        p1 = min(size, p0 + MIRROR_TILE)
        for q0 in range(0, p0, MIRROR_TILE):
            K[q0 : q0 + MIRROR_TILE, p0:p1].copy_(K[p0:p1, q0 : q0 + MIRROR_TILE].T)
        tile = K[p0:p1, p0:p1]
        tile.copy_(tile.tril() + tile.tril(-1).T)
    return K


def float64_products(K: Tensor) -> Callable[[Tensor], Tensor]:
    """``Y -> K Y`` in float64 for a lower-precision ``K`` (its entries are exact in
    float64), converting one row panel of ``K`` at a time (`LowerGram.exact`)."""
    return LowerGram(K, K.shape[0]).exact


def product_error(K: Tensor | LowerGram) -> float:
    """A bound on ``||fl(K x) - K x||`` for unit ``x`` when ``K x`` is computed in ``K``'s
    dtype: ``n u ||abs(K)|| <= n u tr K`` for a Gram kernel (``|K_ij| <= sqrt(K_ii K_jj)``)."""
    n = K.shape[0]
    return n * torch.finfo(K.dtype).eps * float(K.diagonal().double().abs().sum())
