"""Pruned checkpoints on disk: where they go and what they hold.

A pruned checkpoint keeps the input's keys and dtypes, holds the model's values (pruned
where masks say so) and gmcurv metadata (the input's descriptive keys, the family spec and
``gmcurv.pruning``); the keep-masks (1 = kept, as in ``torch.nn.utils.prune``) go to the
sidecar ``<name>.masks.safetensors`` (`gmcurv.io.masks`). Removal masks come in (True =
pruned, `gmcurv.pruning`) and are stored as their complement.

A model given as a directory (``save_pretrained``'s layout) is pruned into a directory of
the same layout: ``model.safetensors`` (+ its masks sidecar) beside copies of the input's
``config.json`` and its other descriptive files (`COMPANIONS`: generation config,
tokenizer), so ``transformers``' ``from_pretrained`` loads the result as it loaded the input.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from gmcurv.errors import ConfigError
from gmcurv.io.checkpoint import LoadedModel, gmcurv_metadata, save_checkpoint
from gmcurv.io.fileio import atomic_directory, ensure_not_input
from gmcurv.io.masks import masks_path
from gmcurv.io.metadata import META_ARCH, copyable
from gmcurv.io.samples import SAMPLE_ROOT
from gmcurv.io.tensors import MASK_PREFIX, load_tensors
from gmcurv.models.registry import FAMILIES

META_PRUNING = "gmcurv.pruning"
WEIGHTS_NAME = "model.safetensors"
# descriptive files of a save_pretrained directory, copied into a pruned directory (never code)
COMPANIONS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)


# suffixes of single files: a --save-pruned name ending so is refused, not made a directory
FILE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".json", ".npz", ".npy"}
FILE_SUFFIXES |= {".h5", ".onnx", ".gguf", ".txt", ".csv", ".tmp"}


def is_directory_output(output: str | Path) -> bool:
    """A ``--save-pruned`` path not ending in ``.safetensors`` names a directory (written in
    ``save_pretrained``'s layout), e.g. the default ``<dir>.pruned-50``."""
    path = Path(output)
    return path.is_dir() or path.suffix.lower() != ".safetensors"


def default_output_path(model_path: Path, fraction: float, model_arg: Path | None = None) -> Path:
    """Where ``--prune`` writes by default: ``<stem>.pruned-<percent>.safetensors`` beside a
    checkpoint file; for a model directory (`model_arg`), the sibling directory
    ``<dir>.pruned-<percent>`` in the same layout (inside the input it may not go).

    A bundled sample (inside the installed package) is never written into: its pruned copy
    goes to the working directory as ``<sample>.pruned-<percent>[.safetensors]``.
    """
    pct = f"{100 * fraction:.4g}"
    path = Path(model_path)
    in_sample = SAMPLE_ROOT in path.resolve().parents
    if model_arg is not None and Path(model_arg).is_dir():
        folder = Path(model_arg).expanduser().resolve()
        return (Path.cwd() if in_sample else folder.parent) / f"{folder.name}.pruned-{pct}"
    if in_sample:
        return Path.cwd() / f"{path.parent.name}.pruned-{pct}.safetensors"
    return path.with_name(f"{path.stem}.pruned-{pct}.safetensors")


def pruned_outputs(output: Path, companions: list[Path] | None = None) -> tuple[Path, ...]:
    """The files ``--prune`` writes: the checkpoint and its masks sidecar (in a directory
    output ``model.safetensors`` and ``model.masks.safetensors``, plus the `companions`)."""
    output = Path(output)
    if not is_directory_output(output):
        return output, masks_path(output)
    weights = output / WEIGHTS_NAME
    return weights, masks_path(weights), *(output / p.name for p in companions or [])


def companion_files(weights: Path) -> list[Path]:
    """The `COMPANIONS` present beside the input weights (copied into a directory output)."""
    return [weights.parent / n for n in COMPANIONS if (weights.parent / n).is_file()]


def check_directory_output(output: Path, option: str = "--save-pruned") -> None:
    """A directory output may exist only when it holds no other checkpoint (its files would
    be mixed with ours); its parent must exist."""
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{option} {output}: not a directory", hint=f"choose another {option}")
    if not output.parent.is_dir():
        raise ConfigError(
            f"cannot write {option} {output}: directory {output.parent} does not exist",
            hint=f"create the directory first, or choose another path for {option}",
        )
    if output.is_dir():
        ours = {WEIGHTS_NAME, masks_path(Path(WEIGHTS_NAME)).name}
        other = sorted(
            p.name
            for p in output.iterdir()
            if p.name not in ours and (p.suffix in (".safetensors", ".bin") or "index" in p.name)
        )
        if other:
            raise ConfigError(
                f"{option} {output}: the directory already holds another checkpoint "
                f"({', '.join(other[:3])})",
                hint=f"give {option} a new directory (or a .safetensors file name)",
            )


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

    The input file is only read; no output may be any of `inputs`. A directory `output`
    (`is_directory_output`) gets ``model.safetensors`` and the input's `companion_files`.
    Returns the checkpoint written.
    """
    companions = companion_files(loaded.path) if is_directory_output(output) else []
    for path in pruned_outputs(output, companions):
        ensure_not_input(path, [loaded.path, *(inputs or [])], "--save-pruned")
    if is_directory_output(output):  # written whole into a temporary, then moved in
        check_directory_output(Path(output))

        def write(tmp: Path) -> None:
            for src in companions:  # descriptive JSON/text only (COMPANIONS), verbatim
                shutil.copyfile(src, tmp / src.name)
            _save(loaded, weights, masks, tmp / WEIGHTS_NAME, info)

        return atomic_directory(output, write) / WEIGHTS_NAME
    return _save(loaded, weights, masks, Path(output), info)


def _save(
    loaded: LoadedModel,
    weights: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    output: Path,
    info: Mapping[str, Any],
) -> Path:
    """The checkpoint file and its masks sidecar (see `save_pruned`)."""
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
