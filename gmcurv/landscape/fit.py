"""Sharpness along a direction: a least-squares parabola through points around the centre.

``c0 + c1 t + c2 t²`` fitted to the five points ``t ∈ {-2h, -h, 0, h, 2h}`` with
``h = FIT_STEP · (high - low)`` (half a percent of the grid's range: local, yet far above
float32 round-off); the curvature is ``2 c2``, with its standard error from the fit residual.
On a ReLU network the kinks the slice crosses add to the fitted curvature, so it sits
somewhat above the Hessian eigenvalue; on a smooth loss the two agree as ``h -> 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

FIT_POINTS = (-2, -1, 0, 1, 2)  # stencil of the quadratic fit, in units of FIT_STEP · range
FIT_STEP = 0.005  # stencil spacing as a fraction of the grid's range (±1% of it in all)


@dataclass(frozen=True)
class QuadraticFit:
    """``c0 + c1 t + c2 t²`` by least squares; ``curvature = 2 c2`` with its standard error."""

    c0: float
    c1: float
    c2: float
    curvature: float
    stderr: float | None
    halfwidth: float


def quadratic_fit(t: Tensor, y: Tensor) -> QuadraticFit:
    """Least squares ``y ≈ c0 + c1 t + c2 t²``; the stderr of ``2 c2`` is
    ``2 sqrt(σ² [(AᵀA)⁻¹]₂₂)`` with ``σ²`` the residual variance (None without residual dof)."""
    t, y = t.double(), y.double()
    A = torch.stack([torch.ones_like(t), t, t * t], dim=1)
    sol = torch.linalg.lstsq(A, y.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    dof = len(t) - 3
    stderr = None
    if dof > 0:
        resid = y - A @ sol
        sigma2 = float(resid @ resid) / dof
        cov = sigma2 * torch.linalg.inv(A.T @ A)
        stderr = 2 * math.sqrt(max(float(cov[2, 2]), 0.0))
    c0, c1, c2 = (float(v) for v in sol)
    return QuadraticFit(c0, c1, c2, 2 * c2, stderr, float(t.abs().max()))


def fit_stencils(axes: list[Tensor]) -> list[Tensor]:
    """The stencil ``FIT_POINTS · h`` of each axis, ``h = FIT_STEP · (high - low)``."""
    stencil = torch.tensor(FIT_POINTS, dtype=torch.float64)
    return [stencil * (FIT_STEP * float(ax[-1] - ax[0])) for ax in axes]
