"""Curvature at the current weights: what the saliency criteria and the OBS update need.

One capture pass of per-example gradients ``J`` (``n`` examples x ``P`` weights, ``F =
JᵀJ/n``, of the chosen Fisher type) gives, on demand:

- ``fisher_diag``: ``F_qq = Σ_i J_iq² / n`` (OBD);
- ``inverse``: the damped inverse ``(F + eps I)⁻¹`` with ``eps = damping · tr(F)/P``, applied
  through the ``n x n`` Woodbury kernel ``K + n eps I`` (``K = J Jᵀ``, per layer block or
  whole), and its diagonal (OBS saliency) — `gmcurv.woodbury.DampedFisher`;
- ``kernel``: the captured factors kept for an OBS update after removal.

``hessian`` is separate: ``diag H ≈ mean_s z_s ⊙ H z_s`` over Rademacher probes ``z_s``
(Bekas, Kokiopoulou & Saad 2007), with per-entry standard errors.

The kernels are float64 ``(rows x rows)`` with ``rows = n · columns``: ``A`` and its
Cholesky factor per group (plus two for the global solve), checked against the memory
budget before anything is captured.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from gmcurv import distributed
from gmcurv.capture import DecomposedGradients, capture_all, plan_capture
from gmcurv.capture.budget import CaptureEstimate, preflight_capture
from gmcurv.data import DataSample
from gmcurv.errors import UnsupportedError
from gmcurv.fisher import fisher_diagonal
from gmcurv.memory import preflight
from gmcurv.objective import Objective
from gmcurv.woodbury import DEFAULT_DAMPING, DampedFisher, default_eps

ProgressFn = Callable[[int], None]
PhaseFn = Callable[[str, "int | None"], None]  # the next phase starts: (label, units or None)


def announcer(phase: PhaseFn | None) -> PhaseFn:
    """`phase`, or a no-op."""
    return phase or (lambda label, total: None)


@dataclass
class Curvature:
    """What the criteria need at the current weights (only the parts asked for)."""

    dg: DecomposedGradients | None = None
    eps: float | None = None
    fisher_diag: dict[str, Tensor] | None = None
    inverse: DampedFisher | None = None
    inverse_diag: dict[str, Tensor] | None = None
    hessian_diag: dict[str, Tensor] | None = None
    hessian_stderr: dict[str, Tensor] | None = None
    probes: int = 0


def kernel_bytes(rows: int, groups: int) -> int:
    """Float64 memory of the Woodbury kernels: ``A`` and its Cholesky factor per group."""
    return (2 * groups + 2) * rows * rows * 8


def curvature_at(
    objective: Objective,
    data: DataSample,
    needs: set[str],
    *,
    fisher: str = "empirical",
    mc_samples: int = 1,
    damping: float = DEFAULT_DAMPING,
    structure: str = "block",
    removed: Mapping[str, Tensor] | None = None,
    batch_size: int = 256,
    seed: int = 0,
    probes: int = 32,
    budget_bytes: int | None = None,
    progress: ProgressFn | None = None,
    phase: PhaseFn | None = None,
) -> Curvature:
    """Capture gradients at the objective's current weights and derive what `needs` lists:
    ``fisher_diag`` (OBD), ``inverse`` (OBS saliency), ``kernel`` (factors kept for an OBS
    update), ``hessian`` (Hessian diagonal). `phase(label, total)` announces each step,
    `progress(k)` counts its units (examples, kernel groups and blocks, products)."""
    announce = announcer(phase)
    curv = Curvature()
    if needs & {"fisher_diag", "inverse", "kernel"}:
        est = preflight_capture(
            objective, data, batch_size, fisher, mc_samples, budget_bytes, keep=True
        )
        if needs & {"inverse", "kernel"}:
            _preflight_kernels(objective, data, est, structure, budget_bytes)
        announce("capturing gradients", data.n)
        dg = capture_all(
            objective, data, batch_size, fisher, mc_samples, seed, progress, budget_bytes
        )
        curv.dg = dg
        curv.eps = default_eps(dg, damping)
        if "fisher_diag" in needs:
            curv.fisher_diag = {k: v.double() for k, v in fisher_diagonal(dg).items()}
        if "inverse" in needs:
            groups = len(DampedFisher.group_blocks(dg, structure))
            announce("damped inverse Fisher (kernel groups, blocks)", groups + len(dg.blocks))
            curv.inverse = DampedFisher(dg, curv.eps, structure, removed, progress=progress)
            curv.inverse_diag = curv.inverse.inverse_diagonal(progress)
    if "hessian" in needs:
        curv.hessian_diag, curv.hessian_stderr = _hessian_diagonal(
            objective, data, batch_size, probes, seed, progress, announce
        )
        curv.probes = probes
    return curv


def _preflight_kernels(
    objective: Objective,
    data: DataSample,
    est: CaptureEstimate,
    structure: str,
    budget_bytes: int | None,
) -> None:
    """Refuse before capturing when the kernels (and the gathered factors) exceed the budget;
    `est` is `preflight_capture`'s per-example estimate."""
    n_total = data.n * distributed.current().world  # factors are gathered
    rows = n_total * est.columns
    groups = 1 if structure == "global" else len(plan_capture(objective.model, objective.params))
    preflight(
        kernel_bytes(rows, groups) + n_total * (est.factors + est.dense),
        budget_bytes,
        f"the damped inverse Fisher of {n_total} examples x {est.columns} column(s)",
        "use --samples to take fewer examples for the Fisher, --fisher empirical, "
        "or --layers to restrict",
    )


