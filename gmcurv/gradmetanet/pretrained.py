"""The shipped head file: ``sample_models/gradmetanet_head.safetensors`` and its card.

The file holds the network's weights and, in the safetensors header (key ``gmcurv_head``),
a JSON document (see `gmcurv.gradmetanet.head`). Reading and writing it is a workflow on
top of the estimators (like ``gmcurv head``): `--method learned` gets the loaded head
handed in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gmcurv.errors import CheckpointError
from gmcurv.gradmetanet.head import META_KEY, LoadedHead, head_from_state, head_state
from gmcurv.gradmetanet.model import GradMetaNet
from gmcurv.io.samples import SAMPLE_ROOT

HEAD_FILE = SAMPLE_ROOT / "gradmetanet_head.safetensors"
CARD_FILE = SAMPLE_ROOT / "GRADMETANET_HEAD_CARD.md"


def save_head(path: Path, model: GradMetaNet, meta: dict[str, Any]) -> None:
    """Atomic write of weights + metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = head_state(model)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta, sort_keys=True)})
    tmp.replace(path)


def read_head_metadata(path: Path | None = None) -> dict[str, Any]:
    path = Path(path) if path is not None else HEAD_FILE
    _exists(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if META_KEY not in meta:
        raise CheckpointError(
            f"{path}: not a GradMetaNet head (no '{META_KEY}' metadata)",
            hint="pass a file written by gmcurv head train",
        )
    return json.loads(meta[META_KEY])


def _exists(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(
            f"{path}: no GradMetaNet head there",
            hint="train one with gmcurv head zoo && gmcurv head train, or omit --head for the "
            "shipped one",
        )


def load_head(path: Path | None = None, dtype: torch.dtype = torch.float32) -> LoadedHead:
    """Load a head (default: the shipped one)."""
    path = Path(path) if path is not None else HEAD_FILE
    meta = read_head_metadata(path)
    with safe_open(str(path), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return head_from_state(state, meta, path, dtype)
