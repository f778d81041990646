"""Writing PEFT-format LoRA adapters for tests (no peft needed).

`write_peft_adapter` produces exactly what ``peft``'s ``save_pretrained`` writes: a directory
with ``adapter_model.safetensors`` (keys ``base_model.model.<module>.lora_A.weight`` [r, in],
``...lora_B.weight`` [out, r]; ``lora_embedding_A`` / ``lora_embedding_B`` for embeddings)
and ``adapter_config.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn


def write_peft_adapter(
    path: Path,
    factors: Mapping[str, tuple[Tensor, Tensor]],
    r: int,
    alpha: float,
    *,
    embeddings: tuple[str, ...] = (),
    infix: str | None = None,
    config: bool = True,
    **extra: Any,
) -> Path:
    """``factors``: ``{module: (B, A)}`` as stored (B [out, r], A [r, in] ...)."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    mid = f".{infix}" if infix else ""
    for module, (B, A) in factors.items():
        if module in embeddings:
            tensors[f"base_model.model.{module}.lora_embedding_A{mid}"] = A.contiguous()
            tensors[f"base_model.model.{module}.lora_embedding_B{mid}"] = B.contiguous()
        else:
            tensors[f"base_model.model.{module}.lora_A{mid}.weight"] = A.contiguous()
            tensors[f"base_model.model.{module}.lora_B{mid}.weight"] = B.contiguous()
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    if config:
        cfg = {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": alpha,
            "target_modules": sorted({m.rsplit(".", 1)[-1] for m in factors}),
            "use_rslora": False,
            "fan_in_fan_out": False,
            "rank_pattern": {},
            "alpha_pattern": {},
            "bias": "none",
            **extra,
        }
        (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return path


def random_factors(
    model: nn.Module,
    modules: list[str],
    r: int,
    seed: int = 0,
    scale: float = 0.1,
    dtype: torch.dtype = torch.float32,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Random (B, A) for Linear / Conv2d / Embedding modules of `model` (PEFT shapes)."""
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    out = {}
    for name in modules:
        m = mods[name]
        if isinstance(m, nn.Embedding):
            A = torch.randn(r, m.num_embeddings, generator=g, dtype=torch.float64)
            B = torch.randn(m.embedding_dim, r, generator=g, dtype=torch.float64)
        elif isinstance(m, nn.Conv2d):
            A = torch.randn(r, m.in_channels, *m.kernel_size, generator=g, dtype=torch.float64)
            B = torch.randn(m.out_channels, r, 1, 1, generator=g, dtype=torch.float64)
        else:
            out_f, in_f = m.weight.shape
            if type(m).__name__ == "Conv1D":  # Hugging Face: stored [in, out]
                in_f, out_f = m.weight.shape
            A = torch.randn(r, in_f, generator=g, dtype=torch.float64) / in_f**0.5
            B = torch.randn(out_f, r, generator=g, dtype=torch.float64)
        out[name] = ((B * scale).to(dtype), A.to(dtype))
    return out