@dataclass(frozen=True)
class CurvatureSettings:
    """How `curvature_at` captures and damps, shared by the analysis and every pruning round."""

    fisher: str = "empirical"
    mc_samples: int = 1
    damping: float = DEFAULT_DAMPING
    structure: str = "block"
    batch_size: int = 256
    seed: int = 0
    probes: int = 32
    budget_bytes: int | None = None
    progress: ProgressFn | None = None
    phase: PhaseFn | None = None

    def at(
        self,
        objective: Objective,
        data: DataSample,
        needs: set[str],
        removed: Mapping[str, Tensor] | None,
        round_: int = 1,
    ) -> Curvature:
        """`curvature_at` the objective's current weights (seed advanced per round)."""
        return curvature_at(
            objective, data, needs, fisher=self.fisher, mc_samples=self.mc_samples,
            damping=self.damping, structure=self.structure, removed=removed,
            batch_size=self.batch_size, seed=self.seed + round_ - 1, probes=self.probes,
            budget_bytes=self.budget_bytes, progress=self.progress, phase=self.phase,
        )  # fmt: skip


def _hessian_diagonal(
    objective: Objective,
    data: DataSample,
    batch_size: int,
    probes: int,
    seed: int,
    progress: ProgressFn | None = None,
    phase: PhaseFn | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``diag H ≈ mean_s z_s ⊙ H z_s`` (Rademacher) with per-entry standard errors;
    `phase` announces the gradient graph's build, then the products."""
    try:
        from gmcurv.stochastic import hessian_diagonal
    except ImportError:
        raise UnsupportedError(
            "--criterion obd-hessian needs the stochastic Hessian diagonal "
            "(gmcurv.stochastic), which this build does not have",
            hint="use --criterion obd or obs",
        ) from None
    from gmcurv.hessian import graphs_first
    from gmcurv.operator import CurvatureOperator

    announce = announcer(phase)
    op = CurvatureOperator(objective, data, batch_size, kind="hessian", progress=progress)
    graphs_first(op, announce)
    announce("Hessian diagonal (products)", probes)
    res = hessian_diagonal(op, probes, seed)
    value, stderr = _diag_parts(res, op)
    return value, stderr


def _diag_parts(res: Any, op: Any) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(value, stderr) of `gmcurv.stochastic.DiagonalEstimate` in parameter layout."""
    value, stderr = res.as_dicts(op.space)
    return (
        {k: v.double() for k, v in value.items()},
        {k: v.double() for k, v in stderr.items()},
    )
