"""Captured per-example gradients: blocks of parameters and their decomposed sources."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from gmcurv.factors import (
    GradientSource,
)


@dataclass(frozen=True)
class Block:
    """One block's per-example gradients (see `gmcurv.factors`)."""

    name: str
    kind: str
    source: GradientSource

    @property
    def params(self) -> tuple[str, ...]:
        return self.source.names

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return self.source.shapes

    @property
    def dim(self) -> int:
        return self.source.dim


@dataclass(frozen=True)
class DecomposedGradients:
    """Per-example, per-column gradients of every selected parameter, block by block.

    ``F = (1/N) Σ_n Σ_c g[n,c] g[n,c]^T`` over the concatenation of all blocks.
    """

    blocks: tuple[Block, ...]
    fisher: str
    losses: Tensor  # [N] per-example loss

    @property
    def n(self) -> int:
        return int(self.losses.shape[0])

    @property
    def columns(self) -> int:
        return self.blocks[0].source.columns if self.blocks else 1

    @property
    def n_params(self) -> int:
        return sum(b.dim for b in self.blocks)

    def select(self, index: Tensor) -> DecomposedGradients:
        """Restrict to examples `index`."""
        blocks = tuple(replace(b, source=b.source.select(index)) for b in self.blocks)
        return replace(self, blocks=blocks, losses=self.losses[index])

    @staticmethod
    def cat(parts: Sequence[DecomposedGradients]) -> DecomposedGradients:
        """Concatenate batches along examples."""
        first = parts[0]
        if len(parts) == 1:
            return first
        blocks = tuple(
            replace(group[0], source=type(group[0].source).cat([b.source for b in group]))
            for group in zip(*[p.blocks for p in parts], strict=True)
        )
        return replace(first, blocks=blocks, losses=torch.cat([p.losses for p in parts]))
