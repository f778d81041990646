"""Checkpoints: safetensors in and out, architecture resolution, model building.

Where the architecture comes from, first match wins:

1. ``--arch`` when given explicitly (an explicit request beats anything implicit):
   ``mlp:activation`` (layers inferred from ``<layer>.weight``/``.bias`` shapes; the
   activation must be named, here or in the checkpoint's metadata),
   ``path/to/file.py:factory`` or ``package.module:factory`` returning an ``nn.Module``;
2. gmcurv metadata in the safetensors header (``gmcurv.arch``, ``gmcurv.arch_config``,
   ``gmcurv.loss``), written by gmcurv itself (sample models, pruned checkpoints);
3. a Hugging Face ``config.json`` beside the weights, built by `transformers`
   (`gmcurv.models.hf`; the model names itself by a family spec, ``arch_spec``, e.g.
   ``hf:GPT2LMHeadModel``, and carries the config, ``arch_config``, which checkpoints
   gmcurv writes from it record).

Weights are one ``.safetensors`` file or a sharded Hugging Face checkpoint
(``model.safetensors.index.json`` naming the shard of every tensor, all in one directory).

Weights load with ``safetensors.torch.load_model`` semantics: tied parameters need only one
of their names in the file; any other missing key, any unexpected key and any shape
mismatch is an error naming the file. Pruning masks live in a sidecar file
(`gmcurv.masks`; older files hold them under the reserved ``gmcurv_mask.`` prefix), returned
separately. A model may declare entries
to ignore (``ignored_checkpoint_keys``) and entries other tools store transposed
(``checkpoint_transposed_keys()``, read transposed from files without gmcurv metadata).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import itertools
import json
import math
import re
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from gmcurv import __version__
from gmcurv.errors import ArchitectureError, CheckpointError, GmcurvError
from gmcurv.fileio import atomic_write, sha256_file
from gmcurv.masks import (
    MASK_PREFIX,
    META_MASKS,
    is_masks_file,
    masks_path,
    read_masks,
    remove_stale_masks,
    write_masks,
)
from gmcurv.metadata import validate_metadata
from gmcurv.models.hf import hf_state_keys, is_hf_model
from gmcurv.models.registry import build_family, build_from_hf_config, family_loss

META_ARCH = "gmcurv.arch"
META_ARCH_CONFIG = "gmcurv.arch_config"
META_LOSS = "gmcurv.loss"
META_VERSION = "gmcurv.version"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_LOSS_SOURCE = "built-in default (no --loss, checkpoint metadata or config.json names one)"
PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"}

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


@dataclass
class LoadedModel:
    """A model built and loaded from a checkpoint, with where everything came from."""

    model: nn.Module
    path: Path
    sha256: str
    arch: str
    arch_source: str
    loss: str
    metadata: dict[str, str]
    masks: dict[str, Tensor] = field(default_factory=dict)
    key_map: dict[str, str] = field(default_factory=dict)  # file name -> model state name
    loss_source: str = "--loss"  # where `loss` came from (see `loss_source`)

    @property
    def n_params(self) -> int:
        """Number of distinct parameters (tied tensors counted once)."""
        return sum(p.numel() for p in self.model.parameters())


# ------------------------------------------------------------------------------ reading files
def resolve_weights_path(model_path: str | Path) -> Path:
    """The ``.safetensors`` file behind MODEL (a file, or a directory holding one)."""
    path = Path(model_path).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"{path}: no such file or directory",
            hint="pass the path of a .safetensors checkpoint (or a directory holding one)",
        )
    if path.is_dir():
        preferred = path / "model.safetensors"
        if preferred.is_file():
            return preferred
        if (path / INDEX_NAME).is_file():
            return path / INDEX_NAME
        found = sorted(p for p in path.glob("*.safetensors") if not is_masks_file(p))
        if len(found) == 1:
            return found[0]
        if not found:
            raise CheckpointError(
                f"{path}: directory holds no .safetensors file",
                hint="point MODEL at a .safetensors file or a directory with model.safetensors",
            )
        raise CheckpointError(
            f"{path}: directory holds several .safetensors files "
            f"({', '.join(p.name for p in found[:4])})",
            hint="point MODEL at one of them, or name it model.safetensors",
        )
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: pickle-based checkpoints are refused (loading one can run arbitrary code)",
            hint="convert it once with safetensors.torch.save_file(model.state_dict(), "
            "'model.safetensors')",
        )
    return path


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


def _index_shards(path: Path) -> dict[str, Path]:
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
    shards = _index_shards(path)
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
    for shard in sorted(set(_index_shards(path).values())):
        digest.update(sha256_file(shard).encode())
    return digest.hexdigest()


def load_tensors(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a validated safetensors file, or of a sharded index (on CPU)."""
    if is_index(path):
        header = read_weights_header(path)
        tensors: dict[str, Tensor] = {}
        for shard in sorted(set(_index_shards(Path(path)).values())):
            tensors.update(load_tensors(shard))
        return {k: tensors[k] for k in header.shapes}
    read_header(path)
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type
        raise CheckpointError(f"{path}: cannot load tensors: {e}") from None


