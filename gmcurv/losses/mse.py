"""Mean squared error: ``L_n = (1/E) Σ_e (f_ne - y_ne)²`` over an example's ``E`` outputs.

Output Hessian ``Λ = (2/E) I``; the exact Fisher's square root is ``sqrt(2/E) I`` (one
column per output element); Monte Carlo targets ``y ~ N(f, (E/2) I)``, the likelihood whose
negative log is the loss, give columns ``-sqrt(2/E) ε`` with ``ε`` standard normal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gmcurv.errors import ConfigError, DataError
from gmcurv.losses.base import FISHER_TYPES, Loss, require_noise


@dataclass(frozen=True)
class MeanSquaredError(Loss):
    """Squared error averaged over each example's ``E`` output elements."""

    name: str = "mse"

    @staticmethod
    def _elements(outputs: Tensor) -> int:
        return math.prod(outputs.shape[1:])

    def per_example(self, outputs: Tensor, targets: Tensor) -> Tensor:
        diff = (outputs - targets.to(outputs.dtype)).reshape(outputs.shape[0], -1)
        return diff.pow(2).mean(1)

    def check(self, outputs_shape: torch.Size, targets: Tensor | None, source: str) -> None:
        if targets is None:
            raise DataError(
                f"{source}: no targets found, but the loss mse needs them",
                hint="store regression targets under 'targets' (or 'y')",
            )
        if targets.shape != outputs_shape:
            if targets.numel() == math.prod(outputs_shape):
                return  # reshaped by the objective (e.g. [N] vs [N, 1])
            raise DataError(
                f"{source}: targets have shape {tuple(targets.shape)}, but the model's outputs "
                f"have shape {tuple(outputs_shape)}",
                hint="mse needs one target value per model output",
            )

    def output_hessian_vp(self, outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        return (2.0 / self._elements(outputs)) * v

    def noise_spec(self, outputs_shape: torch.Size, mc_samples: int) -> tuple[tuple[int, ...], str]:
        return (mc_samples, *outputs_shape[1:]), "normal"

    def output_columns(
        self,
        outputs: Tensor,
        targets: Tensor,
        fisher: str,
        mc_samples: int = 1,
        noise: Tensor | None = None,
    ) -> Tensor:
        out = outputs.detach()
        e = self._elements(out)
        if fisher == "empirical":
            return ((2.0 / e) * (out - targets.to(out.dtype))).unsqueeze(0)
        if fisher == "mc":
            # targets ~ N(f, (E/2) I), the likelihood whose NLL is the loss; the gradient is
            # (2/E)(f - y) = -sqrt(2/E) ε with ε standard normal.
            noise = require_noise(noise)
            eps = noise.to(out.dtype).movedim(1, 0)  # [k, N, *out]
            return -math.sqrt(2.0 / e) * eps / math.sqrt(mc_samples)
        if fisher == "exact":
            eye = torch.eye(e, dtype=out.dtype, device=out.device) * math.sqrt(2.0 / e)
            cols = eye.reshape(e, 1, *out.shape[1:]).expand(e, out.shape[0], *out.shape[1:])
            return cols.contiguous()
        raise ConfigError(f"unknown Fisher type {fisher!r}", hint=f"use one of {FISHER_TYPES}")
