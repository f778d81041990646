"""Hugging Face checkpoints, built by `transformers` itself (optional: ``gmcurv[hf]``).

A directory written by ``save_pretrained`` (``config.json`` + ``model.safetensors`` or a
sharded ``model.safetensors.index.json``) is built as the library builds it:

- the class is ``config.json``'s first ``architectures`` entry, looked up in the
  `transformers` namespace (library code only: a config with ``auto_map`` needs custom code
  and is refused — gmcurv never sets ``trust_remote_code``). Without ``architectures``, the
  task's Auto classes are tried and the one whose parameter names fit the checkpoint is
  used; ``--arch hf:<Class>`` names it explicitly;
- the model is built from the config with random init (``attn_implementation='eager'``:
  plain tensor ops, so double backward, forward mode and ``vmap`` all apply;
  ``use_cache=False``), and the weights are then loaded by `gmcurv.io.checkpoint` — safetensors
  only, strict about missing/unexpected keys and shapes; weights the model ties
  (``lm_head`` to the input embedding) need one of their names in the file, as in
  `transformers`; checkpoints saved from the bare model (keys without the
  ``base_model_prefix``, as the original ``gpt2`` hub files) get the prefix added;
- the loss follows the library's head (`hf_loss`): causal LM -> ``next_token`` (labels
  shifted inside the loss, ``-100`` ignored), sequence/image/token classification and masked
  LM -> ``cross_entropy``, one-label regression -> ``mse``.

The checkpoint's family spec is ``hf:<Class>``; files gmcurv writes from such a model
(pruned checkpoints) carry the whole config in their metadata, so they rebuild without
``config.json``. `transformers` is imported only when an HF checkpoint is loaded.
"""

from __future__ import annotations

import contextlib
import importlib
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from gmcurv.errors import ArchitectureError

Shapes = Mapping[str, tuple[int, ...]]
INSTALL_HINT = 'pip install "gmcurv[hf]"'

# the Auto classes tried, in order, for a config without `architectures`
AUTO_TASKS = (
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
)
_CAUSAL = ("ForCausalLM", "LMHeadModel")
_CLASSIFIERS = (
    "ForSequenceClassification",
    "ForImageClassification",
    "ForAudioClassification",
)
_PER_TOKEN = ("ForTokenClassification", "ForMaskedLM")


def transformers_module():
    """`transformers`, or an `ArchitectureError` naming the extra that installs it."""
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise ArchitectureError(
            "this is a Hugging Face checkpoint, which needs the transformers package",
            hint=f"install it with: {INSTALL_HINT}",
        ) from None


def is_hf_config(config: Mapping[str, Any] | None) -> bool:
    """A ``config.json`` written by `transformers` (it names a ``model_type``)."""
    return isinstance(config, Mapping) and isinstance(config.get("model_type"), str)


def hf_loss(cls_name: str, config: Any, source: str) -> str:
    """The loss `transformers` computes for this head (see module doc)."""
    if cls_name.endswith(_CAUSAL):
        return "next_token"
    if cls_name.endswith(_PER_TOKEN):
        return "cross_entropy"
    if cls_name.endswith(_CLASSIFIERS):
        problem = getattr(config, "problem_type", None)
        if problem == "regression" or (problem is None and config.num_labels == 1):
            return "mse"
        if problem == "multi_label_classification":
            raise ArchitectureError(
                f"{source}: {cls_name} with problem_type 'multi_label_classification' "
                "(binary cross-entropy per label) has no built-in gmcurv loss",
                hint="pass --loss path/to/loss.py:fn returning per-example losses",
            )
        return "cross_entropy"
    raise ArchitectureError(
        f"{source}: {cls_name} has no head whose loss gmcurv knows (causal LM, sequence/image/"
        "token classification, masked LM)",
        hint="save the model with its task head, or write an --arch path/to/model.py:factory",
    )


def _config_object(tf, config: Mapping[str, Any], source: str):
    if "auto_map" in config:
        raise ArchitectureError(
            f"{source}: config.json has auto_map: the model needs its own Python code, "
            "which gmcurv never runs (no trust_remote_code)",
            hint="write an --arch path/to/model.py:factory that builds the model, after "
            "reading its code",
        )
    model_type = config["model_type"]
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ArchitectureError(
            f"{source}: transformers {tf.__version__} does not know model_type {model_type!r}",
            hint="upgrade transformers, or write an --arch path/to/model.py:factory",
        )
    fields = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    try:
        cfg = CONFIG_MAPPING[model_type].from_dict(fields)
    except Exception as e:  # the library validates field values
        raise ArchitectureError(
            f"{source}: transformers rejects config.json: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}",
            hint="fix the field it names (or re-save the model with save_pretrained)",
        ) from None
    cfg.use_cache = False
    return cfg


def _model_class(tf, name: str, source: str):
    from transformers import PreTrainedModel

    cls = getattr(tf, name, None)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise ArchitectureError(
            f"{source}: transformers {tf.__version__} has no model class {name!r}",
            hint="upgrade transformers, or write an --arch path/to/model.py:factory",
        )
    return cls


def _instantiate(cls, cfg, device: str | None = None) -> nn.Module:
    ctx = torch.device(device) if device else contextlib.nullcontext()
    with ctx:
        return cls._from_config(cfg, attn_implementation="eager")


