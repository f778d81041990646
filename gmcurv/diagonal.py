"""Per-parameter curvature diagonals, for export (EWC penalties, Fisher-weighted merging).

- Fisher (empirical / mc / exact): ``diag F = (1/N) Σ_n Σ_c g[n,c] ⊙ g[n,c]`` from the
  decomposed per-example gradients (`gmcurv.fisher.FisherAccumulator`), exact on the sample
  for the empirical and exact types; the mc type is a Monte Carlo estimate (seeded labels).
- GGN / Hessian: ``diag A ≈ (1/S) Σ_s z_s ⊙ A z_s`` over ``S`` Rademacher probes
  (`gmcurv.stochastic.diagonal`) with per-entry standard errors over the probes.

Both are means over the ``N`` examples of the sample (the loss is a mean), so an EWC
penalty on a task with ``N`` examples is ``(λ/2) Σ_q N·F_qq (θ_q − θ*_q)²`` in the
sum-of-losses convention, or without the ``N`` in the mean-loss one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from gmcurv.data import DataSample
from gmcurv.errors import ConfigError
from gmcurv.objective import Objective

KINDS = ("fisher", "ggn", "hessian")


@dataclass(frozen=True)
class CurvatureDiagonal:
    """``diag A`` in parameter layout, with per-entry standard errors when stochastic."""

    kind: str
    value: dict[str, Tensor]
    stderr: dict[str, Tensor] | None
    n_examples: int
    method: str
    fisher: str | None = None
    mc_samples: int | None = None
    probes: int | None = None
    seed: int = 0


def fisher_diagonal(
    objective: Objective,
    data: DataSample,
    *,
    fisher: str = "empirical",
    mc_samples: int = 1,
    seed: int = 0,
    batch_size: int = 256,
    budget_bytes: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> CurvatureDiagonal:
    """``diag F`` streamed over the data (memory: one batch of factors)."""
    from gmcurv.capture import Capturer, capture_stream
    from gmcurv.fisher import FisherAccumulator

    acc = FisherAccumulator(diagonal=True)
    cap = Capturer(objective, fisher, mc_samples, seed)
    for dg in capture_stream(
        objective, data, batch_size, progress=progress, capturer=cap, budget_bytes=budget_bytes
    ):
        acc.add(dg)
    acc = acc.gathered()
    method = "exact" if fisher != "mc" else f"mc({mc_samples} per example)"
    return CurvatureDiagonal(
        "fisher",
        acc.diag(),
        None,
        acc.n,
        method,
        fisher=fisher,
        mc_samples=mc_samples if fisher == "mc" else None,
        seed=seed,
    )


def stochastic_diagonal(
    objective: Objective,
    data: DataSample,
    kind: str,
    *,
    probes: int = 100,
    seed: int = 0,
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
) -> CurvatureDiagonal:
    """``diag A`` of the GGN or Hessian from `probes` Rademacher probes, with standard errors."""
    from gmcurv.operator import CurvatureOperator
    from gmcurv.stochastic import diagonal

    if kind not in ("ggn", "hessian"):
        raise ConfigError(f"no stochastic diagonal for {kind!r}", hint="use ggn or hessian")
    op = CurvatureOperator(objective, data, batch_size, kind, progress=progress)
    res = diagonal(
        op.matvec, op.size, probes, seed=seed, dtype=objective.dtype, device=objective.device
    )
    value, stderr = res.as_dicts(op.space)
    return CurvatureDiagonal(
        kind, value, stderr, op.n, f"hutchinson-diag({probes} probes)", probes=probes, seed=seed
    )


def curvature_diagonal(
    objective: Objective,
    data: DataSample,
    kind: str,
    *,
    fisher: str = "empirical",
    mc_samples: int = 1,
    probes: int = 100,
    seed: int = 0,
    batch_size: int = 256,
    budget_bytes: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> CurvatureDiagonal:
    """The diagonal of the Fisher (closed form) or of the GGN / Hessian (stochastic)."""
    if kind == "fisher":
        return fisher_diagonal(
            objective,
            data,
            fisher=fisher,
            mc_samples=mc_samples,
            seed=seed,
            batch_size=batch_size,
            budget_bytes=budget_bytes,
            progress=progress,
        )
    if kind in ("ggn", "hessian"):
        return stochastic_diagonal(
            objective,
            data,
            kind,
            probes=probes,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
        )
    raise ConfigError(f"unknown curvature {kind!r}", hint=f"use one of {KINDS}")
