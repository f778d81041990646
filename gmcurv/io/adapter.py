"""PEFT LoRA adapters on disk: reading and writing them (validation: `gmcurv.lora.adapter`).

An adapter is what ``peft``'s ``save_pretrained`` writes: a directory holding
``adapter_model.safetensors`` and ``adapter_config.json``. gmcurv also reads (and writes, see
`write_adapter`) a single ``.safetensors`` file that carries the config as JSON in its header
metadata (key ``adapter_config``), or an ``adapter_model.safetensors`` passed as a file with
its ``adapter_config.json`` beside it.

Key layout and validation: `gmcurv.lora.adapter`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from gmcurv.errors import CheckpointError, GmcurvWarning
from gmcurv.io.fileio import atomic_write, sha256_file
from gmcurv.io.tensors import load_tensors, read_header
from gmcurv.lora.adapter import (
    CONFIG_METADATA_KEY,
    CONFIG_NAME,
    WEIGHTS_NAME,
    Adapter,
    AdapterError,
    LoraConfig,
    adapter_state,
    build_layer,
    is_lora_key,
    parse_config,
    parse_keys,
)


def looks_like_adapter(path: str | Path) -> bool:
    """Whether `path` is (meant to be) a LoRA adapter: a directory with PEFT's files, or a
    ``.safetensors`` file with LoRA keys or an adapter config in its header."""
    p = Path(path).expanduser()
    if p.is_dir():
        return any((p / n).exists() for n in (CONFIG_NAME, WEIGHTS_NAME, "adapter_model.bin"))
    if p.is_file() and p.suffix.lower() == ".safetensors":
        try:
            header = read_header(p)
        except CheckpointError:
            return False
        if CONFIG_METADATA_KEY in header.metadata:
            return True
        return any(is_lora_key(k) for k in header.shapes)
    return False


def _files(path: Path) -> tuple[Path, dict[str, Any] | None, Path | None]:
    """(weights file, config from the file's header or None, config.json path or None)."""
    if not path.exists():
        raise AdapterError(
            f"{path}: no such adapter",
            hint="pass a directory written by peft's save_pretrained "
            f"({WEIGHTS_NAME} + {CONFIG_NAME})",
        )
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            if (path / "adapter_model.bin").is_file():
                raise AdapterError(
                    f"{path}: adapter_model.bin is a pickle file; gmcurv reads safetensors only",
                    hint="re-save the adapter with save_pretrained(..., safe_serialization=True)",
                )
            raise AdapterError(
                f"{path}: no {WEIGHTS_NAME} in the adapter directory",
                hint="save the adapter with peft's save_pretrained (writes the weights and "
                f"{CONFIG_NAME})",
            )
        config = path / CONFIG_NAME
        return weights, None, config if config.is_file() else None
    header = read_header(path)
    embedded = header.metadata.get(CONFIG_METADATA_KEY)
    beside = path.parent / CONFIG_NAME
    if embedded is not None:
        try:
            cfg = json.loads(embedded)
        except ValueError:
            raise AdapterError(
                f"{path}: the adapter config in the file's header is not valid JSON",
                hint="re-export the adapter",
            ) from None
        return path, cfg if isinstance(cfg, dict) else {}, None
    return path, None, beside if beside.is_file() else None


def _read_config(raw: dict[str, Any] | None, config_path: Path | None, where: Path) -> LoraConfig:
    """The config embedded in the file's header (`raw`) or read from `config_path`."""
    if raw is None:
        if config_path is None:
            raise AdapterError(
                f"{where}: missing {CONFIG_NAME} (r, lora_alpha, target_modules, ...)",
                hint=f"put the {CONFIG_NAME} written with the adapter beside its weights",
            )
        try:
            raw = json.loads(config_path.read_text())
        except (OSError, ValueError) as e:
            raise AdapterError(f"{config_path}: cannot parse: {e}", hint="fix the JSON") from None
        where = config_path
    return parse_config(raw, where)


def read_adapter(path: str | Path, name: str | None = None) -> Adapter:
    """Read and validate a PEFT LoRA adapter (directory or file, see module doc)."""
    p = Path(path).expanduser()
    weights, embedded, config_path = _files(p)
    cfg = _read_config(embedded, config_path, p)
    tensors = load_tensors(weights)
    parts, ignored = parse_keys(tensors, weights)
    if not parts:
        raise AdapterError(
            f"{weights}: no LoRA factors (no '.lora_A.weight' / '.lora_B.weight' keys)",
            hint="is this a LoRA adapter saved by peft?",
        )
    layers = {module: build_layer(module, found, cfg, weights) for module, found in parts.items()}
    if ignored:
        warnings.warn(
            f"{weights}: {len(ignored)} entries are not LoRA factors and are left out of the "
            f"update ({', '.join(ignored[:3])}{' ...' if len(ignored) > 3 else ''}; e.g. "
            "modules_to_save or bias='all')",
            GmcurvWarning,
            stacklevel=2,
        )
    dtype = next(iter(layers.values())).A.dtype
    return Adapter(
        name=name or (p.name if p.is_dir() else p.stem),
        path=p,
        weights_path=weights,
        sha256=sha256_file(weights),
        config=cfg,
        layers=layers,
        ignored=tuple(ignored),
        dtype=dtype,
    )


def write_adapter(adapter: Adapter, path: str | Path) -> Path:
    """Write `adapter` atomically in PEFT layout.

    A path ending in ``.safetensors`` gets one file with the config in its header
    (``adapter_config``); any other path is a directory (created if missing) that receives
    ``adapter_model.safetensors`` + ``adapter_config.json``, loadable by peft. Returns the
    weights file.
    """
    target = Path(path).expanduser()
    tensors = adapter_state(adapter)
    config_json = json.dumps(adapter.config.raw, indent=2, sort_keys=True)
    if target.suffix.lower() == ".safetensors":
        meta = {"format": "pt", CONFIG_METADATA_KEY: config_json}
        return atomic_write(target, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    if target.exists() and not target.is_dir():
        raise AdapterError(
            f"cannot export to {target}: it is a file",
            hint="name a directory, or a file ending in .safetensors",
        )
    if not target.parent.exists():
        raise AdapterError(
            f"cannot export to {target}: directory {target.parent} does not exist",
            hint="create it first or choose another path",
        )
    target.mkdir(exist_ok=True)
    weights = target / WEIGHTS_NAME
    atomic_write(weights, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write(target / CONFIG_NAME, lambda tmp: tmp.write_text(config_json + "\n"))
    return weights
