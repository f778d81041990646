"""Curvature of the base model's loss along an adapter's update ``dθ``.

``dθ`` is ``ΔW_l = s B_l A_l`` on each adapted weight and zero elsewhere (`gmcurv.lora.mapping`).
With ``L(θ) = (1/N) Σ_n L_n(θ)`` and the capture's factors ``δ[n,c,t]``, ``a[n,t]``:

    first order      gᵀdθ,  g = ∇L                      one backward per batch, all adapters
    Fisher           dθᵀ F dθ = (1/N) Σ_n Σ_c (Σ_l Σ_t δ[n,c,t]ᵀ ΔW_l a[n,t])²
                     for a Linear/Conv2d block with ΔW = L R (L = s B [O, r], R = A [r, I]):
                     (J dθ)[n,c] = Σ_t (δ[n,c,t]ᵀ L)·(R a[n,t]),  cost O(N C T r (O + I)) —
                     no per-example gradient and no dense ΔW (other blocks: their own J v)
    Hessian          dθᵀ H dθ from one Hessian-vector product over the data
    quadratic model  ΔL̂(α) = α gᵀdθ + ½ α² dθᵀ H dθ   (and with F in place of H)
    measured         ΔL(α) = L(θ + α dθ) - L(θ), weights merged through ``functional_call``
                     (the loaded model is never modified)

Everything streams over the data in batches; per-example values (losses, ``(J dθ)²``,
loss changes) give the spread over examples (``data_stderr``). Under torchrun sums are
all-reduced and per-example values gathered, so K ranks equal one process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.func import grad

from gmcurv import distributed
from gmcurv.capture import Capturer, DecomposedGradients
from gmcurv.data import DataSample
from gmcurv.errors import ConfigError
from gmcurv.estimate import Estimate
from gmcurv.factors import LinearFactors
from gmcurv.lora.mapping import LayerUpdate, update_direction
from gmcurv.objective import Objective
from gmcurv.operator import CurvatureOperator

SCALES = (0.25, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class ScalePoint:
    """Loss change when the adapter is merged at ``scale``: predicted and measured."""

    scale: float
    predicted: Estimate  # α gᵀdθ + ½ α² dθᵀH dθ
    predicted_fisher: Estimate  # α gᵀdθ + ½ α² dθᵀF dθ
    measured: Estimate  # L(θ + α dθ) - L(θ)


@dataclass(frozen=True)
class ParamAlong:
    """One adapted parameter's part: its Fisher block, its share of dθᵀH dθ, its gᵀdθ."""

    fisher_block: Estimate  # dθ_pᵀ F_pp dθ_p
    hessian_share: Estimate  # dθ_pᵀ (H dθ)_p  (the shares add up to dθᵀ H dθ)
    first_order: Estimate  # g_pᵀ dθ_p
    norm: Estimate  # ||dθ_p||


@dataclass(frozen=True)
class AdapterCurvature:
    """Curvature of the loss along one adapter's update, on a data sample."""

    fisher: str
    loss: Estimate
    update_norm: Estimate  # ||dθ||
    first_order: Estimate
    fisher_qf: Estimate
    hessian_qf: Estimate
    fisher_rayleigh: Estimate  # dθᵀF dθ / ||dθ||²
    hessian_rayleigh: Estimate  # dθᵀH dθ / ||dθ||²
    points: list[ScalePoint]
    per_param: dict[str, ParamAlong] = field(default_factory=dict)


# ----------------------------------------------------------------------------- the objective
def along_objective(objective: Objective, updates: Mapping[str, Sequence[LayerUpdate]]):
    """`objective` restricted to the parameters some adapter updates."""
    names = {u.param for ups in updates.values() for u in ups}
    missing = sorted(names - objective.params.keys())
    if missing:
        raise ConfigError(
            f"adapted parameters {', '.join(missing[:4])} are not trainable in the base model",
            hint="curvature is taken over trainable parameters; check the model",
        )
    chosen = {k: p for k, p in objective.params.items() if k in names}
    return Objective(objective.model, objective.loss, chosen, objective.mode, objective.seed)


