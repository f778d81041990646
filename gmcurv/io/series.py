"""Checkpoint series: which paths are checkpoints, and their order (training step).

``gmcurv trace CKPT... DATA``: every argument before the last is a checkpoint or a directory
of checkpoints; the last is DATA. A MODEL-position directory is read as follows, first match
wins (so the same directory always means the same thing):

1. it holds ``config.json``, ``model.safetensors`` or a sharded index: **one** model
   (Hugging Face layout);
2. it holds exactly one ``.safetensors`` file and no checkpoint sub-directories: one model;
3. it holds several ``.safetensors`` files (and no checkpoint sub-directories): a **series**,
   one checkpoint per file;
4. it holds sub-directories that are models by rule 1 or 2 (e.g. the Trainer's
   ``checkpoint-500/``) and no ``.safetensors`` file: a **series**, one per sub-directory.

A directory with both files and checkpoint sub-directories is ambiguous (an error), and so is
one whose files hold data (an ``inputs``/``x``/``input_ids`` tensor): DATA comes last.
Pruning-mask sidecars (``<name>.masks.safetensors``) are never checkpoints: each belongs to
the checkpoint beside it, which loads it.

Order: by training step when *every* checkpoint carries one — header metadata
(``gmcurv.step``, ``step``, ``global_step``), then ``trainer_state.json``'s ``global_step``
beside it, then the last integer in its name (``step_1200``, ``checkpoint-500``) — else in
the order given (a directory: natural name order) and the x axis is the position.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from gmcurv.errors import ConfigError
from gmcurv.io.data import INPUT_KEYS
from gmcurv.io.masks import is_masks_file
from gmcurv.io.metadata import META_ARCH
from gmcurv.io.tensors import INDEX_NAME, read_header
from gmcurv.models.mlp import natural_key

STEP_KEYS = ("gmcurv.step", "step", "global_step")
_HINT = "gmcurv trace CKPT... DATA: checkpoints (files or directories) first, DATA last"


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of a series and the training step it was saved at (when known)."""

    path: Path
    step: int | None
    step_source: str | None  # 'metadata' | 'trainer_state.json' | 'name' | None


@dataclass(frozen=True)
class Series:
    """Checkpoints in analysis order and what the x axis is."""

    checkpoints: list[Checkpoint]
    x: str  # 'step' | 'index'
    order: str  # how the order was decided, for the report


def _one_model(path: Path) -> bool:
    """A Hugging Face style model directory (rule 1)."""
    return any((path / name).is_file() for name in ("config.json", "model.safetensors", INDEX_NAME))


def _weights(path: Path) -> list[Path]:
    """The checkpoint files in a directory (pruning-mask sidecars are not checkpoints)."""
    found = (p for p in path.glob("*.safetensors") if not is_masks_file(p))
    return sorted(found, key=lambda p: natural_key(p.name))


def _is_model_dir(path: Path) -> bool:
    return _one_model(path) or len(_weights(path)) == 1


def _holds_data(path: Path) -> bool:
    try:
        keys = read_header(path).shapes
    except Exception:  # unreadable files are reported when loaded as models
        return False
    return any(k in keys for k in INPUT_KEYS)


def expand(path: Path) -> list[Path]:
    """The checkpoints a MODEL-position argument stands for (see the module doc)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return [] if is_masks_file(path) else [path]  # a sidecar travels with its checkpoint
    if _one_model(path):
        return [path]
    files = _weights(path)
    subdirs = sorted(
        (p for p in path.iterdir() if p.is_dir() and _is_model_dir(p)),
        key=lambda p: natural_key(p.name),
    )
    if files and subdirs:
        raise ConfigError(
            f"{path}: ambiguous: holds both .safetensors files and checkpoint directories "
            f"({subdirs[0].name}/)",
            hint="point at the files or at the sub-directories, e.g. with a shell glob",
        )
    data = [f for f in files if _holds_data(f)]
    if data:
        raise ConfigError(
            f"{path}: holds data shards ({data[0].name} has an inputs tensor), not checkpoints",
            hint=_HINT,
        )
    if len(files) == 1 or not (files or subdirs):
        return [path]  # one model, or nothing: the loader explains
    return files or subdirs


def check_data_arg(path: Path) -> None:
    """Refuse a checkpoint in the DATA position with a clear message."""
    path = Path(path).expanduser()
    looks_like = None
    if path.is_dir() and (
        (path / "config.json").is_file() or (path / "model.safetensors").is_file()
    ):
        looks_like = "a model directory"
    elif path.is_file() and path.suffix == ".safetensors" and not _holds_data(path):
        try:
            meta = read_header(path).metadata
        except Exception:
            return
        if META_ARCH in meta:
            looks_like = "a checkpoint"
    if looks_like:
        raise ConfigError(
            f"{path}: the last argument is DATA, but this is {looks_like} (no inputs tensor)",
            hint=_HINT,
        )


def step_of(path: Path) -> tuple[int | None, str | None]:
    """The training step a checkpoint was saved at, and where it was read."""
    weights = path
    if path.is_dir():
        found = [path / "model.safetensors"] if (path / "model.safetensors").is_file() else []
        found = found or sorted(path.glob("*.safetensors"))
        weights = found[0] if len(found) == 1 else None
    if weights is not None and weights.is_file():
        try:
            meta = read_header(weights).metadata
        except Exception:
            meta = {}
        for key in STEP_KEYS:
            if key in meta and re.fullmatch(r"\s*\d+\s*", meta[key]):
                return int(meta[key]), "metadata"
    state = (path if path.is_dir() else path.parent) / "trainer_state.json"
    if path.is_dir() and state.is_file():
        try:
            step = json.loads(state.read_text()).get("global_step")
        except (OSError, ValueError, AttributeError):
            step = None
        if isinstance(step, int):
            return step, "trainer_state.json"
    name = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.name
    digits = re.findall(r"\d+", name)
    if digits:
        return int(digits[-1]), "name"
    return None, None


def resolve_series(paths: list[Path]) -> Series:
    """Expand MODEL-position arguments into an ordered series (see the module doc)."""
    expanded = [p for arg in paths for p in expand(arg)]
    seen: set[Path] = set()
    for p in expanded:
        key = p.expanduser().resolve()
        if key in seen:
            raise ConfigError(f"checkpoint {p} is given twice", hint="list each checkpoint once")
        seen.add(key)
    cks = [Checkpoint(p, *step_of(p)) for p in expanded]
    if len(cks) > 1 and all(c.step is not None for c in cks):
        steps = [c.step for c in cks]
        if len(set(steps)) < len(steps):
            dup = next(s for s in steps if steps.count(s) > 1)
            names = ", ".join(c.path.name for c in cks if c.step == dup)
            raise ConfigError(
                f"two checkpoints carry step {dup} ({names}): cannot order them",
                hint="give them in the order wanted with distinct step numbers in their names",
            )
        sources = sorted({c.step_source for c in cks if c.step_source})
        ordered = sorted(cks, key=lambda c: c.step)  # type: ignore[arg-type, return-value]
        return Series(ordered, "step", f"by step (from {', '.join(sources)})")
    how = "as given" if len(paths) > 1 or not Path(paths[0]).is_dir() else "natural name order"
    return Series(cks, "index", how + " (no step number on every checkpoint)")