def _fits(model: nn.Module, shapes: Shapes) -> bool:
    """Do the checkpoint's names fit the model (tied names may be absent)?"""
    expected = hf_state_keys(model, shapes)
    keys = set(model.state_dict())
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    return set(expected) <= keys and not (keys - set(expected) - tied)


def _class_for(tf, cfg, config: Mapping[str, Any], shapes: Shapes, source: str) -> str:
    """The class named by ``architectures``, else the Auto class whose names fit."""
    names = config.get("architectures") or []
    if names:
        return str(names[0])
    from transformers.models.auto import modeling_auto

    candidates = []
    for task in AUTO_TASKS:
        name = getattr(modeling_auto, task, {}).get(cfg.model_type)
        if isinstance(name, str) and name not in candidates:
            candidates.append(name)
    fitting = []
    for name in candidates:
        cls = getattr(tf, name, None)
        if cls is None:
            continue
        try:
            model = _instantiate(cls, cfg, "meta")
        except Exception:  # a head this config cannot build
            continue
        if _fits(model, shapes):
            fitting.append(name)
    if len(fitting) == 1:
        return fitting[0]
    raise ArchitectureError(
        f"{source}: config.json names no architectures and "
        + ("no" if not fitting else "more than one")
        + f" model class fits the checkpoint (tried {', '.join(candidates) or 'none'})",
        hint='add "architectures": ["<Class>"] to config.json, or pass --arch hf:<Class>',
    )


def build_hf(
    config: Mapping[str, Any], shapes: Shapes, source: str, cls_name: str | None = None
) -> tuple[nn.Module, str, str]:
    """Build a Hugging Face model from its config: (model, class name, loss name)."""
    tf = transformers_module()
    with _quiet(tf):  # the engine never prints: the library's config notes are not errors
        return _build(tf, config, shapes, source, cls_name)


@contextlib.contextmanager
def _quiet(tf):
    logging = tf.utils.logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _build(tf, config, shapes: Shapes, source: str, cls_name: str | None):
    cfg = _config_object(tf, config, source)
    name = cls_name or _class_for(tf, cfg, config, shapes, source)
    cls = _model_class(tf, name, source)
    loss = hf_loss(name, cfg, source)
    try:
        model = _instantiate(cls, cfg)
    except Exception as e:
        raise ArchitectureError(
            f"{source}: transformers could not build {name} from config.json: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            hint="check config.json (it must be one transformers wrote)",
        ) from None
    model.eval()  # as from_pretrained leaves it (the objective sets the mode it analyses)
    model.arch_spec = f"hf:{name}"  # the family spec that rebuilds it
    model.arch_loss = loss  # the library's loss for this head
    model.arch_config = model.config.to_dict()  # stored in checkpoints gmcurv writes
    return model, name, loss


def _library_renames(model: nn.Module, keys, expected: set[str]) -> dict[str, str] | None:
    """The library's own checkpoint-key renaming (`transformers` >= 5: legacy names such as
    ViT's ``encoder.layer.0.attention.attention.query`` saved by ``save_pretrained``), or None
    when this version has none. Conversions that transform tensors are refused."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError:
        return None
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None) or None
    meta = dict.fromkeys(expected)
    out = {}
    for k in keys:
        new, converted = rename_source_key(k, renamings, converters, prefix, meta)
        if converted is not None:
            raise ArchitectureError(
                f"checkpoint tensor {k!r} needs a weight conversion ({converted}) that gmcurv "
                "does not apply",
                hint="re-save the model with a current transformers (save_pretrained), or "
                "write an --arch path/to/model.py:factory",
            )
        out[k] = new
    return out


def hf_state_keys(model: nn.Module, keys: Mapping[str, Any] | set[str]) -> dict[str, str]:
    """Map checkpoint names to the model's: ``{file_key: model_key}``.

    The library's key renaming applies (`_library_renames`); legacy buffers it ignores
    (``_keys_to_ignore_on_load_unexpected``) are left out; a checkpoint saved from the bare
    model gets ``base_model_prefix.`` added.
    """
    expected = set(model.state_dict())
    renamed = _library_renames(model, keys, expected)
    if renamed is not None:
        keys = {renamed[k]: k for k in keys}  # new -> original
        mapped = _prefix_and_ignore(model, keys, expected)
        return {keys[new]: target for new, target in mapped.items()}
    return _prefix_and_ignore(model, keys, expected)


def _prefix_and_ignore(model: nn.Module, keys, expected: set[str]) -> dict[str, str]:
    ignore = [
        re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()
    ]
    prefix = getattr(model, "base_model_prefix", "") or ""
    add = (
        bool(prefix)
        and not any(k.startswith(prefix + ".") for k in keys)
        and any(k.startswith(prefix + ".") for k in expected)
    )
    out = {}
    for k in keys:
        target = f"{prefix}.{k}" if add and f"{prefix}.{k}" in expected else k
        if target not in expected and any(p.search(k) for p in ignore):
            continue
        out[k] = target
    return out


def is_hf_model(model: nn.Module) -> bool:
    """A `transformers` model (checked without importing the library)."""
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__[:-1])


def to_model_names(model: nn.Module, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The checkpoint's tensors under the model's state-dict names (see `hf_state_keys`)."""
    return {t: tensors[k] for k, t in hf_state_keys(model, tensors).items()}
