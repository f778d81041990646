"""Architecture resolution: which model a checkpoint holds, built untrained.

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
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from gmcurv.errors import ArchitectureError, CheckpointError, GmcurvError
from gmcurv.io.factories import build_from_factory, is_family_spec
from gmcurv.io.metadata import META_ARCH, META_ARCH_CONFIG, META_LOSS
from gmcurv.io.tensors import Header
from gmcurv.models.registry import build_family, build_from_hf_config, family_loss


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
        if is_family_spec(arch):
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
    if "gmcurv.pruning" in meta:  # pruned from a model built by user code, never recorded
        hint = (
            "it was pruned by gmcurv from a model built by an --arch factory, which a "
            "checkpoint never records: pass the same --arch path/to/model.py:factory"
        )
    else:
        hint = (
            "pass --arch mlp:<activation> (relu|tanh|gelu|...) for a plain MLP, "
            "or --arch path/to/model.py:factory"
        )
    raise ArchitectureError(
        f"{source}: cannot tell the architecture: no gmcurv metadata and no config.json beside it",
        hint=hint,
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
