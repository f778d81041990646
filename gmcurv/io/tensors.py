"""Safetensors files: headers, sharded indexes and tensors, validated before use.

`read_header` parses the 8-byte length and the JSON header without loading tensor data and
refuses truncated, overlapping or inconsistent files; a sharded Hugging Face checkpoint
(``model.safetensors.index.json``) reads as one `Header` merged over its shards.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor

from gmcurv.errors import CheckpointError
from gmcurv.io.fileio import sha256_file
from gmcurv.io.metadata import validate_metadata

INDEX_NAME = "model.safetensors.index.json"
MASK_PREFIX = "gmcurv_mask."  # legacy: pruning masks stored inside the checkpoint

_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


@dataclass(frozen=True)
class Header:
    """What a safetensors file declares, read without loading tensor data."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    metadata: dict[str, str]

    @property
    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the model's tensors (pruning masks left out)."""
        return {k: s for k, s in self.shapes.items() if not k.startswith(MASK_PREFIX)}


def read_header(path: str | Path) -> Header:
    """Parse and validate a safetensors header; detects truncated and corrupt files."""
    path = Path(path)
    fix = "re-download or re-export the checkpoint; the file is damaged"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: file is too short to be a safetensors file", fix)
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(
                    f"{path}: not a safetensors file or truncated "
                    f"(header claims {n} bytes, file has {size})",
                    fix,
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read file: {e.strerror}") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (invalid JSON)", fix) from None
    metadata = validate_metadata(path, header.pop("__metadata__", None))
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        try:
            shape = tuple(int(s) for s in info["shape"])
            dtype = str(info["dtype"])
            start, stop = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt entry for tensor {name!r}", fix) from None
        if dtype not in _DTYPE_BYTES:
            raise CheckpointError(
                f"{path}: tensor {name!r} has unknown dtype {dtype!r}",
                f"safetensors dtypes are {', '.join(_DTYPE_BYTES)}; {fix}",
            )
        if any(s < 0 for s in shape) or not 0 <= start <= stop:
            raise CheckpointError(f"{path}: tensor {name!r} has a negative shape or offset", fix)
        numel = math.prod(shape)
        if stop - start != numel * _DTYPE_BYTES[dtype]:
            raise CheckpointError(
                f"{path}: tensor {name!r} has inconsistent byte size (shape {list(shape)} "
                f"{dtype} needs {numel * _DTYPE_BYTES[dtype]} bytes, offsets span {stop - start})",
                fix,
            )
        shapes[name], dtypes[name] = shape, dtype
        spans.append((start, stop, name))
    spans.sort()
    for (_, stop_a, a), (start_b, _, b) in itertools.pairwise(spans):
        if start_b < stop_a:
            raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap in the file", fix)
    end = max((stop for _, stop, _ in spans), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: file is truncated: the header declares {8 + n + end} bytes, "
            f"the file has {size}",
            fix,
        )
    return Header(path, shapes, dtypes, metadata)


def is_index(path: str | Path) -> bool:
    """Is `path` a sharded checkpoint's ``*.safetensors.index.json``?"""
    return str(path).endswith(".index.json")


def index_shards(path: Path) -> dict[str, Path]:
    """``{tensor name: shard path}`` of a sharded checkpoint's index, validated."""
    fix = "re-export the checkpoint with save_pretrained"
    try:
        index = json.loads(path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError("empty weight_map")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors index ({e})", fix) from None
    shards = {}
    for name, shard in weight_map.items():
        if (
            not isinstance(shard, str)
            or Path(shard).name != shard
            or not shard.endswith(".safetensors")
        ):
            raise CheckpointError(
                f"{path}: tensor {name!r} maps to {shard!r}, not a .safetensors file in the "
                "same directory",
                fix,
            )
        shards[str(name)] = path.parent / shard
    missing = sorted({p.name for p in shards.values() if not p.is_file()})
    if missing:
        raise CheckpointError(
            f"{path}: shard(s) {', '.join(missing[:4])} listed in the index are missing",
            hint="copy every model-*.safetensors shard next to the index",
        )
    return shards


def read_weights_header(path: str | Path) -> Header:
    """`read_header` of a file, or of every shard of an index merged into one `Header`."""
    path = Path(path)
    if not is_index(path):
        return read_header(path)
    shards = index_shards(path)
    headers = {p: read_header(p) for p in sorted(set(shards.values()))}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for name, shard in shards.items():
        h = headers[shard]
        if name not in h.shapes:
            raise CheckpointError(
                f"{path}: tensor {name!r} is not in its shard {shard.name}",
                hint="re-export the checkpoint with save_pretrained",
            )
        shapes[name], dtypes[name] = h.shapes[name], h.dtypes[name]
    metadata: dict[str, str] = {}
    for h in headers.values():
        metadata.update(h.metadata)
    return Header(path, shapes, dtypes, metadata)


def weights_sha256(path: str | Path) -> str:
    """SHA-256 of the weights: of the file, or of the index followed by its shards' digests."""
    path = Path(path)
    if not is_index(path):
        return sha256_file(path)
    digest = hashlib.sha256(path.read_bytes())
    for shard in sorted(set(index_shards(path).values())):
        digest.update(sha256_file(shard).encode())
    return digest.hexdigest()


def load_tensors(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a validated safetensors file, or of a sharded index (on CPU)."""
    if is_index(path):
        header = read_weights_header(path)
        tensors: dict[str, Tensor] = {}
        for shard in sorted(set(index_shards(Path(path)).values())):
            tensors.update(load_tensors(shard))
        return {k: tensors[k] for k in header.shapes}
    read_header(path)
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type
        raise CheckpointError(f"{path}: cannot load tensors: {e}") from None
