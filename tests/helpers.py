"""Writing small checkpoints and data samples for tests."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from gmcurv.io.checkpoint import gmcurv_metadata, save_checkpoint


def write_mlp(
    path: Path, sizes=(6, 8, 3), activation="tanh", seed=0, metadata=True, prefix="net"
) -> Path:
    torch.manual_seed(seed)
    state = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        state[f"{prefix}.{2 * i}.weight"] = torch.randn(b, a) / a**0.5
        state[f"{prefix}.{2 * i}.bias"] = torch.randn(b) * 0.1
    meta = gmcurv_metadata(f"mlp:{activation}", "cross_entropy") if metadata else {}
    save_checkpoint(path, state, meta)
    return path


def write_data(path: Path, n=40, d=6, classes=3, seed=0, shards=1, fmt="safetensors") -> Path:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    if shards == 1 and fmt != "npy":
        _write_one(path, x, y, fmt)
        return path
    path.mkdir(parents=True, exist_ok=True)
    if fmt == "npy":
        np.save(path / "inputs.npy", x.numpy())
        np.save(path / "targets.npy", y.numpy())
        return path
    bounds = np.linspace(0, n, shards + 1).astype(int)
    for i in range(shards):
        _write_one(
            path / f"part-{i}.{fmt}",
            x[bounds[i] : bounds[i + 1]],
            y[bounds[i] : bounds[i + 1]],
            fmt,
        )
    return path


def _write_one(path: Path, x, y, fmt):
    if fmt == "safetensors":
        save_file({"inputs": x.contiguous(), "targets": y.contiguous()}, str(path))
    elif fmt == "npz":
        np.savez(path, x=x.numpy(), y=y.numpy())
    elif fmt == "csv":
        rows = np.concatenate([x.numpy(), y.numpy()[:, None]], axis=1)
        header = ",".join([f"f{i}" for i in range(x.shape[1])] + ["label"])
        np.savetxt(path, rows, delimiter=",", header=header, comments="")
    else:  # pragma: no cover
        raise ValueError(fmt)
