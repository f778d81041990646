"""`Loss`: a per-example loss and the output-space quantities curvature needs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gmcurv.errors import ConfigError

IGNORE_INDEX = -100
FISHER_TYPES = ("empirical", "mc", "exact")


@dataclass(frozen=True)
class Loss:
    """A per-example loss with the output-space quantities curvature needs."""

    name: str

    # -- the loss ---------------------------------------------------------------------------
    def per_example(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``L_n`` for each example, shape ``[N]``."""
        raise NotImplementedError

    def total(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``Σ_n L_n`` (sum over examples: never a 1/N inside the factors)."""
        return self.per_example(outputs, targets).sum()

    def accuracy_counts(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, int] | None:
        """(number correct, number scored) for classification losses, else None."""
        return None

    # -- validation -------------------------------------------------------------------------
    def check(self, outputs_shape: torch.Size, targets: Tensor | None, source: str) -> None:
        """Raise `DataError` if targets do not fit outputs of this shape (shape, dtype, range)."""
        raise NotImplementedError

    def default_targets(self, inputs: object) -> Tensor | None:
        """Targets to use when the data has none (only next-token prediction has them)."""
        return None

    def valid_tokens(self, targets: Tensor) -> Tensor | None:
        """Scored tokens per example, ``[N]``, for per-token losses; None otherwise."""
        return None

    # -- curvature --------------------------------------------------------------------------
    def output_hessian_vp(self, outputs: Tensor, targets: Tensor, v: Tensor) -> Tensor:
        """``Λ_n v_n`` per example: the Hessian of ``L_n`` w.r.t. ``f_n`` applied to ``v``."""
        raise NotImplementedError

    def output_columns(
        self,
        outputs: Tensor,
        targets: Tensor,
        fisher: str,
        mc_samples: int = 1,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Cotangents ``G: [C, *outputs.shape]`` for the chosen Fisher (see module doc).

        For ``mc``, `noise` holds the per-example random draws, ``[N, *noise_shape]``
        (see `noise_spec` and `gmcurv.rng.example_noise`).
        """
        raise NotImplementedError

    def losses_and_columns(
        self,
        outputs: Tensor,
        targets: Tensor,
        fisher: str,
        mc_samples: int = 1,
        noise: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(`per_example` of the detached outputs, `output_columns`) in one call, so a loss
        can share the passes over its outputs (cross-entropy: one log-sum-exp)."""
        losses = self.per_example(outputs.detach(), targets)
        return losses, self.output_columns(outputs, targets, fisher, mc_samples, noise)

    def noise_spec(self, outputs_shape: torch.Size, mc_samples: int) -> tuple[tuple[int, ...], str]:
        """Shape (per example) and kind ('uniform' | 'normal') of the MC noise."""
        raise NotImplementedError

    def n_columns(self, outputs_shape: torch.Size, fisher: str, mc_samples: int) -> int:
        """How many columns `output_columns` will return (for memory preflight)."""
        if fisher == "empirical":
            return 1
        if fisher == "mc":
            return mc_samples
        return self.n_exact_columns(outputs_shape)

    def n_exact_columns(self, outputs_shape: torch.Size) -> int:
        """Columns of the exact Fisher: one per output element of an example."""
        return math.prod(outputs_shape[1:])


def require_noise(noise: Tensor | None) -> Tensor:
    """The per-example noise Monte Carlo columns need (an error when missing)."""
    if noise is None:
        raise ConfigError(
            "Monte Carlo Fisher columns need per-example noise",
            hint="draw it with gmcurv.rng.example_noise (Capturer does this for you)",
        )
    return noise