# ------------------------------------------------------------------------------ J dθ on factors
def update_jvp(
    dg: DecomposedGradients, updates: Sequence[LayerUpdate]
) -> tuple[Tensor, dict[str, Tensor]]:
    """``J dθ`` as ``[N, C]`` and per adapted block (keyed by parameter), from the factors.

    Linear/Conv2d blocks use the low-rank form ``Σ_t (δᵀ L)·(R a)``; any other block
    (embedding, tied, dense) its own ``J v`` with the parameter-sized ``ΔW``.
    """
    by_param: dict[str, list[LayerUpdate]] = {}
    for u in updates:
        by_param.setdefault(u.param, []).append(u)
    total = torch.zeros(dg.n, dg.columns, dtype=dg.losses.dtype, device=dg.losses.device)
    parts: dict[str, Tensor] = {}
    for block in dg.blocks:
        mine = [p for p in block.params if p in by_param]
        if not mine:
            continue
        src = block.source
        if isinstance(src, LinearFactors) and src.has_weight and mine == [src.names[0]]:
            ups = by_param[mine[0]]
            left = torch.cat([u.left for u in ups], 1).to(src.delta)  # [O, r]
            right = torch.cat([u.right for u in ups], 0).to(src.x)  # [r, I]
            if src.transposed:  # ΔW stored [I, O] (Conv1D): (L R)^T = R^T L^T
                left, right = right.T.to(src.delta), left.T.to(src.x)
            dl = torch.einsum("ncto,or->nctr", src.delta, left)
            ra = torch.einsum("nti,ri->ntr", src.x, right)
            part = torch.einsum("nctr,ntr->nc", dl, ra)
        else:
            dtheta = update_direction([u for p in mine for u in by_param[p]], src.dtype)
            vector = {
                p: dtheta[p] if p in dtheta else torch.zeros(s, dtype=src.dtype)
                for p, s in zip(block.params, block.shapes, strict=True)
            }
            vector = {k: v.to(dg.losses.device) for k, v in vector.items()}
            part = src.jvp(vector)
        parts[",".join(mine)] = part
        total = total + part.to(total.dtype)
    return total, parts


# ------------------------------------------------------------------------------- the stream
@dataclass
class _Sums:
    """Per-adapter accumulators over batches."""

    q_cols: list[Tensor] = field(default_factory=list)  # [n, C] (J dθ)² per column
    q_blocks: dict[str, list[Tensor]] = field(default_factory=dict)  # [n] per block
    diffs: dict[float, list[Tensor]] = field(default_factory=dict)  # [n] per scale


def _mean_se(x: Tensor) -> tuple[float, float | None]:
    n = x.numel()
    return float(x.mean()), (float(x.std(unbiased=True)) / math.sqrt(n) if n > 1 else None)


def curvature_along(
    objective: Objective,
    data: DataSample,
    updates: Mapping[str, Sequence[LayerUpdate]],
    *,
    batch_size: int = 256,
    fisher: str = "empirical",
    mc_samples: int = 1,
    seed: int = 0,
    scales: Sequence[float] = SCALES,
    budget_bytes: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, AdapterCurvature]:
    """Curvature along each adapter's update (see module doc), ``{adapter: result}``.

    `objective` may hold any parameters; it is restricted to the adapted ones. One capture
    pass serves every adapter; then one Hessian-vector product per adapter.
    """
    from gmcurv.capture.budget import preflight_capture

    if not updates:
        return {}
    comm = distributed.current()
    obj = along_objective(objective, updates)
    base = {k: p.detach() for k, p in obj.params.items()}

    def direction(a: str) -> dict[str, Tensor]:
        """dθ of adapter `a` (dense, parameter-sized; built when needed, one at a time)."""
        return update_direction(list(updates[a]), obj.dtype, obj.device)

    cap = Capturer(obj, fisher, mc_samples, seed)
    preflight_capture(obj, data, batch_size, fisher, mc_samples, budget_bytes, keep=False)
    sums = {a: _Sums() for a in updates}
    grad_sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in base.items()}
    losses: list[Tensor] = []

    def total_loss(p: dict[str, Tensor], batch) -> Tensor:
        return obj.per_example_loss(batch, p).sum()

    for batch in data.batches(batch_size, obj.device, obj.dtype):
        dg = cap(batch)
        for a, ups in updates.items():
            jv, blocks = update_jvp(dg, ups)
            sums[a].q_cols.append(jv.double().pow(2))
            for key, part in blocks.items():
                sums[a].q_blocks.setdefault(key, []).append(part.double().pow(2).sum(1))
        with torch.no_grad():  # grad still differentiates; no graph to other parameters
            g = grad(total_loss)(base, batch)
        for k in grad_sum:
            grad_sum[k] += g[k].double()
        with torch.no_grad():
            l0 = obj.per_example_loss(batch, base)
            losses.append(l0.double())
            for a in updates:
                d = direction(a)
                for alpha in scales:
                    merged = {k: base[k] + alpha * v for k, v in d.items()}
                    la = obj.per_example_loss(batch, merged)
                    sums[a].diffs.setdefault(alpha, []).append((la - l0).double())
        if progress:
            progress(len(batch))

    gather = comm.all_gather_rows
    loss_all = gather(torch.cat(losses))
    n = int(loss_all.numel())
    grad_mean = {k: comm.all_reduce(v) / n for k, v in grad_sum.items()}
    op = CurvatureOperator(obj, data, batch_size, kind="hessian")
    loss_mean, loss_se = _mean_se(loss_all)
    loss = Estimate.exact_value(loss_mean, n, "mean loss", data_stderr=loss_se)

    out: dict[str, AdapterCurvature] = {}
    for a in updates:
        d = direction(a)
        full = {k: d[k] if k in d else torch.zeros_like(v) for k, v in base.items()}
        hv_local = op.matvec_dict(full)
        hv = {k: comm.all_reduce(v.detach().double() * data.n) / n for k, v in hv_local.items()}
        if progress:
            progress(data.n)
        out[a] = _assemble(sums[a], d, grad_mean, hv, loss, n, fisher, scales, gather)
    return out


