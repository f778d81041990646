"""Pruning masks in a sidecar file, so pruned checkpoints stay plain state dicts.

A pruned checkpoint ``<name>.safetensors`` holds exactly the model's entries (a strict
``model.load_state_dict(load_file(path))`` accepts it); its keep-masks (bool, 1 = kept, as
in ``torch.nn.utils.prune``) go to ``<name>.masks.safetensors`` beside it, keyed by the
checkpoint's entry names. The checkpoint's metadata names the sidecar (``gmcurv.masks``)
and the sidecar records the SHA-256 of the checkpoint it belongs to
(``gmcurv.masks_for``), so a sidecar left over from another file is never applied.
Checkpoints from earlier gmcurv versions keep their masks inside, under ``gmcurv_mask.``;
they still load.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from gmcurv.errors import CheckpointError, GmcurvWarning
from gmcurv.io.fileio import atomic_write
from gmcurv.io.tensors import load_tensors

MASKS_SUFFIX = ".masks.safetensors"
META_MASKS = "gmcurv.masks"  # in the checkpoint: the sidecar's file name
META_MASKS_FOR = "gmcurv.masks_for"  # in the sidecar: SHA-256 of its checkpoint


def masks_path(checkpoint: str | Path) -> Path:
    """``<name>.masks.safetensors`` beside ``<name>.safetensors``."""
    path = Path(checkpoint)
    name = path.name
    stem = name[: -len(".safetensors")] if name.endswith(".safetensors") else name
    return path.with_name(stem + MASKS_SUFFIX)


def is_masks_file(path: Path) -> bool:
    return path.name.endswith(MASKS_SUFFIX)


def _sidecar_owner(path: Path) -> str | None:
    """The checkpoint SHA-256 a gmcurv sidecar records (None: not a gmcurv sidecar)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(META_MASKS_FOR)
    except Exception:
        return None


def write_masks(checkpoint: Path, checkpoint_sha256: str, masks: Mapping[str, Tensor]) -> Path:
    """Write `masks` atomically to the checkpoint's sidecar, tagged with its SHA-256."""
    tensors = {k: m.detach().bool().contiguous().cpu() for k, m in masks.items()}
    meta = {META_MASKS_FOR: checkpoint_sha256}
    return atomic_write(
        masks_path(checkpoint), lambda tmp: save_file(tensors, str(tmp), metadata=meta)
    )


def remove_stale_masks(checkpoint: Path) -> None:
    """Delete a gmcurv sidecar left beside a checkpoint just rewritten without masks."""
    side = masks_path(checkpoint)
    if side.is_file() and _sidecar_owner(side) is not None:
        side.unlink()


def read_masks(
    checkpoint: Path,
    sha256: str,
    metadata: Mapping[str, str],
    shapes: Mapping[str, tuple[int, ...]],
) -> dict[str, Tensor]:
    """The sidecar's masks for `checkpoint` (empty when there is none).

    A sidecar recorded for another file is ignored with a warning, as is a missing sidecar
    the checkpoint names; one whose keys or shapes do not fit the checkpoint is an error.
    """
    side = masks_path(checkpoint)
    if not side.is_file():
        if META_MASKS in metadata:
            warnings.warn(
                f"{checkpoint}: its pruning masks file {side.name} is missing; the weights "
                "load, but which ones were pruned is unknown (pruned weights count as zeros)",
                GmcurvWarning,
                stacklevel=3,
            )
        return {}
    owner = _sidecar_owner(side)
    if owner != sha256:
        warnings.warn(
            f"{side}: ignored: these pruning masks were written for another version of "
            f"{checkpoint.name}",
            GmcurvWarning,
            stacklevel=3,
        )
        return {}
    masks = load_tensors(side)
    for key, m in masks.items():
        if key not in shapes or tuple(m.shape) != tuple(shapes[key]):
            raise CheckpointError(
                f"{side}: mask {key!r} {tuple(m.shape)} does not fit {checkpoint.name} "
                f"({'no such entry' if key not in shapes else tuple(shapes[key])})",
                hint=f"delete {side.name} (it belongs to another checkpoint)",
            )
    return {k: m.bool() for k, m in masks.items()}
