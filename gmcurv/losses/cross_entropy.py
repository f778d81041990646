"""Softmax cross-entropy, averaged over an example's valid tokens (`tokens`); its Fisher
columns and output Hessian are `softmax`'s."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from gmcurv.errors import ConfigError
from gmcurv.losses import softmax
from gmcurv.losses.base import FISHER_TYPES, IGNORE_INDEX, Loss, require_noise
from gmcurv.losses.labels import check_labels
from gmcurv.losses.tokens import align, next_token_targets, pad_last, token_weights


@dataclass(frozen=True)
class CrossEntropy(Loss):
    """``L_n = Σ_t w[n,t] CE(f[n,t], y[n,t])`` with ``w = 1/T_n`` on valid tokens."""

    name: str = "cross_entropy"
    shift: bool = False  # next-token prediction: logits[:, :-1] vs targets[:, 1:]

    def per_example(self, outputs: Tensor, targets: Tensor) -> Tensor:
        logits, tgt = align(outputs, targets, self.shift)
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            tgt.reshape(-1),
            reduction="none",
            ignore_index=IGNORE_INDEX,
        ).reshape(tgt.shape)
        w = token_weights(tgt, ce.dtype)
        return (ce * w).reshape(ce.shape[0], -1).sum(1)

    def accuracy_counts(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, int]:
        logits, tgt = align(outputs, targets, self.shift)
        valid = tgt != IGNORE_INDEX
        correct = ((logits.argmax(-1) == tgt) & valid).sum()
        return correct, int(valid.sum())

    def check(self, outputs_shape: torch.Size, targets: Tensor | None, source: str) -> None:
        check_labels(outputs_shape, targets, source, self.name)

    def default_targets(self, inputs: object) -> Tensor | None:
        """Next-token targets (`tokens.next_token_targets`); None for plain classification."""
        return next_token_targets(inputs) if self.shift else None

    def valid_tokens(self, targets: Tensor) -> Tensor | None:
        """``T_n``: the targets ``!= -100`` each example scores (after the shift); None
        for one label per example."""
        if targets.ndim < 2:
            return None
        _, tgt = align(targets, targets, self.shift)
        return (tgt != IGNORE_INDEX).reshape(tgt.shape[0], -1).sum(1)

    def output_hessian_vp(self, outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        logits, tgt = align(outputs, targets, self.shift)
        p = logits.softmax(-1)
        w = token_weights(tgt, p.dtype).unsqueeze(-1)
        hv = softmax.hessian_vp(p, w, v[:, :-1] if self.shift else v)
        return pad_last(hv) if self.shift else hv

    def noise_spec(self, outputs_shape: torch.Size, mc_samples: int) -> tuple[tuple[int, ...], str]:
        tokens = tuple(outputs_shape[1:-1])
        if self.shift and tokens:
            tokens = (tokens[0] - 1, *tokens[1:])
        return (mc_samples, *tokens), "uniform"

    def output_columns(
        self,
        outputs: Tensor,
        targets: Tensor,
        fisher: str,
        mc_samples: int = 1,
        noise: Tensor | None = None,
    ) -> Tensor:
        logits, tgt = align(outputs.detach(), targets, self.shift)
        p = logits.softmax(-1)
        w = token_weights(tgt, p.dtype).unsqueeze(-1)  # [N, *tok, 1]
        if fisher == "empirical":
            cols = softmax.empirical_columns(p, tgt, w)
        elif fisher == "mc":
            noise = require_noise(noise)
            if self.shift:  # written straight into the padded buffer
                full = p.new_zeros(noise.shape[1], *outputs.shape)
                softmax.mc_columns(p, w, noise, mc_samples, full[:, :, :-1])
                return full
            cols = softmax.mc_columns(p, w, noise, mc_samples)
        elif fisher == "exact":
            cols = softmax.exact_columns(p, w)
        else:
            raise ConfigError(f"unknown Fisher type {fisher!r}", hint=f"use one of {FISHER_TYPES}")
        if self.shift:  # a zero cotangent for the last position (one copy)
            out = cols.new_zeros(*cols.shape[:2], cols.shape[2] + 1, *cols.shape[3:])
            out[:, :, :-1] = cols
            cols = out
        return cols

    def losses_and_columns(
        self,
        outputs: Tensor,
        targets: Tensor,
        fisher: str,
        mc_samples: int = 1,
        noise: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Empirical Fisher: from one log-sum-exp ``ℓ`` over the classes, the losses
        ``Σ_t w (ℓ - f_y)`` and the columns ``w (exp(f - ℓ) - e_y)``, written straight into
        the (padded) output buffer — about half the passes over a vocabulary-sized output
        of `per_example` and `output_columns` apart; other Fisher types: those two."""
        if fisher != "empirical":
            return super().losses_and_columns(outputs, targets, fisher, mc_samples, noise)
        out = outputs.detach()
        logits, tgt = align(out, targets, self.shift)
        lse = torch.logsumexp(logits, -1)
        w = token_weights(tgt, out.dtype)
        y = tgt.clamp_min(0).unsqueeze(-1)
        ce = torch.where(tgt != IGNORE_INDEX, lse - logits.gather(-1, y).squeeze(-1), 0.0)
        losses = (ce * w).reshape(ce.shape[0], -1).sum(1)
        full = out.new_empty(1, *out.shape)
        cols = full[0, :, :-1] if self.shift else full[0]
        torch.sub(logits, lse.unsqueeze(-1), out=cols)
        cols.exp_().mul_(w.unsqueeze(-1))
        cols.scatter_add_(-1, y, -w.unsqueeze(-1))
        if self.shift:  # the last position predicts nothing
            full[0, :, -1] = 0.0
        return losses, full

    def n_exact_columns(self, outputs_shape: torch.Size) -> int:
        n_tok = math.prod(outputs_shape[1:-1]) - (1 if self.shift else 0)
        return n_tok * outputs_shape[-1]
