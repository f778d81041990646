"""Built-in architecture families and the registry that resolves them.

`--arch` specs and gmcurv checkpoint metadata name a family (``mlp:relu``,
``hf:GPT2LMHeadModel``); Hugging Face ``config.json`` files are built by `transformers`
(`gmcurv.models.hf`). Add a family with `register_family` / `register_hf_model_type`.
"""

from gmcurv.models.mlp import MLP, build_mlp
from gmcurv.models.registry import (
    FAMILIES,
    HF_MODEL_TYPES,
    build_family,
    build_from_hf_config,
    register_family,
    register_hf_model_type,
)

__all__ = [
    "FAMILIES",
    "HF_MODEL_TYPES",
    "MLP",
    "build_family",
    "build_from_hf_config",
    "build_mlp",
    "register_family",
    "register_hf_model_type",
]
