"""Checkpoints: load a model (weights, masks, provenance) and write checkpoints.

Weights are one ``.safetensors`` file or a sharded Hugging Face checkpoint
(``model.safetensors.index.json`` naming the shard of every tensor, all in one directory;
`gmcurv.io.tensors`); the architecture is resolved by `gmcurv.io.architecture`.

Weights load with ``safetensors.torch.load_model`` semantics: tied parameters need only one
of their names in the file; any other missing key, any unexpected key and any shape
mismatch is an error naming the file. Pruning masks live in a sidecar file
(`gmcurv.io.masks`; older files hold them under the reserved ``gmcurv_mask.`` prefix),
returned separately. A model may declare entries to ignore (``ignored_checkpoint_keys``)
and entries other tools store transposed (``checkpoint_transposed_keys()``, read transposed
from files without gmcurv metadata).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from gmcurv import __version__
from gmcurv.errors import CheckpointError
from gmcurv.io.architecture import build_model
from gmcurv.io.fileio import atomic_write, sha256_file
from gmcurv.io.masks import (
    META_MASKS,
    is_masks_file,
    masks_path,
    read_masks,
    remove_stale_masks,
    write_masks,
)
from gmcurv.io.metadata import META_ARCH, META_ARCH_CONFIG, META_LOSS
from gmcurv.io.tensors import (
    INDEX_NAME,
    MASK_PREFIX,
    load_tensors,
    read_weights_header,
    weights_sha256,
)
from gmcurv.models.hf import hf_state_keys, is_hf_model

META_VERSION = "gmcurv.version"
DEFAULT_LOSS_SOURCE = "built-in default (no --loss, checkpoint metadata or config.json names one)"
PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"}
# the keys of a DATA file (gmcurv.io.data): a "checkpoint" holding only these is data
DATA_INPUT_KEYS = {"inputs", "x", "input_ids", "pixel_values"}
DATA_KEYS = DATA_INPUT_KEYS | {"targets", "y", "labels", "attention_mask", "token_type_ids"}
# safetensors' floating dtype codes, as torch names them
FLOAT_CODES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
FLOAT_CODES |= {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


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
    stored_dtypes: tuple[str, ...] = ()  # floating dtypes of the file's entries ("bfloat16")

    @property
    def n_params(self) -> int:
        """Number of distinct parameters (tied tensors counted once)."""
        return sum(p.numel() for p in self.model.parameters())


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
            pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
            if pickles:  # e.g. pytorch_model.bin: never unpickled
                raise CheckpointError(
                    f"{path}: directory holds only pickle-based weights "
                    f"({', '.join(pickles[:3])}), which gmcurv refuses (loading one can run "
                    "arbitrary code)",
                    hint="convert once, where you trust the file: "
                    "transformers' Model.from_pretrained(dir).save_pretrained(dir) writes "
                    "model.safetensors (or safetensors.torch.save_file(torch.load(f, "
                    "weights_only=True), 'model.safetensors'))",
                )
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
    keys = set(header.shapes)
    if keys and keys <= DATA_KEYS and keys & DATA_INPUT_KEYS:
        raise CheckpointError(
            f"{weights}: holds data ({', '.join(sorted(keys))}), not model weights",
            hint="MODEL comes before DATA on the command line: gmcurv COMMAND MODEL DATA",
        )
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
        stored_dtypes=tuple(
            sorted({FLOAT_CODES[c] for c in header.dtypes.values() if c in FLOAT_CODES})
        ),
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
    sidecar ``<name>.masks.safetensors`` (see `gmcurv.io.masks`).

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
