"""The ``landscape`` results block: the grid, the centre, the sharpness along each direction
and what is read off them (plain values and `Estimate`s, ready for the report)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import Tensor

from gmcurv.estimate import Estimate
from gmcurv.landscape.directions import is_filter_param
from gmcurv.landscape.fit import FIT_POINTS, QuadraticFit
from gmcurv.landscape.slices import Landscape


def grid_bytes(steps: int, dims: int) -> int:
    """Memory of the grid's results: coordinates, losses, accuracies and counts (float64)."""
    return (steps**dims) * 8 * (dims + 4)


def n_points(steps: int, dims: int, extra: int = 0) -> int:
    """Points a landscape evaluates: the grid, the centre, each direction's fit stencil and
    `extra` points."""
    return steps**dims + 1 + dims * len(FIT_POINTS) + extra


def fixed_parameters(params: Mapping[str, Tensor]) -> list[str]:
    """Parameters filter normalisation leaves fixed (biases and 1-D parameters)."""
    return [n for n, p in params.items() if not is_filter_param(p)]


def _extreme(loss: np.ndarray, axes: list[list[float]], fn) -> dict[str, Any]:
    """The grid point of the lowest / highest loss (`fn` = argmin / argmax), with its
    coordinates."""
    idx = tuple(int(i) for i in np.unravel_index(int(fn(loss)), loss.shape))
    point: dict[str, Any] = {"loss": float(loss[idx])}
    for name, ax, i in zip(("alpha", "beta"), axes, idx, strict=False):
        point[name] = ax[i]
    return point


def _direction_info(
    fit: QuadraticFit,
    k: int,
    *,
    kind: str,
    normalisation: str,
    norm: float,
    eigenvalues: list[Estimate] | None,
    eigen_method: str | None,
    endpoints: list[str] | None,
    extra_loss: Tensor | None,
) -> dict[str, Any]:
    """One direction: its norm, the fitted curvature per unit norm² (``2 c2 / ||d||²``), the
    slope ``c1`` and, as it applies, the eigenvalue (with ``(2 c2 - λ)/|λ|``) or the
    checkpoint it points to (with that checkpoint's loss)."""
    info: dict[str, Any] = {
        "kind": kind,
        "normalisation": normalisation,
        "norm": norm,
        "curvature_per_unit_norm": fit.curvature / norm**2 if norm > 0 else None,
        "slope": fit.c1,
        "eigenvalue": None,
        "checkpoint": None,
    }
    if eigenvalues is not None:
        lam = eigenvalues[k]
        info["eigenvalue"] = lam
        info["eigen_method"] = eigen_method
        info["relative_difference"] = (
            (fit.curvature - lam.value) / abs(lam.value) if lam.value != 0 else None
        )
    if endpoints is not None:
        info["checkpoint"] = endpoints[k]
        assert extra_loss is not None
        info["checkpoint_loss"] = float(extra_loss[k])
    return info


def landscape_block(
    res: Landscape,
    *,
    kind: str,
    normalisation: str,
    include_bias: bool,
    seed: int,
    lo: float,
    hi: float,
    steps: int,
    norms: list[float],
    eigenvalues: list[Estimate] | None,
    eigen_method: str | None,
    endpoints: list[str] | None,
) -> dict[str, Any]:
    """The ``landscape`` results block (see ``gmcurv landscape --help``)."""
    names = [f"d{k + 1}" for k in range(len(norms))]
    n = res.n
    loss = res.loss.numpy()
    axes = [res.alphas.tolist()] + ([] if res.betas is None else [res.betas.tolist()])
    sharpness, directions = {}, {}
    for k, (name, fit) in enumerate(zip(names, res.fits, strict=True)):
        method = f"quadratic-fit({len(FIT_POINTS)} points, t in ±{fit.halfwidth:.4g})"
        sharpness[name] = Estimate(fit.curvature, fit.stderr, n, method, True)
        directions[name] = _direction_info(
            fit, k, kind=kind, normalisation=normalisation, norm=norms[k],
            eigenvalues=eigenvalues, eigen_method=eigen_method, endpoints=endpoints,
            extra_loss=res.extra_loss,
        )  # fmt: skip
    acc = res.center_accuracy
    return {
        "dimensions": len(names),
        "directions_kind": kind,
        "normalisation": normalisation,
        "include_bias": include_bias,
        "seed": seed,
        "range": [lo, hi],
        "steps": steps,
        "spacing": (hi - lo) / (steps - 1),
        "directions": directions,
        "center": {
            "loss": Estimate.exact_value(res.center_loss, n, "exact"),
            "accuracy": None if acc is None else Estimate.exact_value(acc, n, "exact"),
        },
        "sharpness": sharpness,
        "min": _extreme(loss, axes, np.argmin),
        "max": _extreme(loss, axes, np.argmax),
        "grid": {
            "alphas": res.alphas.tolist(),
            "betas": None if res.betas is None else res.betas.tolist(),
            "loss": loss.tolist(),
            "accuracy": None if res.accuracy is None else res.accuracy.tolist(),
            "layout": "loss[i][j] = L(θ0 + alphas[i] d1 + betas[j] d2)",
        },
        "n_points": res.n_points,
        "chunk": res.chunk,
        "vmapped": res.vmapped,
        "evaluation": res.mode,
    }
