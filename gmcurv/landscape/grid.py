"""The grid of a landscape: ``--range LOW:HIGH`` and evenly spaced axes."""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from gmcurv.errors import ConfigError


def parse_range(text: str) -> tuple[float, float]:
    """``"-1:1"`` -> ``(-1.0, 1.0)``; the low end must be below the high end."""
    m = re.fullmatch(r"\s*([^:]+?)\s*:\s*([^:]+?)\s*", str(text))
    lo = hi = None
    if m:
        try:
            lo, hi = float(m[1]), float(m[2])
        except ValueError:
            lo = hi = None
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        raise ConfigError(
            f"--range {text!r}: expected LOW:HIGH with two numbers",
            hint="e.g. --range -1:1 (or --range=-1:1)",
        )
    if not (math.isfinite(hi - lo) and max(abs(lo), abs(hi)) <= 1e6):
        raise ConfigError(
            f"--range {text!r}: coordinates are multiples of the direction norms; "
            "beyond ±1e6 the perturbation swamps the weights",
            hint="e.g. --range -1:1 (or --range -10:10 for a wide view)",
        )
    if not lo < hi:
        raise ConfigError(
            f"--range {text!r}: the low end {lo:g} must be below the high end {hi:g}",
            hint=f"write --range {min(lo, hi):g}:{max(lo, hi):g}"
            if lo != hi
            else "give an interval, e.g. --range -1:1",
        )
    return lo, hi


def grid_axis(lo: float, hi: float, steps: int) -> Tensor:
    """``steps`` evenly spaced coordinates from `lo` to `hi` (float64)."""
    if steps < 3:
        raise ConfigError(
            f"--steps {steps}: a landscape needs at least 3 points per axis",
            hint="e.g. --steps 41 (odd counts put a grid point on the centre)",
        )
    axis = torch.linspace(lo, hi, steps, dtype=torch.float64)
    axis[axis.abs() <= 1e-12 * (hi - lo)] = 0.0  # the centre exactly, not 1e-17 beside it
    return axis
