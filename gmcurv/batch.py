"""Batches: model inputs (a tensor or a dict of tensors), targets, the first index.

``Inputs`` is a tensor ``[N, ...]`` or, Hugging Face style, a dict of such tensors passed
to the model as keyword arguments; every helper here treats both alike, row-wise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

Inputs = Tensor | dict[str, Tensor]
Rows = tuple[Inputs, Tensor | None]  # inputs and targets (None: no targets) of some rows


@dataclass(frozen=True)
class Batch:
    """A slice of the data: model inputs, targets (or None) and the first example's index."""

    inputs: Inputs
    targets: Tensor | None
    start: int

    def __len__(self) -> int:
        return batch_size_of(self.inputs)


def batch_size_of(inputs: Inputs) -> int:
    """Leading dimension of a tensor or of the first tensor in a dict."""
    if isinstance(inputs, dict):
        return int(next(iter(inputs.values())).shape[0])
    return int(inputs.shape[0])


def slice_inputs(inputs: Inputs, sl: slice) -> Inputs:
    """Rows `sl` of a tensor or of every tensor in a dict."""
    if isinstance(inputs, dict):
        return {k: v[sl] for k, v in inputs.items()}
    return inputs[sl]


def slice_rows(rows: Rows, sl: slice) -> Rows:
    """Rows `sl` of inputs and targets."""
    inputs, targets = rows
    return slice_inputs(inputs, sl), None if targets is None else targets[sl]


def move_inputs(inputs: Inputs, device: torch.device | str, float_dtype: torch.dtype) -> Inputs:
    """Move to device; floating tensors take the compute dtype, integer ones stay integer."""

    def move(t: Tensor) -> Tensor:
        return t.to(device=device, dtype=float_dtype if t.is_floating_point() else t.dtype)

    if isinstance(inputs, dict):
        return {k: move(v) for k, v in inputs.items()}
    return move(inputs)


def concat_batch(
    parts: list[Rows], start: int, device: torch.device | str, float_dtype: torch.dtype
) -> Batch:
    """One `Batch` from consecutive row blocks, moved to `device` (`move_inputs`)."""
    xs = [p[0] for p in parts]
    if isinstance(xs[0], dict):
        inputs: Inputs = {k: torch.cat([x[k] for x in xs]) for k in xs[0]}
    else:
        inputs = torch.cat(xs)
    ys = [p[1] for p in parts]
    targets = None if ys[0] is None else torch.cat(ys).to(device)
    return Batch(move_inputs(inputs, device, float_dtype), targets, start)


def rebatch(blocks: Iterable[Rows], batch_size: int) -> Iterator[list[Rows]]:
    """Cut a stream of row blocks into groups of exactly `batch_size` rows (the last group
    may be shorter); a block may be split across groups."""
    pending: list[Rows] = []
    pending_n = 0
    for rows in blocks:
        m, pos = batch_size_of(rows[0]), 0
        while pos < m:
            step = min(batch_size - pending_n, m - pos)
            pending.append(slice_rows(rows, slice(pos, pos + step)))
            pending_n += step
            pos += step
            if pending_n == batch_size:
                yield pending
                pending, pending_n = [], 0
    if pending:
        yield pending


def n_batches(n: int, batch_size: int) -> int:
    """How many batches of at most `batch_size` examples `n` examples make."""
    return math.ceil(n / batch_size)
