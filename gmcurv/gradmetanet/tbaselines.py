"""Equal-cost baselines for head v2 on one set of ``b`` sequences (issue 14, item 3).

Given the head's wall time ``t_head`` on the set (capture + features + network):

- **plug-in** (same gradients as the head): ``tr Ĝ`` and ``λ_max(Ĝ)`` of the token-level
  GGN estimate from the Monte Carlo gradients the head read (`tfeatures.TSet.plug_trace`);
- **MC-GGN at equal time**: the same estimator from ``m = max(1, ⌊t_head / t_capture⌋)``
  fresh Monte Carlo label draws per token;
- **Hutchinson / Lanczos at equal time**: ``k = max(1, ⌊t_head / t_hvp⌋)`` Hessian-vector
  products on the set: Hutchinson's mean of ``v^T H v`` (Rademacher ``v``) and the top Ritz
  value of ``k`` Lanczos steps (``k = 1``: a Rayleigh quotient).

Each is exact or unbiased *on the set*; against the large-sample truth they carry the
sampling error of ``b`` sequences too, as the head does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from gmcurv.batch import Batch
from gmcurv.capture import Capturer
from gmcurv.data import DataSample
from gmcurv.gradmetanet.tfeatures import predicted_tokens, tset_from_gradients
from gmcurv.lanczos import lanczos_tridiagonal
from gmcurv.objective import Objective
from gmcurv.operator import CurvatureOperator
from gmcurv.stochastic import rademacher


@dataclass(frozen=True)
class EqualCost:
    mc_trace: float
    mc_top: float
    mc_samples: int
    hutch_trace: float
    lanczos_top: float
    hvps: int
    t_capture: float
    t_hvp: float


def mc_ggn(objective: Objective, batch: Batch, samples: int, seed: int) -> tuple[float, float]:
    """``(tr Ĝ, λ_max(Ĝ))``, the head's plug-in estimator (`TSet.plug_trace`), from
    `samples` label draws per token."""
    dg = Capturer(objective, "mc", samples, seed, check=False)(batch)
    s = tset_from_gradients(dg, objective.model)
    s.tokens = predicted_tokens(batch)
    return s.plug_trace, s.plug_top


def equal_cost(
    objective: Objective, batch: Batch, data: DataSample, t_head: float, seed: int = 1
) -> EqualCost:
    """The baselines above with the head's wall time `t_head` (`data`: the set on disk)."""
    t0 = time.perf_counter()
    mc_ggn(objective, batch, 1, seed + 100)
    t_capture = time.perf_counter() - t0
    op = CurvatureOperator(objective, data, len(batch), kind="hessian")
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(op.size, generator=gen, dtype=torch.float64)
    t0 = time.perf_counter()
    op.matvec(v)
    t_hvp = time.perf_counter() - t0
    m = max(1, int(t_head // t_capture))
    k = max(1, int(t_head // t_hvp))
    mc_tr, mc_top = mc_ggn(objective, batch, m, seed)
    zs = [rademacher(op.size, gen) for _ in range(k)]
    hutch = sum(float(z @ op.matvec(z)) for z in zs) / k
    alpha, beta = lanczos_tridiagonal(
        op.matvec, torch.randn(op.size, generator=gen, dtype=torch.float64), k
    )
    T = torch.diag(alpha) if len(beta) == 0 else (
        torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    )  # fmt: skip
    top = float(torch.linalg.eigvalsh(T.double())[-1])
    return EqualCost(mc_tr, mc_top, m, hutch, top, k, t_capture, t_hvp)
