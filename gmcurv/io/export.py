"""Per-parameter exports: curvature diagonals and saliency scores as safetensors files.

Each file holds one tensor per parameter, under the parameter's own name and shape, so it
loads with ``safetensors.torch.load_file`` and lines up with ``model.state_dict()``. The
header metadata (all strings) says what the numbers are:

==================  ==========================================================
``gmcurv.kind``     ``fisher-diagonal`` | ``ggn-diagonal`` | ``hessian-diagonal``
                    | ``saliency`` — with ``.stderr`` appended in the error file
``gmcurv.N``        examples the values average over
``gmcurv.dtype``    dtype of the stored tensors
``gmcurv.version``  gmcurv version that wrote the file
``gmcurv.fisher``   Fisher type (empirical / mc / exact) where a Fisher is involved
``gmcurv.method``   how the values were obtained; further keys: probes, seed, source
==================  ==========================================================

Stochastic values (GGN / Hessian diagonals, the obd-hessian saliency) come with per-entry
standard errors in a second file ``<stem>.stderr.safetensors``. Files are written atomically;
paths are checked against the inputs before any compute (`check_export_paths`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from gmcurv import __version__
from gmcurv.errors import ConfigError
from gmcurv.io.fileio import atomic_write, ensure_not_input

SUFFIX = ".safetensors"


class Diagonal(Protocol):
    """What `save_diagonal` reads of a curvature diagonal (`gmcurv.diagonal.CurvatureDiagonal`)."""

    kind: str
    value: Mapping[str, Tensor]
    stderr: Mapping[str, Tensor] | None
    n_examples: int
    method: str
    fisher: str | None
    mc_samples: int | None
    probes: int | None
    seed: int


def stderr_path(path: str | Path) -> Path:
    """``<stem>.stderr.safetensors`` beside `path`."""
    p = Path(path)
    return p.with_name(p.name[: -len(SUFFIX)] + ".stderr" + SUFFIX)


def check_export_paths(
    path: Path, option: str, inputs: Iterable[str | Path | None], stderr: bool = False
) -> list[Path]:
    """The files an export will write (the error file too when `stderr`), refused when one
    is not a .safetensors name or would overwrite an input."""
    if path.suffix.lower() != SUFFIX:
        raise ConfigError(
            f"{option} {path}: expected a .safetensors file name",
            hint=f"e.g. {option} {path.with_suffix(SUFFIX).name}",
        )
    out = [path, stderr_path(path)] if stderr else [path]
    inputs = list(inputs)
    for p in out:
        ensure_not_input(p, inputs)
    return out


def metadata(kind: str, n: int, dtype: torch.dtype, **extra: Any) -> dict[str, str]:
    """String metadata for a safetensors header (``gmcurv.<key>``; None values left out)."""
    meta = {
        "gmcurv.kind": kind,
        "gmcurv.N": str(int(n)),
        "gmcurv.dtype": str(dtype).replace("torch.", ""),
        "gmcurv.version": __version__,
    }
    for key, value in extra.items():
        if value is not None:
            meta[f"gmcurv.{key}"] = value if isinstance(value, str) else json.dumps(value)
    return meta


def save_tensors(
    path: str | Path, tensors: Mapping[str, Tensor], meta: Mapping[str, str], dtype: torch.dtype
) -> Path:
    """Write parameter-named tensors (contiguous, on CPU, in `dtype`) atomically."""
    from safetensors.torch import save_file

    out = {k: v.detach().to(device="cpu", dtype=dtype).contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(out, str(tmp), metadata=dict(meta)))


def save_diagonal(
    path: str | Path,
    diag: Diagonal,
    dtype: torch.dtype,
    source_sha256: str | None = None,
) -> list[Path]:
    """The diagonal at `path`, and its standard errors at ``<stem>.stderr`` when stochastic."""
    extra = {
        "method": diag.method,
        "fisher": diag.fisher,
        "mc_samples": diag.mc_samples,
        "probes": diag.probes,
        "seed": diag.seed,
        "source_sha256": source_sha256,
        "normalisation": "mean over the N examples (the loss is a mean)",
    }
    kind = f"{diag.kind}-diagonal"
    written = [
        save_tensors(path, diag.value, metadata(kind, diag.n_examples, dtype, **extra), dtype)
    ]
    if diag.stderr is not None:
        meta = metadata(kind + ".stderr", diag.n_examples, dtype, **extra)
        written.append(save_tensors(stderr_path(path), diag.stderr, meta, dtype))
    return written


def save_scores(
    path: str | Path,
    scores: Mapping[str, Tensor],
    stderr: Mapping[str, Tensor] | None,
    *,
    criterion: str,
    n_examples: int,
    dtype: torch.dtype,
    fisher: str | None = None,
    **extra: Any,
) -> list[Path]:
    """Saliency scores of one criterion per prunable parameter (and their errors)."""
    meta = metadata("saliency", n_examples, dtype, criterion=criterion, fisher=fisher, **extra)
    written = [save_tensors(path, scores, meta, dtype)]
    if stderr is not None:
        meta = {**meta, "gmcurv.kind": "saliency.stderr"}
        written.append(save_tensors(stderr_path(path), stderr, meta, dtype))
    return written


def load_export(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of an exported file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    return load_file(str(path)), meta
