"""Per-example random streams: the draws for example ``i`` depend only on ``(seed, i)``.

So Monte Carlo quantities do not change with ``--batch-size``, with the order batches are
processed in, or with how examples are split across distributed ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant (splitmix64)
_MASK = (1 << 63) - 1


def example_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for example `index` under the global `seed`."""
    z = (seed * _MIX + (index + 1) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK


def example_noise(
    seed: int,
    start: int,
    n: int,
    shape: tuple[int, ...],
    kind: str,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Tensor:
    """``[n, *shape]`` draws (``kind`` 'uniform' on [0, 1) or 'normal') for examples
    ``start .. start+n-1``."""
    gen = torch.Generator(device="cpu")
    draw = torch.rand if kind == "uniform" else torch.randn
    rows = []
    for i in range(start, start + n):
        gen.manual_seed(example_seed(seed, i))
        rows.append(draw(shape, generator=gen, dtype=torch.float64))
    return torch.stack(rows).to(device=device, dtype=dtype)
