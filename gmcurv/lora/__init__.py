"""LoRA adapters (Learning on LoRAs, Putterman et al., 2024): GL(r)-invariant features of
the update ``ΔW = s B A`` and the curvature of a base model's loss along it.

- `gmcurv.lora.adapter`: PEFT adapters on disk (read, validate, write);
- `gmcurv.lora.features`: singular values from two QRs and an r x r SVD, norms, ranks,
  the canonical (SVD) factorisation;
- `gmcurv.lora.mapping`: adapted modules -> base-model parameters, the update ``dθ``;
- `gmcurv.lora.curvature`: ``gᵀdθ``, ``dθᵀF dθ`` from decomposed factors, ``dθᵀH dθ`` from
  one HVP, predicted vs measured loss change when merged at several scales.
"""

from gmcurv.lora.adapter import (
    Adapter,
    AdapterError,
    LoraConfig,
    LoraLayer,
    looks_like_adapter,
    make_adapter,
    read_adapter,
    write_adapter,
)
from gmcurv.lora.curvature import SCALES, AdapterCurvature, curvature_along, update_jvp
from gmcurv.lora.features import (
    AdapterFeatures,
    LayerFeatures,
    adapter_features,
    canonical_adapter,
    layer_features,
    update_svd,
)
from gmcurv.lora.mapping import LayerUpdate, attach, update_direction

__all__ = [
    "SCALES",
    "Adapter",
    "AdapterCurvature",
    "AdapterError",
    "AdapterFeatures",
    "LayerFeatures",
    "LayerUpdate",
    "LoraConfig",
    "LoraLayer",
    "adapter_features",
    "attach",
    "canonical_adapter",
    "curvature_along",
    "layer_features",
    "looks_like_adapter",
    "make_adapter",
    "read_adapter",
    "update_direction",
    "update_jvp",
    "update_svd",
    "write_adapter",
]
