"""Built-in architecture families and the registry that resolves them.

`--arch` specs and gmcurv checkpoint metadata name a family (``mlp:relu``, ``gpt2``);
Hugging Face ``config.json`` files name a ``model_type`` (``gpt2``). Each maps to a builder
in `registry.py`; add a family with `register_family` / `register_hf_model_type`.
"""

from gmcurv.models.gpt2 import GPT2Config, build_gpt2
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
    "GPT2Config",
    "build_family",
    "build_from_hf_config",
    "build_gpt2",
    "build_mlp",
    "register_family",
    "register_hf_model_type",
]
