"""The parameter space curvature lives in: an ordered set of named tensors, flattened.

Vectors in this space are flat tensors of length ``P = Σ numel``; `ParamSpace` maps
between that layout and the model's ``{name: tensor}`` layout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ParamSpace:
    """Names and shapes of the parameters curvature is taken with respect to."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, params: Mapping[str, Tensor]) -> ParamSpace:
        return cls(tuple(params), tuple(tuple(p.shape) for p in params.values()))

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def size(self) -> int:
        """P, the total number of scalars."""
        return sum(self.numels)

    def offsets(self) -> dict[str, slice]:
        """Where each parameter sits in a flat vector."""
        out, pos = {}, 0
        for name, k in zip(self.names, self.numels, strict=True):
            out[name] = slice(pos, pos + k)
            pos += k
        return out

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """``{name: tensor}`` -> flat vector (missing names are zeros)."""
        ref = next(iter(tensors.values()))
        parts = [
            tensors[n].reshape(-1) if n in tensors else ref.new_zeros(k)
            for n, k in zip(self.names, self.numels, strict=True)
        ]
        return torch.cat(parts)

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """Flat vector (or ``[..., P]`` batch of them) -> ``{name: tensor}`` views."""
        lead = vector.shape[:-1]
        parts = torch.split(vector, self.numels, dim=-1)  # one op, not a slice per tensor
        return {
            n: t.reshape(*lead, *s) for n, t, s in zip(self.names, parts, self.shapes, strict=True)
        }

    def subset(self, names: list[str] | tuple[str, ...]) -> ParamSpace:
        keep = set(names)
        pairs = [(n, s) for n, s in zip(self.names, self.shapes, strict=True) if n in keep]
        return ParamSpace(tuple(n for n, _ in pairs), tuple(s for _, s in pairs))
