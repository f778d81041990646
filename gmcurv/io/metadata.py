"""Checkpoint metadata is description, never code.

A safetensors header's ``__metadata__`` may say what a checkpoint *is* — an architecture
family from the registry (``gmcurv.arch = mlp:tanh``), its configuration as a JSON object,
the *name* of a built-in loss, pruning facts and metrics — but never where code lives: a
``path/to/file.py:fn`` or ``package.module:fn`` value is refused with an error naming the
key, and is never copied into a checkpoint gmcurv writes. Code runs only when the user names
it on the command line (``--arch``, ``--loss``), in an environment variable or in the config
file of the working directory, and the report says which file was imported.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gmcurv.errors import CheckpointError

META_ARCH = "gmcurv.arch"
META_ARCH_CONFIG = "gmcurv.arch_config"
META_LOSS = "gmcurv.loss"

# a value that names code: a .py file, a path, or dotted.module:attr
_CODE = re.compile(r"(\.py\b|[/\\]|^[\w.]+\.[\w.]*:\w+$|^[\w.]+:[A-Za-z_]\w*\.\w)")


def builtin_losses() -> tuple[str, ...]:
    """Loss names a checkpoint may carry (the built-in losses)."""
    from gmcurv.losses import LOSSES

    return tuple(LOSSES)


def looks_like_code(value: str) -> bool:
    """True for ``file.py:fn``, ``a/b:fn`` and ``package.module:fn`` style values."""
    return bool(_CODE.search(value))


def validate_metadata(path: Path, raw: Any) -> dict[str, str]:
    """The header's ``__metadata__`` as a str -> str map, checked to be descriptive only."""
    fix = "re-export the checkpoint with safetensors (metadata is a map of strings to strings)"
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise CheckpointError(
            f"{path}: header __metadata__ is a JSON {type(raw).__name__}, not an object", fix
        )
    meta: dict[str, str] = {}
    for key, value in raw.items():
        if not isinstance(value, str):
            raise CheckpointError(
                f"{path}: metadata key {key!r} holds a {type(value).__name__}, not a string", fix
            )
        meta[str(key)] = value
    loss = meta.get(META_LOSS)
    if loss is not None and loss not in builtin_losses():
        raise CheckpointError(
            f"{path}: metadata key {META_LOSS!r} = {loss!r} is not a built-in loss name "
            f"({', '.join(builtin_losses())}); checkpoint metadata never names code",
            hint=f"to use your own loss, name it yourself: --loss {loss}"
            if ":" in loss
            else "pass --loss with a built-in name, or re-export the checkpoint",
        )
    arch = meta.get(META_ARCH)
    if arch is not None:
        from gmcurv.models.registry import FAMILIES

        family, colon, _ = arch.partition(":")
        if looks_like_code(arch) or (colon and family not in FAMILIES):
            raise CheckpointError(
                f"{path}: metadata key {META_ARCH!r} = {arch!r} is not an architecture family "
                f"({', '.join(FAMILIES)}); checkpoint metadata never names code",
                hint=f"to build the model with your own code, name it yourself: --arch {arch}"
                if ":" in arch
                else "pass --arch mlp[:activation] or --arch path/to/model.py:factory",
            )
    if META_ARCH_CONFIG in meta:
        try:
            config = json.loads(meta[META_ARCH_CONFIG])
        except ValueError:
            config = None
        if not isinstance(config, dict):
            raise CheckpointError(
                f"{path}: metadata key {META_ARCH_CONFIG!r} is not a JSON object",
                hint="re-export the checkpoint, or pass --arch to ignore its metadata",
            )
    for key, value in meta.items():
        if key.startswith("gmcurv.") and key not in (META_ARCH, META_LOSS) and _names_code(value):
            raise CheckpointError(
                f"{path}: metadata key {key!r} = {value!r} names code; checkpoint metadata "
                "is descriptive only",
                hint="remove that key (gmcurv never imports code named by a checkpoint)",
            )
    return meta


def _names_code(value: str) -> bool:
    """A plain string value (not JSON) that looks like ``file.py:fn`` / ``module:fn``."""
    v = value.strip()
    return not v.startswith(("{", "[", '"')) and ":" in v and looks_like_code(v)


def copyable(meta: Mapping[str, str]) -> dict[str, str]:
    """Metadata safe to copy into a checkpoint gmcurv writes (code-naming values dropped)."""
    out = {}
    for key, value in meta.items():
        if key == META_LOSS and value not in builtin_losses():
            continue
        if key == META_ARCH and looks_like_code(value):
            continue
        if key.startswith("gmcurv.") and _names_code(value):
            continue
        out[key] = value
    return out
