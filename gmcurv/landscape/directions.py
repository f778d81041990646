"""Directions of a landscape, each a ``{name: tensor}`` over the objective's parameters.

- ``random``: Gaussian directions, filter-normalised (Li et al., 2018, "Visualizing the Loss
  Landscape of Neural Nets"): every filter of a weight tensor (row of a Linear weight =
  output neuron, output channel of a Conv weight, dimension 0 in general) is rescaled to the
  norm of the same filter of the weights. Biases and other 1-D parameters (norm scales and
  shifts) are zeroed, or — with ``include_bias`` — rescaled as a whole to the parameter's norm.
- ``eigen``: the top Hessian eigenvectors (unit norm, no normalisation), from
  `gmcurv.hessian.top_eigen`. Along a unit eigenvector ``v`` with eigenvalue ``λ`` the slice is
  ``L(a) ≈ L0 + (g·v) a + ½ λ a²``, so the fitted curvature ``2 c2`` approximates ``λ``.
- ``checkpoint``: ``d_i = θ_i - θ0`` for other checkpoints of the same architecture (their
  parameters are loaded by the I/O layer and handed in), so ``α = 1`` (or ``β = 1``) *is*
  that checkpoint: linear interpolation (1-D) or the plane through three checkpoints (2-D).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from gmcurv.data import DataSample
from gmcurv.errors import CheckpointError, ConfigError
from gmcurv.estimate import Estimate
from gmcurv.objective import Objective

ProgressFn = Callable[[float], None]
Direction = dict[str, Tensor]

NORMALISATIONS = ("filter", "eigen", "none")


def is_filter_param(t: Tensor) -> bool:
    """Weight tensors with filters (ndim >= 2); 1-D tensors are biases / norm parameters."""
    return t.ndim >= 2


def filter_normalize(
    direction: Mapping[str, Tensor], weights: Mapping[str, Tensor], include_bias: bool = False
) -> Direction:
    """Li et al. filter normalisation of `direction` against `weights`.

    Filter ``i`` (index along dimension 0) of every tensor with ``ndim >= 2`` gets the norm of
    filter ``i`` of the weight; 1-D tensors are zeroed, or with `include_bias` rescaled to the
    weight's norm as a whole.
    """
    out: Direction = {}
    for name, d in direction.items():
        w = weights[name].to(d.dtype)
        if is_filter_param(w):
            dn = d.reshape(d.shape[0], -1).norm(dim=1)
            wn = w.reshape(w.shape[0], -1).norm(dim=1)
            out[name] = d * _ratio(wn, dn).reshape(-1, *([1] * (d.ndim - 1)))
        elif include_bias:
            out[name] = d * _ratio(w.norm(), d.norm())
        else:
            out[name] = torch.zeros_like(d)
    return out


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, 0 where ``den`` is 0 (a zero filter of the direction stays zero)."""
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0)


def random_directions(
    weights: Mapping[str, Tensor], n: int, seed: int = 0, include_bias: bool = False
) -> list[Direction]:
    """`n` filter-normalised Gaussian directions (drawn in float64 from a local generator, in
    parameter order, so they do not depend on the compute dtype or device)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        raw = {
            k: torch.randn(w.shape, generator=gen, dtype=torch.float64) for k, w in weights.items()
        }
        w64 = {k: w.detach().to("cpu", torch.float64) for k, w in weights.items()}
        d = filter_normalize(raw, w64, include_bias)
        out.append({k: v.to(weights[k].device, weights[k].dtype) for k, v in d.items()})
    if all(float(sum(v.norm() ** 2 for v in d.values())) == 0.0 for d in out):
        raise ConfigError(
            "the random directions are zero: every selected parameter is a bias or 1-D "
            "(normalisation) parameter, which filter normalisation leaves out",
            hint="add --include-bias, or select weight matrices with --layers",
        )
    return out


def checkpoint_directions(
    center: Mapping[str, Tensor], others: Sequence[Mapping[str, Tensor]], names: Sequence[str]
) -> list[Direction]:
    """``θ_i - θ0`` for each other checkpoint (`names` label them in errors)."""
    out = []
    for other, label in zip(others, names, strict=True):
        missing = [k for k in center if k not in other]
        if missing:
            raise CheckpointError(
                f"--to {label}: no parameter {missing[0]} (the centre model has it)",
                hint="--to needs checkpoints of the same architecture as MODEL",
            )
        bad = [
            f"{k}: {tuple(other[k].shape)} vs {tuple(c.shape)}"
            for k, c in center.items()
            if tuple(other[k].shape) != tuple(c.shape)
        ]
        if bad:
            raise CheckpointError(
                f"--to {label}: parameter shapes differ from MODEL's ({'; '.join(bad[:3])})",
                hint="--to needs checkpoints of the same architecture as MODEL",
            )
        d = {k: other[k].detach().to(c.device, c.dtype) - c.detach() for k, c in center.items()}
        if float(sum(v.norm() ** 2 for v in d.values())) == 0.0:
            raise ConfigError(
                f"--to {label}: the checkpoint equals MODEL, so the direction is zero",
                hint="interpolate towards a different checkpoint",
            )
        out.append(d)
    if len(out) == 2:
        a, b = (torch.cat([v.reshape(-1).double() for v in d.values()]) for d in out)
        cos = float(a @ b / (a.norm() * b.norm()))
        if abs(cos) > 1 - 1e-9:
            raise ConfigError(
                f"--to {names[0]} and --to {names[1]}: the three checkpoints lie on one "
                "line, so they span no plane",
                hint="use a single --to for a 1-D interpolation",
            )
    return out


def eigen_directions(
    objective: Objective,
    data: DataSample,
    n: int,
    *,
    batch_size: int = 256,
    seed: int = 0,
    tol: float = 1e-3,
    budget_bytes: int | None = None,
    progress: ProgressFn | None = None,
    phase: Callable[[str, int | None], None] | None = None,
) -> tuple[list[Direction], list[Estimate], str, list[str]]:
    """The top-`n` Hessian eigenvectors (unit norm) with their eigenvalues and method
    (`progress`, `phase`: as `gmcurv.hessian.top_eigen`'s)."""
    from gmcurv.hessian import top_eigen

    s = top_eigen(
        objective,
        data,
        "hessian",
        n,
        method="auto",
        tol=tol,
        seed=seed,
        vectors=True,
        batch_size=batch_size,
        budget_bytes=budget_bytes,
        progress=progress,
        phase=phase,
    )
    assert s.vectors is not None
    device, dtype = objective.device, objective.dtype
    dirs = [{k: v.to(device, dtype) for k, v in vec.items()} for vec in s.vectors]
    return dirs, s.values, s.method, s.notes


def direction_norm(d: Mapping[str, Tensor]) -> float:
    return math.sqrt(sum(float(v.double().norm() ** 2) for v in d.values()))
