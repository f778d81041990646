"""Per-example gradients stored as is (norm layers, parameters of other modules)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from gmcurv.factors.source import GradientSource


@dataclass(frozen=True)
class DenseGradients(GradientSource):
    """Explicit per-example gradients ``g: [N, C, D]`` (parameters concatenated, flattened)."""

    g: Tensor

    @property
    def n(self) -> int:
        return self.g.shape[0]

    @property
    def columns(self) -> int:
        return self.g.shape[1]

    @property
    def device(self) -> torch.device:
        return self.g.device

    @property
    def dtype(self) -> torch.dtype:
        return self.g.dtype

    def flat(self, rows: slice) -> Tensor:
        return self.g[rows]

    def materialize(self, rows: slice) -> dict[str, Tensor]:
        g = self.g[rows]
        out, pos = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            k = math.prod(shape)
            out[name] = g[..., pos : pos + k].reshape(*g.shape[:2], *shape)
            pos += k
        return out

    def row_chunks(self) -> Iterator[slice]:
        yield slice(0, self.n)

    def select(self, index: Tensor) -> DenseGradients:
        return replace(self, g=self.g[index])

    @classmethod
    def cat(cls, parts: Sequence[GradientSource]) -> DenseGradients:
        return replace(parts[0], g=torch.cat([p.g for p in parts]))  # type: ignore[attr-defined]
