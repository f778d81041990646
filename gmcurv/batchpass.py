"""Passes over a data sample in a fixed, checked order.

Matrix-free products sum over batches, so every pass must see the same batches in the same
order: the first pass records a fingerprint per position (start index, size, order-sensitive
checksums) and keeps the batches in memory when the sample fits in `cache_bytes`; later
passes replay the cache or re-read the files and compare fingerprints (`DataError` naming
the first difference).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gmcurv.batch import Batch, concat_batch
from gmcurv.data import DataSample
from gmcurv.errors import DataError

DEFAULT_CACHE_BYTES = 256 * 2**20  # keep the data sample in memory up to this size


def _checksum(t: Tensor | dict[str, Tensor] | None) -> float:
    """Order-sensitive checksum of a batch's rows (``Σ_i (i+1) rowsum_i``)."""
    if t is None:
        return 0.0
    if isinstance(t, dict):
        return sum(_checksum(v) for v in t.values())
    rows = t.detach().reshape(t.shape[0], -1).double().sum(1)
    weights = torch.arange(1, rows.numel() + 1, dtype=torch.float64, device=rows.device)
    return float((rows * weights).sum())


def fingerprint(batch: Batch) -> tuple[int, int, float, float]:
    """What identifies a batch across passes: start index, size, input and target checksums."""
    return (batch.start, len(batch), _checksum(batch.inputs), _checksum(batch.targets))


def batch_nbytes(batch: Batch) -> int:
    """Bytes of a batch's inputs and targets."""
    parts = list(batch.inputs.values()) if isinstance(batch.inputs, dict) else [batch.inputs]
    if batch.targets is not None:
        parts.append(batch.targets)
    return sum(t.numel() * t.element_size() for t in parts)


@dataclass
class FixedBatches:
    """The batches of `data` in one fixed order, pass after pass."""

    data: DataSample
    batch_size: int
    device: torch.device
    dtype: torch.dtype
    cache_bytes: int = DEFAULT_CACHE_BYTES
    cached: list[Batch] | None = field(default=None, repr=False)
    prints: list[tuple] | None = field(default=None, repr=False)

    @property
    def reusable(self) -> bool:
        """Whether per-batch results may be kept: the batches are cached, or this is the
        first pass (whose batches define the order)."""
        return self.cached is not None or self.prints is None

    def __iter__(self) -> Iterator[Batch]:
        if self.cached is not None:
            yield from self.cached
            return
        first_pass = self.prints is None
        prints: list[tuple] = []
        kept: list[Batch] | None = []
        held = 0
        for i, batch in enumerate(self.data.batches(self.batch_size, self.device, self.dtype)):
            fp = fingerprint(batch)
            prints.append(fp)
            if first_pass:
                if kept is not None:
                    held += batch_nbytes(batch)
                    kept = [*kept, batch] if held <= self.cache_bytes else None
            elif i >= len(self.prints) or self.prints[i] != fp:  # type: ignore[arg-type]
                raise self._order_error(f"batch {i}, starting at example {batch.start}")
            yield batch
        if first_pass:
            self.prints, self.cached = prints, kept
        elif len(prints) != len(self.prints):  # type: ignore[arg-type]
            raise self._order_error("the number of batches")

    def merge(self) -> bool:
        """Make the cached batches one (rows in order), for passes with fewer, larger
        kernels; False when nothing is cached or there is one batch."""
        if self.cached is None or len(self.cached) < 2:
            return False
        first = self.cached[0]
        rows = [(b.inputs, b.targets) for b in self.cached]
        merged = concat_batch(rows, first.start, self.device, self.dtype)
        self.cached, self.prints = [merged], [fingerprint(merged)]
        return True

    def _order_error(self, what: str) -> DataError:
        return DataError(
            f"{self.data.path}: the data changed between passes ({what} differs from the "
            "first pass)",
            hint="curvature products need the same batches in the same order on every pass: "
            "do not shuffle, and keep the files unchanged while gmcurv runs",
        )
