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


class GradientRows:
    """`DecomposedGradients.cat` done as the batches arrive: every block's factors copied
    into tensors sized for all `n` examples, so no batch is kept (its memory is reused by
    the next one) and no second copy is made at the end. `sources` are the whole sample's
    sources from the start, their rows valid up to `count` (e.g. read by a kernel formed
    while capturing, `gmcurv.gram_sum.PanelStream`). Linear blocks only (`start`)."""

    def __init__(self, first: DecomposedGradients, n: int):
        self.n, self.count, self.fisher = n, 0, first.fisher
        self.sources = tuple(
            replace(
                b.source,
                delta=b.source.delta.new_empty(n, *b.source.delta.shape[1:]),
                x=b.source.x.new_empty(n, *b.source.x.shape[1:]),
            )
            for b in first.blocks
        )
        self._blocks = tuple(
            replace(b, source=s) for b, s in zip(first.blocks, self.sources, strict=True)
        )
        self._losses: list[Tensor] = []

    @staticmethod
    def start(first: DecomposedGradients, n: int) -> GradientRows | None:
        """Rows for `n` examples shaped after the `first` batch; None unless every block is
        a `gmcurv.factors.LinearFactors` (other sources are concatenated as usual)."""
        from gmcurv.factors import LinearFactors

        if not first.blocks or not all(isinstance(b.source, LinearFactors) for b in first.blocks):
            return None
        return GradientRows(first, n)

    def add(self, dg: DecomposedGradients) -> None:
        """Copy the next batch's rows."""
        r0, r1 = self.count, self.count + dg.n
        if r1 > self.n:
            raise ValueError(f"more than the {self.n} examples the rows were sized for")
        for full, b in zip(self.sources, dg.blocks, strict=True):
            full.delta[r0:r1].copy_(b.source.delta)  # type: ignore[attr-defined]
            full.x[r0:r1].copy_(b.source.x)  # type: ignore[attr-defined]
        self._losses.append(dg.losses)
        self.count = r1

    def result(self) -> DecomposedGradients:
        """The whole sample (every row added)."""
        if self.count != self.n:
            raise ValueError(f"{self.count} of {self.n} examples added")
        return DecomposedGradients(self._blocks, self.fisher, torch.cat(self._losses))