def _assemble(
    s: _Sums,
    d: dict[str, Tensor],
    g: dict[str, Tensor],
    hv: dict[str, Tensor],
    loss: Estimate,
    n: int,
    fisher: str,
    scales: Sequence[float],
    gather: Callable[[Tensor], Tensor],
) -> AdapterCurvature:
    dd = {k: v.double() for k, v in d.items()}
    sq_norm = sum(float(v.pow(2).sum()) for v in dd.values())
    g_dot = sum(float((g[k] * v).sum()) for k, v in dd.items())
    h_qf = sum(float((hv[k] * v).sum()) for k, v in dd.items())
    cols = gather(torch.cat(s.q_cols))  # [N, C]
    f_qf, f_data_se = _mean_se(cols.sum(1))
    f_se = _mc_stderr(cols, fisher, f_data_se)
    f_method = f"decomposed factors ({fisher} Fisher)"
    fisher_qf = Estimate(f_qf, f_se, n, f_method, data_stderr=f_data_se)
    hessian_qf = Estimate.exact_value(h_qf, n, "Hessian-vector product", n_matvecs=1)
    first = Estimate.exact_value(g_dot, n, "mean gradient")
    nan = float("nan")
    points = []
    for alpha in scales:
        measured, m_se = _mean_se(gather(torch.cat(s.diffs[alpha])))
        points.append(
            ScalePoint(
                scale=float(alpha),
                predicted=Estimate.exact_value(
                    alpha * g_dot + 0.5 * alpha**2 * h_qf, n, "quadratic model (Hessian)"
                ),
                predicted_fisher=Estimate(
                    alpha * g_dot + 0.5 * alpha**2 * f_qf,
                    None if f_se is None else 0.5 * alpha**2 * f_se,
                    n,
                    "quadratic model (Fisher)",
                    data_stderr=None if f_data_se is None else 0.5 * alpha**2 * f_data_se,
                ),
                measured=Estimate.exact_value(
                    measured, n, "merged weights (functional_call)", data_stderr=m_se
                ),
            )
        )
    per_param = {}
    for key, parts in s.q_blocks.items():
        q, q_se = _mean_se(gather(torch.cat(parts)))
        names = key.split(",")
        per_param[key] = ParamAlong(
            fisher_block=Estimate(q, None, n, f_method, data_stderr=q_se),
            hessian_share=Estimate.exact_value(
                sum(float((hv[p] * dd[p]).sum()) for p in names), n, "Hessian-vector product"
            ),
            first_order=Estimate.exact_value(
                sum(float((g[p] * dd[p]).sum()) for p in names), n, "mean gradient"
            ),
            norm=Estimate.exact_value(
                math.sqrt(sum(float(dd[p].pow(2).sum()) for p in names)), 0, "Frobenius norm"
            ),
        )
    return AdapterCurvature(
        fisher=fisher,
        loss=loss,
        update_norm=Estimate.exact_value(math.sqrt(sq_norm), 0, "Frobenius norm"),
        first_order=first,
        fisher_qf=fisher_qf,
        hessian_qf=hessian_qf,
        fisher_rayleigh=Estimate(
            f_qf / sq_norm if sq_norm > 0 else nan,
            None if f_se is None or sq_norm == 0 else f_se / sq_norm,
            n,
            "dθᵀF dθ / ||dθ||²",
        ),
        hessian_rayleigh=Estimate.exact_value(
            h_qf / sq_norm if sq_norm > 0 else nan, n, "dθᵀH dθ / ||dθ||²"
        ),
        points=points,
        per_param=per_param,
    )


def _mc_stderr(cols: Tensor, fisher: str, data_se: float | None) -> float | None:
    """Monte Carlo error of a Fisher quadratic form (None when exact on the sample): spread
    over the sampled columns of each example (the estimate is their mean)."""
    if fisher != "mc":
        return None
    n, c = cols.shape
    if c == 1:
        return data_se
    var = (cols * c).var(dim=1, unbiased=True) / c  # each column is 1/c of the example's value
    return float(var.sum().sqrt()) / n
