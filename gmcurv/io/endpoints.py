"""Loading the ``--to`` checkpoints of ``gmcurv landscape``: the parameters of other
checkpoints of the centre model's architecture, handed to the estimator as tensors
(`gmcurv.landscape.directions.checkpoint_directions` takes their differences)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from gmcurv.errors import CheckpointError, GmcurvError
from gmcurv.io.checkpoint import LoadedModel, load_model


def load_endpoints(
    paths: Sequence[str | Path],
    center: LoadedModel,
    params: Mapping[str, Tensor],
    *,
    arch: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> list[dict[str, Tensor]]:
    """The selected parameters of each ``--to`` checkpoint, checked against the centre model
    (same architecture, same parameter names and shapes)."""
    out = []
    for path in paths:
        try:
            other = load_model(path, arch=arch, loss=center.loss, dtype=dtype, device=device)
        except GmcurvError as e:
            raise type(e)(f"--to {path}: {e.message}", e.hint) from None
        if other.arch != center.arch:
            raise CheckpointError(
                f"--to {path}: architecture {other.arch} differs from MODEL's {center.arch}",
                hint="--to needs checkpoints of the same architecture as MODEL",
            )
        named = dict(other.model.named_parameters())
        bad = [
            f"{k}: {tuple(named[k].shape)} vs {tuple(p.shape)}"
            for k, p in params.items()
            if k in named and tuple(named[k].shape) != tuple(p.shape)
        ]
        missing = [k for k in params if k not in named]
        if missing or bad:
            what = f"no parameter {missing[0]}" if missing else "; ".join(bad[:3])
            raise CheckpointError(
                f"--to {path}: parameters do not match MODEL's ({what})",
                hint="--to needs checkpoints of the same architecture and shapes as MODEL",
            )
        out.append({k: named[k].detach() for k in params})
    return out
