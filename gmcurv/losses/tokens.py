"""Per-token bookkeeping of sequence losses: alignment, token weights, padding.

A per-token loss is averaged over an example's valid tokens (targets ``!= -100``):
``L_n = Σ_t w[n,t] ℓ[n,t]`` with ``w[n,t] = 1 / T_n`` on valid tokens, 0 elsewhere. Next-token
prediction (``shift``) compares ``logits[:, :-1]`` with ``targets[:, 1:]``; the last
position predicts nothing and gets a zero cotangent.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gmcurv.losses.base import IGNORE_INDEX


def align(outputs: Tensor, targets: Tensor, shift: bool) -> tuple[Tensor, Tensor]:
    """Outputs and the targets they predict (shifted by one token for next-token loss)."""
    if shift:
        return outputs[:, :-1], targets[:, 1:]
    return outputs, targets


def token_weights(targets: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``w[n, t] = 1 / (#valid tokens of n)`` on valid tokens, 0 on ignored ones."""
    valid = (targets != IGNORE_INDEX).to(dtype or torch.get_default_dtype())
    flat = valid.reshape(valid.shape[0], -1)
    count = flat.sum(1).clamp_min(1.0)
    return (flat / count[:, None]).reshape(valid.shape)


def pad_last(x: Tensor) -> Tensor:
    """Append a zero cotangent for the last position, which predicts nothing."""
    return torch.cat([x, x.new_zeros((*x.shape[:1], 1, *x.shape[2:]))], dim=1)


def next_token_targets(inputs: object) -> Tensor | None:
    """The input ids, ``-100`` where an ``attention_mask`` is 0 (padding predicts nothing,
    as Hugging Face's language-modelling collator sets it); None without integer ids."""
    ids = inputs.get("input_ids") if isinstance(inputs, dict) else inputs
    if not isinstance(ids, Tensor) or ids.is_floating_point():
        return None
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if isinstance(mask, Tensor) and mask.shape == ids.shape:
        return ids.masked_fill(mask == 0, IGNORE_INDEX)
    return ids
