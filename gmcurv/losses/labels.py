"""Checks that class labels fit a classifier's outputs."""

from __future__ import annotations

import torch
from torch import Tensor

from gmcurv.errors import DataError
from gmcurv.losses.base import IGNORE_INDEX


def check_labels(outputs_shape: torch.Size, targets: Tensor | None, source: str, loss: str) -> None:
    """Integer labels of shape ``outputs_shape[:-1]`` in ``0..C-1`` (or ``-100``: ignored);
    `DataError` naming `source` otherwise."""
    if targets is None:
        raise DataError(
            f"{source}: no targets found, but the loss {loss} needs them",
            hint="store class labels under 'targets' (or 'y' / 'labels')",
        )
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise DataError(
            f"{source}: targets have dtype {targets.dtype}, but {loss} needs integer class labels",
            hint="store labels as int64, or use --loss mse for real-valued targets",
        )
    expected = outputs_shape[:-1]
    if targets.shape != expected:
        raise DataError(
            f"{source}: targets have shape {tuple(targets.shape)}, but the model's outputs "
            f"{tuple(outputs_shape)} need targets of shape {tuple(expected)}",
            hint="one class index per example (per token for sequence outputs)",
        )
    n_classes = outputs_shape[-1]
    valid = targets[targets != IGNORE_INDEX]
    if valid.numel():
        lo, hi = int(valid.min()), int(valid.max())
        if lo < 0 or hi >= n_classes:
            raise DataError(
                f"{source}: labels range over [{lo}, {hi}], but the model has {n_classes} "
                f"classes (valid labels are 0..{n_classes - 1}, or {IGNORE_INDEX} to ignore)",
                hint="check that the data belongs to this model, or remap the labels",
            )
