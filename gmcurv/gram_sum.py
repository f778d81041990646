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

Threads: whole row panels are shared among the torch threads, each on one intra-op thread
(`gmcurv.block_krylov.in_threads`: no per-op fork/join, which for panel-sized GEMMs and
Hadamard products costs more than it saves, and stalls on a busy machine); the same for
the products of `LowerGram`, which run transposed (``(K Y)ᵀ = Yᵀ K``: the BLAS's skinny
products are fastest that way round).

Precision is that of `gmcurv.fisher.gram_kernel`: products in the factors' dtype (inner
dimensions above `GEMM_CHUNK` chunked by `rows_gram`), sums in float32 when every block is
float32, float64 otherwise.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from gmcurv.block_krylov import in_threads, intra_op_threads
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


def _gram_add(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """``out += a bᵀ`` (`_gram_into`'s precision)."""
    if a.dtype == torch.float64 or a.shape[1] <= GEMM_CHUNK:
        return out.addmm_(a, b.T)
    return out.add_(rows_gram(a, b))


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
    if whole:
        index = {id(s): i for i, s in enumerate(sources)}
        part = _whole_sum(whole, acc, progress, share, diagonals, index)
        K = part if K is None else K.add_(part)
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
    traffic of a full product. ``rows >= n``: a full matrix.

    The products run transposed, ``(K Y)ᵀ = Yᵀ K``, on the panels as stored (row-major
    reads, `_panel_product`), over the torch threads as whole panels per thread
    (`gmcurv.block_krylov.in_threads`), and in float64 (`exact`) converting tiles of
    `TILE_COLS` columns into small per-thread buffers."""

    def __init__(self, data: Tensor, rows: int):
        self.data, self.rows, self._full = data, rows, rows >= data.shape[0]

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
        if self._full and Y.shape[1] > SKINNY:
            return self.data @ Y
        return self._product(Y, self.dtype)

    def exact(self, Y: Tensor) -> Tensor:
        """``K Y`` in float64 (``K``'s entries are exact in float64), converting one tile
        of ``K`` at a time into a reused per-thread buffer."""
        return self._product(Y, torch.float64)

    def _product(self, Y: Tensor, dtype: torch.dtype) -> Tensor:
        n = self.shape[0]
        rows = PANEL_ROWS if self._full else self.rows
        Yt = Y.to(dtype).T.contiguous()  # [b, n]
        starts = list(range(0, n, rows))
        # a full matrix: whole rows (nothing mirrored); lower panels: K[P, :p1] and mirror
        ends = [n if self._full else min(n, p0 + rows) for p0 in starts]
        convert = dtype != self.dtype

        def work(t: int, panels: list[int]) -> Tensor:
            out = Yt.new_zeros(Yt.shape)
            buf = Yt.new_empty(rows * min(n, TILE_COLS)) if convert else None
            for i in panels:
                p0, end = starts[i], ends[i]
                p1 = min(n, p0 + rows)
                below = 0 if self._full else p0
                _panel_product(self.data[p0:p1, :end], Yt, out, p0, p1, below, buf)
            return out

        threads = _threads(n * n * Yt.shape[0])
        with intra_op_threads(1 if threads == 1 else torch.get_num_threads()):
            parts = in_threads(work, [float(e) for e in ends], threads)
        out = parts[0]
        for part in parts[1:]:
            out.add_(part)
        return out.T


SKINNY = 64  # products with at most this many columns run transposed by panels
TILE_COLS = 512  # columns of a float64 tile (`LowerGram.exact`): 1 MB of 256 rows
BUILD_COLS = 2048  # columns of a kernel tile (wide GEMMs run fastest)
MIN_THREADED = 1 << 24  # multiply-adds below which a product or kernel runs on one thread
# a kernel by panels below this (about 4 ms on one core) is formed on one thread: right after
# a threaded capture, torch's idle OpenMP worker still spins on the second core, and sharing
# it costs more than it saves (W1, 512 rows, 0.24 G multiply-adds: 25.3 vs 28.1 ms median)
MIN_THREADED_KERNEL = 1 << 28


def _threads(work: float, least: float | None = None) -> int:
    """Threads for `work` multiply-adds: torch's count when there is enough to share (at
    least `least`, default `MIN_THREADED`)."""
    return torch.get_num_threads() if work >= (MIN_THREADED if least is None else least) else 1


def _tile_product(
    tile: Tensor,
    Yt: Tensor,
    out: Tensor,
    p0: int,
    p1: int,
    c0: int,
    c1: int,
    below: int,
    buf: Tensor | None,
) -> None:
    """Add a tile ``T = K[p0:p1, c0:c1]``'s part of ``(K Y)ᵀ`` to `out` (``[b, n]``):
    ``out[:, P] += Yᵀ[:, C] Tᵀ`` and, for its columns below `below` (those whose mirror
    ``K[C, P]`` is not stored), ``out[:, C] += Yᵀ[:, P] T``. `buf`: convert ``T`` into it
    first (to `out`'s dtype)."""
    if buf is not None:
        tile = buf[: tile.numel()].view(tile.shape).copy_(tile)
    out[:, p0:p1].addmm_(Yt[:, c0:c1], tile.T)
    m = min(c1, below) - c0
    if m > 0:
        out[:, c0 : c0 + m].addmm_(Yt[:, p0:p1], tile[:, :m])


def _panel_product(
    panel: Tensor, Yt: Tensor, out: Tensor, p0: int, p1: int, below: int, buf: Tensor | None
) -> None:
    """A row panel's ``K[p0:p1, :end]`` part of ``(K Y)ᵀ`` (`_tile_product`; its columns
    below `below` also mirrored): whole, or tile by tile through `buf` when converting."""
    end = panel.shape[1]
    if buf is None:
        _tile_product(panel, Yt, out, p0, p1, 0, end, below, None)
        return
    for c0 in range(0, end, TILE_COLS):
        c1 = min(end, c0 + TILE_COLS)
        _tile_product(panel[:, c0:c1], Yt, out, p0, p1, c0, c1, below, buf)


def _panel_sum(
    pairs: list[HadamardFactors],
    size: int,
    dtype: torch.dtype,
    progress: Callable[[int], None] | None,
    first: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``Σ_l (Δ_l Δ_lᵀ) ⊙ (X_l X_lᵀ + b_l)`` by lower-triangular row panels of
    `PANEL_ROWS` rows (diagonal tiles symmetrised, the rest of the upper triangle unset:
    `LowerGram`); with `first`, also ``K first`` (`summed_gram_product`).

    Each panel is formed tile by tile (`TILE_COLS` columns): both factor Grams of a layer
    into two tile buffers and their Hadamard product accumulated into ``K``'s tile while
    all three are in L2 (the bias as ``1`` in the inputs' Gram's buffer before its
    product). Whole panels are shared among the torch threads (`in_threads`), each with
    its own buffers and its own share of the first product, summed at the end."""
    device = pairs[0].delta.device
    factors = [(f.delta.to(dtype), None if f.x is None else f.x.to(dtype), f.bias) for f in pairs]
    K = torch.empty(size, size, dtype=dtype, device=device)
    Vt = None if first is None else first.to(dtype).T.contiguous()
    starts = list(range(0, size, PANEL_ROWS))
    inner = sum(d.shape[1] + (0 if x is None else x.shape[1]) for d, x, _ in factors)
    threads = _threads(size * size * inner / 2, MIN_THREADED_KERNEL)
    done, told = [0], [0]  # rows formed (all threads), rows reported (caller's thread)
    lock = threading.Lock()

    def work(t: int, panels: list[int]) -> Tensor | None:
        width = min(size, BUILD_COLS)
        dd = torch.empty(PANEL_ROWS * width, dtype=dtype, device=device)
        aa = torch.empty(PANEL_ROWS * width, dtype=dtype, device=device)
        KVt = None if Vt is None else torch.zeros_like(Vt)
        for i in panels:
            p0 = starts[i]
            p1 = min(size, p0 + PANEL_ROWS)
            _panel_tiles(factors, K, p0, p1, dd, aa)
            if KVt is not None and Vt is not None:
                _panel_product(K[p0:p1, :p1], Vt, KVt, p0, p1, p0, None)
            with lock:
                done[0] += p1 - p0
            if progress and t == 0:  # the bar moves on the caller's thread only
                progress(done[0] - told[0])
                told[0] = done[0]
        return KVt

    costs = [min(size, p0 + PANEL_ROWS) for p0 in starts]
    parts = in_threads(work, costs, threads)
    if progress and done[0] > told[0]:
        progress(done[0] - told[0])
    if Vt is None:
        return K, None
    KVt = parts[0]
    for part in parts[1:]:
        KVt.add_(part)
    return K, KVt.T


def _panel_tiles(
    factors: list[tuple[Tensor, Tensor | None, bool]],
    K: Tensor,
    p0: int,
    p1: int,
    dd: Tensor,
    aa: Tensor,
) -> None:
    """``K[p0:p1, :p1] = Σ_l (Δ_l Δ_lᵀ) ⊙ (X_l X_lᵀ + b_l)`` on those rows, tile by tile
    (`_panel_sum`, `_tile_sum`), the diagonal tile symmetrised."""
    for c0 in range(0, p1, BUILD_COLS):
        _tile_sum(factors, K, p0, p1, c0, min(p1, c0 + BUILD_COLS), dd, aa)


def _whole_sum(
    blocks: Sequence[GradientSource],
    dtype: torch.dtype,
    progress: Callable[[int], None] | None,
    share: float,
    diagonals: dict[int, Tensor] | None,
    index: dict[int, int],
) -> Tensor:
    """``Σ K_block`` (in `dtype`) of blocks whose kernels are formed whole
    (`_block_gram`), the blocks shared among the torch threads by cost (`_gram_cost`;
    each thread sums its own on one intra-op thread: `in_threads`). `diagonals`: each
    block's float64 diagonal under its `index` (`summed_gram_product`). `progress(share)`
    per block, on the caller's thread (other threads' blocks counted as seen done)."""
    costs = [_gram_cost(s) for s in blocks]
    done, told = [0], [0]
    lock = threading.Lock()

    def work(t: int, chosen: list[int]) -> Tensor | None:
        total = None
        for i in chosen:
            src = blocks[i]
            part = _block_gram(src, torch.float64 if diagonals is not None else dtype)
            if diagonals is not None:
                diagonals[index[id(src)]] = part.diagonal().clone()
                part = part.to(dtype)  # a fresh tensor (or float64 already): summed into
            total = part if total is None else total.add_(part)
            with lock:
                done[0] += 1
            if progress and t == 0:
                progress(share * (done[0] - told[0]))
                told[0] = done[0]
        return total

    threads = _threads(sum(costs)) if len(blocks) > 1 else 1
    parts = [p for p in in_threads(work, costs, threads) if p is not None]
    if progress and done[0] > told[0]:
        progress(share * (done[0] - told[0]))
    K = parts[0]
    for part in parts[1:]:
        K.add_(part)
    return K


def _gram_cost(src: GradientSource) -> float:
    """About the multiply-adds of `_block_gram` for `src` (to share blocks among threads):
    several-token Linear blocks by their cheaper route, others ``rows² x factor width``."""
    if isinstance(src, LinearFactors) and src.tokens > 1:
        from gmcurv.factors import linear_kernels as kernels
        from gmcurv.factors.linear import MATERIALISED_RATE

        n, c, t = src.n, src.columns, src.tokens
        o, i = src.delta.shape[-1], src.x.shape[-1] + 1
        token = kernels.token_pair_cost(n, c, t, o, i)
        return float(min(token, MATERIALISED_RATE * (n * c * (t + n * c) * o * i)))
    rows = max(1, src.n * src.columns)
    return float(rows * src.nbytes() / max(1, src.dtype.itemsize))


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


class PanelStream:
    """The lower panels of ``K = Σ_l (Δ_l Δ_lᵀ) ⊙ (X_l X_lᵀ + b_l)`` (`_panel_sum`) formed
    while the rows arrive batch by batch: a panel's tiles ``K[P, C]`` (``C`` below the
    panel, at most `STREAM_COLS` columns, and the diagonal tile) need only the rows up to
    ``P``'s end, so a background thread forms them while the caller captures the next
    batches (on one intra-op thread each: the two run side by side on two cores), and the
    caller joins in for what is left at `finish`. Same tiles, same ops as `_panel_sum`:
    the same kernel bit for bit. `finish` can also take a first block product ``K V``:
    each tile formed after it is called adds its share while in cache, the tiles formed
    before are queued as product tasks among the last ones (filling the threads' tail);
    every tile's share is kept apart and summed in tile order, so ``K V`` does not
    depend on which thread took which tile.

    `layers`: per block ``(O, I or None, bias)``, the widths of its `HadamardFactors`.
    `rows`: the whole sample's `HadamardFactors` (in `dtype`) that the caller fills batch
    by batch (`gmcurv.capture.GradientRows`), read in place — `add` then only announces
    the new rows; without, the stream keeps its own copy of each batch's factors."""

    def __init__(
        self,
        size: int,
        layers: Sequence[tuple[int, int | None, bool]],
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        rows: Sequence[HadamardFactors] | None = None,
    ):
        self.size, self.dtype, self.ready = size, dtype, 0
        self._copy = rows is None
        self.factors = (
            [
                (
                    torch.empty(size, o, dtype=dtype, device=device),
                    None if i is None else torch.empty(size, i, dtype=dtype, device=device),
                    bias,
                )
                for o, i, bias in layers
            ]
            if rows is None
            else [(f.delta, f.x, f.bias) for f in rows]
        )
        self.K = torch.empty(size, size, dtype=dtype, device=device)
        # tasks (p0, p1, c0, c1, form): a tile to form (and multiply, once `_vt` is set)
        # or, form False, a formed tile to multiply
        self._tiles: list[tuple[int, int, int, int, bool]] = []
        self._formed: list[tuple[int, int, int, int]] = []  # formed before `_vt` was set
        self._vt: Tensor | None = None  # Vᵀ of `finish`'s first block, [b, size]
        self._parts: dict[tuple[int, int, int, int], tuple[Tensor, Tensor | None]] = {}
        self._next_panel = 0  # start of the first panel not yet queued
        self._closed = False
        self._error: BaseException | None = None
        self._cv = threading.Condition()
        self._worker = threading.Thread(target=self._work, args=(True,), daemon=True)
        self._worker.start()

    def add(self, pairs: Sequence[HadamardFactors]) -> None:
        """The next rows' factors (one batch: every block's `HadamardFactors`; with `rows`,
        already in place: only their count is read)."""
        n = pairs[0].delta.shape[0]
        r0, r1 = self.ready, self.ready + n
        if r1 > self.size:
            raise ValueError(f"more rows than the kernel's {self.size}")
        for (D, X, _), f in zip(self.factors, pairs, strict=True):
            if not self._copy:
                break
            D[r0:r1].copy_(f.delta)
            if X is not None and f.x is not None:
                X[r0:r1].copy_(f.x)
        with self._cv:
            self.ready = r1
            self._queue_panels()
            self._cv.notify_all()

    def finish(self, first: Tensor | None = None) -> tuple[LowerGram, Tensor | None]:
        """``K`` (every row added) as a `LowerGram` of `PANEL_ROWS`-row panels, the
        remaining tiles shared between the caller and the background thread, and ``K V``
        for ``V = first`` (``[size, b]``, in ``K``'s dtype; None without `first`)."""
        if self.ready != self.size:
            raise ValueError(f"{self.ready} of {self.size} rows added")
        with self._cv:
            self._closed = True
            if first is not None:
                self._vt = first.to(self.dtype).T.contiguous()
                # cheap product tasks first in the list: popped last, they fill the tail
                self._tiles[:0] = [(*t, False) for t in self._formed]
                self._formed = []
            self._queue_panels()
            self._cv.notify_all()
        with _one_thread():
            self._work(False)
        self._worker.join()
        if self._error is not None:
            raise self._error
        if self._vt is None:
            return LowerGram(self.K, PANEL_ROWS), None
        out = torch.zeros_like(self._vt)
        for (p0, p1, c0, c1), (own, mirror) in sorted(self._parts.items()):
            out[:, p0:p1] += own
            if mirror is not None:
                out[:, c0:c1] += mirror
        self._parts.clear()
        return LowerGram(self.K, PANEL_ROWS), out.T

    def close(self) -> None:
        """Stop the background thread (on errors: the kernel is abandoned)."""
        with self._cv:
            self._closed, self._tiles = True, []
            self._cv.notify_all()
        self._worker.join()

    def _queue_panels(self) -> None:
        """Queue the tiles of every panel whose rows have all arrived (lock held)."""
        while self._next_panel < self.size:
            p0 = self._next_panel
            p1 = min(self.size, p0 + PANEL_ROWS)
            if self.ready < p1:
                break
            self._tiles.append((p0, p1, p0, p1, True))  # the diagonal tile: symmetrised
            for c0 in range(0, p0, STREAM_COLS):
                self._tiles.append((p0, p1, c0, min(p0, c0 + STREAM_COLS), True))
            self._next_panel = p1

    def _work(self, background: bool) -> None:
        if background:
            torch.set_num_threads(1)
        width = min(self.size, max(PANEL_ROWS, STREAM_COLS))
        dd = torch.empty(PANEL_ROWS * width, dtype=self.dtype, device=self.K.device)
        aa = torch.empty(PANEL_ROWS * width, dtype=self.dtype, device=self.K.device)
        while True:
            with self._cv:
                while not self._tiles and not self._closed:
                    self._cv.wait()
                if not self._tiles:
                    return
                p0, p1, c0, c1, form = self._tiles.pop()  # the latest panels' (costliest) first
            try:
                if form:
                    _tile_sum(self.factors, self.K, p0, p1, c0, c1, dd, aa)
                with self._cv:
                    vt = self._vt
                    if vt is None:  # no product asked for yet: queued by `finish`, if asked
                        self._formed.append((p0, p1, c0, c1))
                if vt is not None:
                    self._parts[(p0, p1, c0, c1)] = _tile_share(self.K, vt, p0, p1, c0, c1)
            except BaseException as e:  # re-raised by finish
                with self._cv:
                    self._error, self._closed, self._tiles = e, True, []
                    self._cv.notify_all()
                return


def _tile_share(
    K: Tensor, Vt: Tensor, p0: int, p1: int, c0: int, c1: int
) -> tuple[Tensor, Tensor | None]:
    """A lower tile ``T = K[p0:p1, c0:c1]``'s shares of ``(K V)ᵀ``: ``Vᵀ[:, C] Tᵀ`` (for
    the columns ``P``) and, below the diagonal, the mirror's ``Vᵀ[:, P] T`` (for ``C``)."""
    tile = K[p0:p1, c0:c1]
    own = Vt[:, c0:c1] @ tile.T
    return own, (Vt[:, p0:p1] @ tile if c1 <= p0 else None)


STREAM_COLS = 512  # columns of a streamed tile (small: the last ones balance the threads)


@contextmanager
def _one_thread():
    with intra_op_threads(1):
        yield


def _tile_sum(
    factors: Sequence[tuple[Tensor, Tensor | None, bool]],
    K: Tensor,
    p0: int,
    p1: int,
    c0: int,
    c1: int,
    dd: Tensor,
    aa: Tensor,
) -> None:
    """``K[p0:p1, c0:c1] = Σ_l (Δ_l Δ_lᵀ) ⊙ (X_l X_lᵀ + b_l)`` on that tile: both factor
    Grams of a layer into the tile buffers `dd`, `aa` and their Hadamard product summed
    into ``K``'s tile while all three are in cache; the diagonal tile ``K[p0:p1, p0:p1]``
    symmetrised when the tile holds it."""
    tile = K[p0:p1, c0:c1]
    d2 = dd[: tile.numel()].view(tile.shape)
    a2 = aa[: tile.numel()].view(tile.shape)
    for i, (delta, x, bias) in enumerate(factors):
        _gram_into(delta[p0:p1], delta[c0:c1], d2)
        if x is None:  # bias only: X Xᵀ + 1 = 1
            (tile.copy_ if i == 0 else tile.add_)(d2)
            continue
        if bias:
            a2.fill_(1.0)
            _gram_add(x[p0:p1], x[c0:c1], a2)
        else:
            _gram_into(x[p0:p1], x[c0:c1], a2)
        if i == 0:
            torch.mul(d2, a2, out=tile)
        else:
            tile.addcmul_(d2, a2)
    if c0 <= p0 and p1 <= c1:  # holds the diagonal tile: exactly symmetric, like the mirror
        diag = K[p0:p1, p0:p1]
        diag.copy_(diag.tril() + diag.tril(-1).T)
