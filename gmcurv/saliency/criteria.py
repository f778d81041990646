"""Saliency criteria: per-weight values and their per-tensor statistics.

For weight ``q`` (``½`` included, see `gmcurv.saliency`):

- ``magnitude``: ``|w_q|``;
- ``obd``: ``½ F_qq w_q²``;
- ``obs``: ``w_q² / (2 [(F + eps I)⁻¹]_qq)``, the loss increase when the other weights
  compensate optimally (``min ½ δwᵀ(F + eps I)δw`` subject to ``δw_q = -w_q``);
- ``obd-hessian``: ``½ H_qq w_q²`` with ``H_qq`` a Hutchinson estimate; its standard error
  is ``½ se(H_qq) w_q²``.

Per tensor, the statistics are the mean and the quantiles of `STATS` over the weights not
already pruned. For a stochastic criterion the mean's standard error is ``sqrt(Σ se_q²)/n``
(independent entries assumed) and a quantile's is that of the weight sitting at it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from gmcurv.errors import ConfigError
from gmcurv.estimate import Estimate
from gmcurv.saliency.curvature import Curvature

CRITERIA = ("magnitude", "obd", "obs", "obd-hessian")
STATS = ("mean", "min", "p05", "p25", "median", "p75", "p95", "max")
_QUANTILES = {"min": 0.0, "p05": 0.05, "p25": 0.25, "median": 0.5, "p75": 0.75, "p95": 0.95}
CONVENTION = (
    "saliency = predicted increase of the mean loss when the weight is zeroed, "
    "½ δwᵀHδw: magnitude |w_q|; obd ½ F_qq w_q²; obs w_q² / (2 [(F + eps I)⁻¹]_qq) "
    "(the other weights compensate); obd-hessian ½ H_qq w_q²"
)

# per-tensor statistics of each criterion: {tensor: {criterion: {stat: Estimate}}}
LayerStats = dict[str, dict[str, dict[str, Estimate]]]


def curvature_needs(criteria: Sequence[str], update: bool) -> set[str]:
    """The parts of `gmcurv.saliency.curvature.Curvature` the criteria (and an OBS update)
    need: ``fisher_diag``, ``inverse``, ``kernel``, ``hessian``."""
    unknown = [c for c in criteria if c not in CRITERIA]
    if unknown:
        raise ConfigError(f"unknown --criterion {unknown[0]!r}", hint=f"use one of {CRITERIA}")
    needs: set[str] = set()
    if "obd" in criteria:
        needs.add("fisher_diag")
    if "obs" in criteria:
        needs.add("inverse")
    if update:
        needs.add("kernel")
    if "obd-hessian" in criteria:
        needs.add("hessian")
    return needs


def saliencies(
    criterion: str, weights: Mapping[str, Tensor], names: Sequence[str], curv: Curvature
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """Per-weight saliency (float64) of the parameters `names`, and its standard error
    (None when exact). See the module doc for the formulas and the ½ convention."""
    w = {k: weights[k].detach().double() for k in names}
    if criterion == "magnitude":
        return {k: v.abs() for k, v in w.items()}, None
    if criterion == "obd":
        assert curv.fisher_diag is not None
        return {k: 0.5 * curv.fisher_diag[k] * v.pow(2) for k, v in w.items()}, None
    if criterion == "obs":
        assert curv.inverse_diag is not None
        return {k: v.pow(2) / (2.0 * curv.inverse_diag[k]) for k, v in w.items()}, None
    if criterion == "obd-hessian":
        assert curv.hessian_diag is not None and curv.hessian_stderr is not None
        value = {k: 0.5 * curv.hessian_diag[k] * v.pow(2) for k, v in w.items()}
        se = {k: 0.5 * curv.hessian_stderr[k] * v.pow(2) for k, v in w.items()}
        return value, se
    raise ConfigError(f"unknown --criterion {criterion!r}", hint=f"use one of {CRITERIA}")


def criterion_method(criterion: str, curv: Curvature, fisher: str) -> str:
    """How a criterion's values were obtained, for the `Estimate.method` field."""
    if criterion == "magnitude":
        return "|w|"
    if criterion == "obd":
        return f"½ F_qq w² ({fisher} Fisher)"
    if criterion == "obs":
        return f"w² / (2 [(F + eps I)⁻¹]_qq) ({fisher} Fisher, eps {curv.eps:.3g})"
    return f"½ H_qq w² (diag H = mean z ⊙ Hz over {curv.probes} Rademacher probes)"


def layer_statistics(
    values: Tensor, method: str, stderr: Tensor | None = None
) -> dict[str, Estimate]:
    """Mean and quantiles of one tensor's saliencies.

    Exact values carry no stderr; for a stochastic criterion the mean's stderr combines the
    per-weight errors (``sqrt(Σ se²)/n``, independence assumed) and a quantile's is that of
    the weight sitting at the quantile.
    """
    flat = values.reshape(-1).double()
    n = flat.numel()
    order = torch.argsort(flat, stable=True)
    se_flat = None if stderr is None else stderr.reshape(-1).double()
    out: dict[str, Estimate] = {}
    mean_se = None if se_flat is None else float(se_flat.pow(2).sum().sqrt()) / n
    out["mean"] = Estimate(float(flat.mean()), mean_se, n, method)
    for name, q in _QUANTILES.items():
        pos = int(order[min(n - 1, round(q * (n - 1)))])
        se = None if se_flat is None else float(se_flat[pos])
        out[name] = Estimate(float(flat[pos]), se, n, f"{method}, {name}")
    last = int(order[-1])
    out["max"] = Estimate(
        float(flat[last]), None if se_flat is None else float(se_flat[last]), n, f"{method}, max"
    )
    return {k: out[k] for k in STATS}


def criteria_statistics(
    criteria: Sequence[str],
    weights: Mapping[str, Tensor],
    names: Sequence[str],
    removed: Mapping[str, Tensor],
    curv: Curvature,
    fisher: str,
) -> tuple[dict[str, dict[str, Tensor]], dict[str, dict[str, Tensor]], LayerStats]:
    """Per criterion: the per-weight saliencies, their stderrs (stochastic criteria) and the
    per-tensor statistics over the weights not already removed."""
    scores: dict[str, dict[str, Tensor]] = {}
    stderrs: dict[str, dict[str, Tensor]] = {}
    layers: LayerStats = {k: {} for k in names}
    for crit in criteria:
        sal, se = saliencies(crit, weights, names, curv)
        scores[crit] = sal
        if se is not None:
            stderrs[crit] = se
        method = criterion_method(crit, curv, fisher)
        for k in names:
            keep = ~removed[k] if k in removed else torch.ones_like(sal[k], dtype=torch.bool)
            if bool(keep.any()):
                layers[k][crit] = layer_statistics(
                    sal[k][keep], method, None if se is None else se[k][keep]
                )
    return scores, stderrs, layers