# ------------------------------------------------------------------------ building the model
def _load_hf_config(weights: Path) -> dict[str, Any] | None:
    cfg = weights.parent / "config.json"
    if not cfg.is_file():
        return None
    try:
        config = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{cfg}: cannot parse config.json: {e}", hint="fix or remove the file"
        ) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg}: config.json is not a JSON object", hint="fix the file")
    return config


def _import_factory(
    spec: str,
    option: str = "--arch",
    returns: str = "an nn.Module",
    usage: str = "use mlp:<activation>, path/to/model.py:factory or package.module:factory",
):
    """Resolve ``path/to/file.py:name`` or ``package.module:name`` to a callable.

    `option`, `returns` and `usage` only shape the error messages (``--arch``, ``--loss``).
    """
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ArchitectureError(
            f"{option} {spec!r} is neither a built-in name nor a factory", hint=usage
        )
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    try:
        if is_file:
            file = Path(target).expanduser()
            if not file.is_file():
                raise ArchitectureError(
                    f"{option} {spec!r}: file {file} not found", hint="check the path"
                )
            mod_name = f"gmcurv_user_{abs(hash(str(file.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(mod_name, file)
            if module_spec is None or module_spec.loader is None:
                raise ArchitectureError(f"{option} {spec!r}: cannot import {file}")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[mod_name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ArchitectureError:
        raise
    except Exception as e:
        raise ArchitectureError(
            f"{option} {spec!r}: importing {target} failed: {type(e).__name__}: {e}",
            hint="fix the error in that module (run it with python to see the traceback)",
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ArchitectureError(
            f"{option} {spec!r}: {target} has no callable {attr!r}",
            hint=f"name a function or class in that module that returns {returns}",
        )
    return factory


def build_from_factory(spec: str) -> nn.Module:
    """Call a user factory and check that it returns an ``nn.Module``."""
    factory = _import_factory(spec)
    try:
        model = factory()
    except Exception as e:
        raise ArchitectureError(
            f"--arch {spec!r}: the factory raised {type(e).__name__}: {e}",
            hint="the factory is called with no arguments and must return an nn.Module",
        ) from None
    if not isinstance(model, nn.Module):
        raise ArchitectureError(
            f"--arch {spec!r}: the factory returned {type(model).__name__}, not an nn.Module",
            hint="return the model instance from the factory",
        )
    return model


def _is_family_spec(spec: str) -> bool:
    """``mlp``, ``mlp:tanh`` (a registered family), or any bare name (reported as unknown)."""
    from gmcurv.models.registry import FAMILIES

    head, sep, _ = spec.partition(":")
    return head in FAMILIES or (not sep and not spec.endswith(".py") and "/" not in spec)


def _with_metadata_option(spec: str, meta: Mapping[str, str]) -> str:
    """A bare ``--arch family`` completed by the checkpoint's own ``family:option``
    metadata (``--arch mlp`` on a file whose metadata says ``mlp:tanh`` -> ``mlp:tanh``)."""
    recorded = meta.get(META_ARCH, "")
    if ":" not in spec and recorded.partition(":")[0] == spec and recorded.partition(":")[2]:
        return recorded
    return spec


def build_model(header: Header, arch: str | None) -> tuple[nn.Module, str, str, str | None]:
    """Build the (untrained) model for a checkpoint: (model, arch, arch source, loss hint)."""
    source = str(header.path)
    shapes = header.weight_shapes
    meta = header.metadata
    meta_config = json.loads(meta[META_ARCH_CONFIG]) if META_ARCH_CONFIG in meta else None
    if arch:
        if _is_family_spec(arch):
            arch = _with_metadata_option(arch, meta)
            if arch.partition(":")[0] == "hf" and meta_config is None:
                meta_config = _load_hf_config(header.path)
            model = build_family(arch, shapes, source, meta_config)
            loss = meta.get(META_LOSS) or family_loss(arch) or getattr(model, "arch_loss", None)
            return model, arch, "--arch", loss
        return build_from_factory(arch), arch, "--arch", None
    if META_ARCH in meta:
        spec = meta[META_ARCH]
        if spec.partition(":")[0] == "hf" and meta_config is None:
            meta_config = _load_hf_config(header.path)
        return (
            build_family(spec, shapes, source, meta_config),
            spec,
            "metadata",
            meta.get(META_LOSS) or family_loss(spec),
        )
    config = _load_hf_config(header.path)
    if config is not None:
        model, loss = _build_from_config(config, header.path.parent / "config.json", shapes, source)
        # a family spec that rebuilds the model without config.json (e.g. gpt2:n_head=12)
        name = getattr(model, "arch_spec", None) or str(config.get("model_type"))
        return model, name, "config.json", loss
    raise ArchitectureError(
        f"{source}: cannot tell the architecture: no gmcurv metadata and no config.json beside it",
        hint="pass --arch mlp:<activation> (relu|tanh|gelu|...) for a plain MLP, "
        "or --arch path/to/model.py:factory",
    )


def _build_from_config(config: dict[str, Any], path: Path, shapes, source: str):
    """`build_from_hf_config`, with any failure reported as bad input naming config.json."""
    try:
        return build_from_hf_config(config, shapes, source)
    except ArchitectureError as e:
        if str(path) in e.message or source in e.message:
            raise
        raise ArchitectureError(f"{path}: {e.message}", hint=e.hint) from None
    except GmcurvError:
        raise
    except Exception as e:
        raise ArchitectureError(
            f"{path}: cannot build the model from config.json: {type(e).__name__}: {e}",
            hint="check the values in config.json (types, and e.g. that n_head divides n_embd)",
        ) from None


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """Names of state-dict entries that share storage (tied weights)."""
    groups: dict[tuple[int, int, tuple[int, ...]], list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        groups.setdefault(key, []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def load_state(model: nn.Module, tensors: Mapping[str, Tensor], source: str) -> None:
    """Copy `tensors` into `model`, strictly (tied names may be absent), with clear errors."""
    expected = model.state_dict()
    tied = _tied_groups(model)
    alias = {n: g for g in tied for n in g}
    missing = [
        k for k in expected if k not in tensors and not any(a in tensors for a in alias.get(k, []))
    ]
    unexpected = [k for k in tensors if k not in expected]
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in tensors.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        problems.append(
            f"unexpected keys {unexpected[:5]}" + (" ..." if len(unexpected) > 5 else "")
        )
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched[:5]))
    if problems:
        raise CheckpointError(
            f"{source}: checkpoint does not fit the architecture: " + "; ".join(problems),
            hint="check that --arch (or the config.json) matches the checkpoint",
        )
    with torch.no_grad():
        for name, value in tensors.items():
            target = expected[name]
            if value.is_floating_point() != target.is_floating_point():
                raise CheckpointError(
                    f"{source}: tensor {name} has dtype {value.dtype}, the model expects "
                    f"{target.dtype}",
                    hint="re-export the checkpoint with matching dtypes",
                )
            target.copy_(value)


def drop_ignored_keys(model: nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Leave out entries the model declares as not its own (``ignored_checkpoint_keys``:
    regular expressions, e.g. GPT-2's legacy attention-mask buffers ``h.0.attn.bias``)."""
    patterns = [re.compile(p) for p in getattr(model, "ignored_checkpoint_keys", ())]
    expected = model.state_dict().keys()
    return {
        k: v for k, v in state.items() if k in expected or not any(p.search(k) for p in patterns)
    }


def from_foreign_layout(
    model: nn.Module, state: Mapping[str, Tensor], metadata: Mapping[str, str]
) -> dict[str, Tensor]:
    """Transpose the entries a model says other tools store transposed
    (``checkpoint_transposed_keys()``, e.g. Hugging Face ``Conv1D`` weights ``[in, out]``),
    for files not written by gmcurv (no ``gmcurv.arch`` metadata). gmcurv writes parameters
    as they are in the model."""
    keys = getattr(model, "checkpoint_transposed_keys", None)
    if META_ARCH in metadata or keys is None:
        return dict(state)
    transposed = set(keys())
    return {k: v.t() if k in transposed and v.ndim == 2 else v for k, v in state.items()}


def load_model(
    model_path: str | Path,
    arch: str | None = None,
    loss: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Resolve, build and load a model from MODEL (file or directory)."""
    weights = resolve_weights_path(model_path)
    header = read_weights_header(weights)
    model, arch_name, arch_source, loss_hint = build_model(header, arch)
    tensors = load_tensors(weights)
    masks = {k[len(MASK_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MASK_PREFIX)}
    state = {k: v for k, v in tensors.items() if not k.startswith(MASK_PREFIX)}
    key_map = {k: k for k in state}
    if is_hf_model(model):  # the library's names: bare-model prefix, legacy buffers
        key_map = hf_state_keys(model, state)
        state = {key_map[k]: state[k] for k in key_map}
        masks = {key_map.get(k, k): m for k, m in masks.items()}
    state = drop_ignored_keys(model, state)
    state = from_foreign_layout(model, state, header.metadata)
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(
                f"{weights}: tensor {k} contains NaN or Inf values",
                hint="the checkpoint is damaged or training diverged; use an earlier checkpoint",
            )
    load_state(model, state, str(weights))
    model.to(device=device, dtype=dtype)
    sha = weights_sha256(weights)
    if not masks:  # current layout: a sidecar file beside the checkpoint
        masks = read_masks(weights, sha, header.metadata, header.weight_shapes)
        masks = {key_map.get(k, k): m for k, m in masks.items()}
    return LoadedModel(
        model=model,
        path=weights,
        sha256=sha,
        arch=arch_name,
        arch_source=arch_source,
        loss=loss or loss_hint or "cross_entropy",
        metadata=header.metadata,
        masks=masks,
        key_map=key_map,
        loss_source=loss_source(loss, loss_hint, arch_name, arch_source, header.metadata),
    )


def loss_source(
    given: str | None, hint: str | None, arch: str, arch_source: str, metadata: Mapping[str, str]
) -> str:
    """Why the loss is what it is: ``--loss``, the checkpoint's metadata, config.json, the
    architecture family's default, or the built-in default (cross-entropy)."""
    if given:
        return "--loss"
    if hint is None:
        return DEFAULT_LOSS_SOURCE
    if META_LOSS in metadata and hint == metadata[META_LOSS]:
        return f"checkpoint metadata ({META_LOSS})"
    if arch_source == "config.json":
        return f"config.json ({arch}: the library's loss for this head)"
    return f"default of the architecture family {arch.partition(':')[0]!r}"


# ------------------------------------------------------------------------------------ writing
def gmcurv_metadata(
    arch: str, loss: str, arch_config: dict[str, Any] | None = None, **extra: Any
) -> dict[str, str]:
    """Header metadata that lets gmcurv rebuild a model without `--arch`."""
    meta = {META_ARCH: arch, META_LOSS: loss, META_VERSION: __version__}
    if arch_config is not None:
        meta[META_ARCH_CONFIG] = json.dumps(arch_config, sort_keys=True)
    for key, value in extra.items():
        meta[f"gmcurv.{key}"] = value if isinstance(value, str) else json.dumps(value)
    return meta


def save_checkpoint(
    path: str | Path,
    state: Mapping[str, Tensor],
    metadata: Mapping[str, str],
    masks: Mapping[str, Tensor] | None = None,
) -> Path:
    """Write tensors atomically (shared storage de-duplicated) and `masks`, if any, to the
    sidecar ``<name>.masks.safetensors`` (see `gmcurv.masks`).

    The checkpoint holds only the model's entries: plain ``safetensors.torch.load_file`` +
    a strict ``load_state_dict`` accept it.
    """
    tensors: dict[str, Tensor] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:  # tied weight: keep the first name only, like save_model
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    meta = {k: v for k, v in metadata.items() if k != META_MASKS}
    if masks:
        meta[META_MASKS] = masks_path(path).name
    out = atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    if masks:
        write_masks(out, sha256_file(out), masks)
    else:
        remove_stale_masks(out)
    return out


@dataclass(frozen=True)
class LayerInfo:
    """One capture block of a model, for ``gmcurv info``."""

    name: str
    kind: str
    params: dict[str, tuple[int, ...]]
    n_params: int


def describe_layers(model: nn.Module) -> list[LayerInfo]:
    """The model's parameter blocks and how gmcurv captures each (see `gmcurv.capture`)."""
    from gmcurv.capture import plan_capture
    from gmcurv.objective import select_params

    params = select_params(model)
    return [
        LayerInfo(
            plan.name,
            plan.kind,
            {p: tuple(params[p].shape) for p in plan.params},
            sum(params[p].numel() for p in plan.params),
        )
        for plan in plan_capture(model, params)
    ]


def mask_sparsity(masks: Mapping[str, Tensor]) -> dict[str, float]:
    """Fraction of zeros in each pruning mask."""
    return {k: 1.0 - float(m.float().mean()) for k, m in masks.items()}
