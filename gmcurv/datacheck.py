"""Checks on a data sample's arrays: one row per example, real and finite values, and the
same keys, trailing shapes and dtype kinds in every shard."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from gmcurv.batch import Inputs, batch_size_of
from gmcurv.errors import DataError

Signature = dict[str, tuple[tuple[int, ...], torch.dtype]]


def shard_signature(path: Path, inputs: Inputs, targets: Tensor | None) -> Signature:
    """``{name: (trailing shape, dtype)}`` of one shard's arrays, each checked to hold one
    row per example and only finite real numbers."""
    arrays = dict(inputs) if isinstance(inputs, dict) else {"inputs": inputs}
    if targets is not None:
        arrays["targets"] = targets
    n = batch_size_of(inputs)
    sig = {}
    for name, arr in arrays.items():
        if arr.ndim == 0 or arr.shape[0] != n:
            raise DataError(
                f"{path}: {name!r} has {arr.shape[0] if arr.ndim else 0} rows but "
                f"the inputs have {n}",
                hint="every array in a shard needs one row per example",
            )
        if arr.is_complex():
            raise DataError(f"{path}: {name!r} is complex; only real data works")
        if arr.is_floating_point() and not torch.isfinite(arr).all():
            bad = (~torch.isfinite(arr)).reshape(n, -1).any(1).nonzero()[0, 0]
            count = int((~torch.isfinite(arr)).reshape(n, -1).any(1).sum())
            raise DataError(
                f"{path}: {name!r} contains NaN or Inf in {count} example(s), "
                f"first at example {int(bad)}",
                hint="clean or drop those examples before analysing curvature",
            )
        sig[name] = (tuple(arr.shape[1:]), arr.dtype)
    return sig


def check_shards(shards: Iterable[tuple[Path, Inputs, Tensor | None]]) -> None:
    """`shard_signature` of every shard, all equal to the first one's."""
    ref: Signature | None = None
    for path, inputs, targets in shards:
        sig = shard_signature(path, inputs, targets)
        if ref is None:
            ref = sig
        elif sig.keys() != ref.keys() or any(
            sig[k][0] != ref[k][0] or sig[k][1].is_floating_point != ref[k][1].is_floating_point
            for k in sig
        ):
            got = {k: v[0] for k, v in sig.items()}
            want = {k: v[0] for k, v in ref.items()}
            raise DataError(
                f"{path}: shard does not match the first shard ({got} vs {want})",
                hint="all shards need the same keys, trailing shapes and dtypes",
            )
