"""Built-in architecture families and the registry that resolves them.

`--arch` specs and gmcurv checkpoint metadata name a family (``mlp:relu``); Hugging Face
``config.json`` files name a ``model_type``. Each maps to a builder here; add a family by
registering a builder in `registry.py`.
"""

from gmcurv.models.mlp import MLP, build_mlp
from gmcurv.models.registry import FAMILIES, HF_MODEL_TYPES, build_family, build_from_hf_config

__all__ = ["FAMILIES", "HF_MODEL_TYPES", "MLP", "build_family", "build_from_hf_config", "build_mlp"]
