"""A 1-D or 2-D loss slice ``L(θ0 + α d1 + β d2)`` on a grid, with the centre, the sharpness
fit of each direction and any extra points evaluated in the same pass."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gmcurv.batch import batch_size_of
from gmcurv.data import DataSample
from gmcurv.landscape.fit import FIT_POINTS, QuadraticFit, fit_stencils, quadratic_fit
from gmcurv.landscape.points import ProgressFn, evaluate_points
from gmcurv.objective import Objective


@dataclass
class Landscape:
    """A 1-D or 2-D slice and what is read off it."""

    alphas: Tensor  # [S1]
    betas: Tensor | None  # [S2] (None for 1-D)
    loss: Tensor  # [S1] or [S1, S2]: loss[i, j] = L(θ0 + alphas[i] d1 + betas[j] d2)
    accuracy: Tensor | None
    center_loss: float
    center_accuracy: float | None
    fits: list[QuadraticFit]
    n: int
    n_points: int
    chunk: int
    vmapped: bool
    fit_coords: Tensor = field(repr=False)  # [K, 5] stencil per direction
    fit_loss: Tensor = field(repr=False)  # [K, 5]
    extra_loss: Tensor | None = None  # at the `extra` coordinates, if any
    mode: str = "vmap"  # how points were batched: 'stacked', 'vmap' or 'loop'


def landscape(
    objective: Objective,
    data: DataSample,
    directions: Sequence[Mapping[str, Tensor]],
    alphas: Tensor,
    betas: Tensor | None = None,
    *,
    batch_size: int = 256,
    budget_bytes: int | None = None,
    chunk: int | None = None,
    progress: ProgressFn | None = None,
    extra: Tensor | None = None,
) -> Landscape:
    """Evaluate the grid (1-D with one direction, 2-D with two), the centre, the
    five-point stencil of each direction's quadratic fit and any `extra` points ``[E, K]``
    (e.g. the ``--to`` checkpoints themselves) in one pass."""
    K = len(directions)
    if K not in (1, 2) or (K == 2) != (betas is not None):
        raise ValueError("one direction with alphas, or two with alphas and betas")
    axes = [alphas.double()] + ([betas.double()] if betas is not None else [])
    grid = axes[0].unsqueeze(1) if K == 1 else torch.cartesian_prod(*axes)
    stencils = fit_stencils(axes)
    extras = [extra.double().reshape(-1, K)] if extra is not None else []
    coords = torch.cat([grid, torch.zeros(1, K, dtype=torch.float64), *_on_axes(stencils), *extras])
    values = evaluate_points(
        objective, data, directions, coords,
        batch_size=batch_size, budget_bytes=budget_bytes, chunk=chunk, progress=progress,
    )  # fmt: skip
    G, shape = grid.shape[0], tuple(len(ax) for ax in axes)
    F = G + 1 + K * len(FIT_POINTS)  # grid, centre, stencils, then the extra points
    acc = values.accuracy
    fit_loss = values.loss[G + 1 : F].reshape(K, len(FIT_POINTS))
    return Landscape(
        alphas=axes[0],
        betas=axes[1] if K == 2 else None,
        loss=values.loss[:G].reshape(shape),
        accuracy=acc[:G].reshape(shape) if acc is not None else None,
        center_loss=float(values.loss[G]),
        center_accuracy=float(acc[G]) if acc is not None else None,
        fits=[quadratic_fit(stencils[k], fit_loss[k]) for k in range(K)],
        n=values.n,
        n_points=coords.shape[0],
        chunk=values.chunk,
        vmapped=values.vmapped,
        fit_coords=torch.stack(stencils),
        fit_loss=fit_loss,
        extra_loss=values.loss[F:] if extra is not None else None,
        mode=values.mode,
    )


def _on_axes(stencils: list[Tensor]) -> list[Tensor]:
    """Stencil `k` as points ``[len, K]`` along direction `k` (other coordinates 0)."""
    out = []
    for k, t in enumerate(stencils):
        rows = torch.zeros(len(t), len(stencils), dtype=torch.float64)
        rows[:, k] = t
        out.append(rows)
    return out


def mean_loss(objective: Objective, data: DataSample, batch_size: int = 256) -> float:
    """The plain mean loss at the model's own weights (reference for the centre)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in data.batches(batch_size, objective.device, objective.dtype):
            total += float(objective.per_example_loss(batch).double().sum())
            n += batch_size_of(batch.inputs)
    return total / n
