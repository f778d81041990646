"""A data sample: examples spread over shards, served in deterministic batches.

The sample knows its shards' lengths and reads a shard only when a batch needs it (through
the reader `gmcurv.io.data.load_data` gives it), holding one shard at a time. ``--samples``
keeps the first examples (`DataSample.take`); a distributed rank serves a contiguous window
``[start, stop)`` of them (`DataSample.shard`). Batches carry the global index of their
first example.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from gmcurv.batch import Batch, Inputs, Rows, concat_batch, rebatch, slice_rows
from gmcurv.datacheck import check_shards
from gmcurv.errors import DataError


@dataclass(frozen=True)
class Shard:
    """One file (or one .npy pair) of a data sample."""

    path: Path
    fmt: str  # 'safetensors' | 'npz' | 'npy' | 'csv'
    n: int


ShardReader = Callable[[Shard], Rows]


def window(total: int, rank: int, world: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous share ``[start, stop)`` of `total` examples split over
    `world` ranks (sizes differ by at most one)."""
    return rank * total // world, (rank + 1) * total // world


def shard_ranges(
    shards: Sequence[Shard], span: tuple[int, int]
) -> Iterator[tuple[Shard, int, int]]:
    """``(shard, a, b)``: the rows ``[a, b)`` of each shard that fall in the global `span`."""
    start, stop = span
    lo = 0
    for shard in shards:
        hi = lo + shard.n
        a, b = max(start, lo) - lo, min(stop, hi) - lo
        if b > a:
            yield shard, a, b
        lo = hi
        if lo >= stop:
            break


@dataclass
class DataSample:
    """Examples over `shards` (read by `read`), limited to the first `limit` and to the
    global `window` ``[start, stop)`` of those."""

    path: Path
    shards: list[Shard]
    read: ShardReader
    limit: int | None = None
    window: tuple[int, int] | None = None
    _cache: dict[Path, Rows] = field(default_factory=dict, repr=False)

    @property
    def n_total(self) -> int:
        """Examples in the (limited) sample before any sharding."""
        total = sum(s.n for s in self.shards)
        return total if self.limit is None else min(total, self.limit)

    @property
    def span(self) -> tuple[int, int]:
        """Global indices ``[start, stop)`` this sample serves."""
        return self.window if self.window is not None else (0, self.n_total)

    @property
    def n(self) -> int:
        start, stop = self.span
        return stop - start

    def take(self, n: int | None) -> DataSample:
        """The first `n` examples (all when None)."""
        if n is not None and n <= 0:
            raise DataError(f"--samples must be positive, got {n}")
        return replace(self, limit=n, window=None, _cache={})

    def shard(self, rank: int, world: int) -> DataSample:
        """Rank `rank`'s contiguous share of ``world`` (sizes differ by at most one)."""
        return replace(self, window=window(self.n_total, rank, world), _cache={})

    def _load(self, shard: Shard) -> Rows:
        if shard.path not in self._cache:
            self._cache.clear()  # hold one shard at a time
            self._cache[shard.path] = self.read(shard)
        return self._cache[shard.path]

    def shard_arrays(self) -> Iterator[tuple[Shard, Inputs, Tensor | None]]:
        """The full arrays of each file overlapping the span (used by validation)."""
        for shard, _, _ in shard_ranges(self.shards, self.span):
            yield (shard, *self._load(shard))

    def rows(self) -> Iterator[Rows]:
        """The span's rows, one block per shard, in shard order."""
        for shard, a, b in shard_ranges(self.shards, self.span):
            yield slice_rows(self._load(shard), slice(a, b))

    def batches(
        self,
        batch_size: int,
        device: torch.device | str = "cpu",
        float_dtype: torch.dtype = torch.float32,
    ) -> Iterator[Batch]:
        """Batches of at most `batch_size` examples, in shard order, within the span."""
        if batch_size <= 0:
            raise DataError(f"--batch-size must be positive, got {batch_size}")
        first = self.span[0]  # global index of the next batch's first example
        for parts in rebatch(self.rows(), batch_size):
            batch = concat_batch(parts, first, device, float_dtype)
            first += len(batch)
            yield batch

    def first(
        self,
        k: int = 2,
        device: torch.device | str = "cpu",
        float_dtype: torch.dtype = torch.float32,
    ) -> Batch:
        """The first `k` examples (for shape probing)."""
        return next(self.batches(min(k, self.n), device, float_dtype))

    def validate(self) -> None:
        """Check shards agree on keys, shapes and dtypes and hold only finite numbers
        (`gmcurv.datacheck`)."""
        check_shards((shard.path, x, y) for shard, x, y in self.shard_arrays())
