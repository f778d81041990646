"""Pruned checkpoints on disk: where they go and what they hold.

A pruned checkpoint keeps the input's keys and dtypes, holds the model's values (pruned
where masks say so) and gmcurv metadata (the input's descriptive keys, the family spec and
``gmcurv.pruning``); the keep-masks (1 = kept, as in ``torch.nn.utils.prune``) go to the
sidecar ``<name>.masks.safetensors`` (`gmcurv.io.masks`). Removal masks come in (True =
pruned, `gmcurv.pruning`) and are stored as their complement.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from gmcurv.io.checkpoint import LoadedModel, gmcurv_metadata, save_checkpoint
from gmcurv.io.fileio import ensure_not_input
from gmcurv.io.masks import masks_path
from gmcurv.io.metadata import META_ARCH, copyable
from gmcurv.io.samples import SAMPLE_ROOT
from gmcurv.io.tensors import MASK_PREFIX, load_tensors
from gmcurv.models.registry import FAMILIES

META_PRUNING = "gmcurv.pruning"


def default_output_path(model_path: Path, fraction: float) -> Path:
    """``<stem>.pruned-<percent>.safetensors`` beside the input.

    A bundled sample (inside the installed package) is never written into: its pruned copy
    goes to the working directory as ``<sample>.pruned-<percent>.safetensors``.
    """
    pct = f"{100 * fraction:.4g}"
    path = Path(model_path)
    if SAMPLE_ROOT in path.resolve().parents:
        return Path.cwd() / f"{path.parent.name}.pruned-{pct}.safetensors"
    return path.with_name(f"{path.stem}.pruned-{pct}.safetensors")


def pruned_outputs(output: Path) -> tuple[Path, Path]:
    """The files ``--prune`` writes: the checkpoint and its masks sidecar."""
    return Path(output), masks_path(output)


def save_pruned(
    loaded: LoadedModel,
    weights: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    output: Path,
    info: Mapping[str, Any],
    inputs: list[Path | None] | None = None,
) -> Path:
    """Write a pruned checkpoint: the input's keys and dtypes, the model's values (pruned
    where given) in the model's own layout and gmcurv metadata (the input's plus the family
    spec and pruning info); keep-masks go to the sidecar `pruned_outputs` names.

    The input file is only read; neither output may be any of `inputs`.
    """
    for path in pruned_outputs(output):
        ensure_not_input(path, [loaded.path, *(inputs or [])])
    original = load_tensors(loaded.path)
    by_id = {id(p): name for name, p in loaded.model.named_parameters()}
    state_vars = loaded.model.state_dict(keep_vars=True)
    state: dict[str, Tensor] = {}
    file_key: dict[str, str] = {}
    for key, value in original.items():
        if key.startswith(MASK_PREFIX):  # legacy masks inside the input: not carried over
            continue
        var = state_vars.get(getattr(loaded, "key_map", {}).get(key, key))
        if var is None:  # an entry the model ignores: copied as is
            state[key] = value
            continue
        name = by_id.get(id(var))
        # the model's layout (gmcurv metadata marks it), in the file's dtype
        new = weights[name] if name is not None and name in weights else var
        state[key] = new.detach().to("cpu", value.dtype).contiguous()
        if name is not None:
            file_key.setdefault(name, key)
    keep = {file_key.get(k, k): (~m).cpu() for k, m in masks.items()}
    meta = dict(loaded.metadata)
    family = loaded.arch.partition(":")[0] in FAMILIES
    if family and (META_ARCH not in meta or loaded.arch_source == "--arch"):
        # reloads without --arch (a transformers model: with its config)
        meta.update(
            gmcurv_metadata(loaded.arch, loaded.loss, getattr(loaded.model, "arch_config", None))
        )
    meta.setdefault("gmcurv.loss", loaded.loss)
    meta = copyable(meta)  # descriptive keys only: a --loss file.py:fn is never written down
    meta[META_PRUNING] = json.dumps(dict(info), sort_keys=True)
    return save_checkpoint(output, state, meta, keep)
