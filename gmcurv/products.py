"""Curvature-vector products on one batch, sums over its examples (no 1/N).

- Hessian: ``∇²(Σ_n L_n) v``, forward-over-reverse (``jvp`` of ``grad``) through
  ``functional_call``, or reverse-over-reverse (``∇<∇L, v>``) where an op has no
  forward-mode rule;
- GGN: ``Σ_n J_nᵀ Λ_n J_n v`` with ``Λ_n`` the loss Hessian w.r.t. the outputs
  (`gmcurv.losses`), ``J v`` by ``jvp`` (or a double ``vjp``);
- residual: ``(H - G) v = Σ_n Σ_o r[n,o] ∇²f[n,o] v`` with ``r = ∂L/∂f`` held fixed (the
  Hessian of ``θ -> <r, f(θ)>``).

Attention runs on the math kernel (`gmcurv.attention`): fused kernels have no double
backward. ``.backward(create_graph=True)`` is never used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from gmcurv.attention import twice_differentiable_attention
from gmcurv.batch import Batch
from gmcurv.objective import Objective


def _detached(objective: Objective) -> dict[str, Tensor]:
    return {k: p.detach() for k, p in objective.params.items()}


def batch_hvp(
    objective: Objective, batch: Batch, vector: dict[str, Tensor], forward_mode: bool = True
) -> dict[str, Tensor]:
    """``∇²(Σ_n L_n) v`` on one batch (sum over its examples)."""
    with twice_differentiable_attention():
        return _batch_hvp(objective, batch, vector, forward_mode)


def _batch_hvp(
    objective: Objective, batch: Batch, vector: dict[str, Tensor], forward_mode: bool
) -> dict[str, Tensor]:
    params = _detached(objective)

    def total(p: dict[str, Tensor]) -> Tensor:
        return objective.per_example_loss(batch, p).sum()

    if forward_mode:
        return jvp(grad(total), (params,), (vector,))[1]

    # reverse-over-reverse: ∇_θ <∇_θ L, v>
    def directional(p: dict[str, Tensor]) -> Tensor:
        g = grad(total)(p)
        return sum((g[k] * vector[k]).sum() for k in g)  # type: ignore[return-value]

    return grad(directional)(params)


def batch_ggnvp(
    objective: Objective, batch: Batch, vector: dict[str, Tensor], forward_mode: bool = True
) -> dict[str, Tensor]:
    """``Σ_n J_n^T Λ_n J_n v`` on one batch."""
    with twice_differentiable_attention():
        return _batch_ggnvp(objective, batch, vector, forward_mode)


def _batch_ggnvp(
    objective: Objective, batch: Batch, vector: dict[str, Tensor], forward_mode: bool
) -> dict[str, Tensor]:
    params = _detached(objective)

    def f(p: dict[str, Tensor]) -> Tensor:
        return objective.outputs(batch.inputs, p)

    out, pull = vjp(f, params)
    if forward_mode:
        jv = jvp(f, (params,), (vector,))[1]
    else:  # J v = d/du <J^T u, v> via double vjp
        u = torch.zeros_like(out, requires_grad=True)
        with torch.enable_grad():
            jtu = pull(u)[0]
            dot = sum((jtu[k] * vector[k]).sum() for k in jtu)
            jv = torch.autograd.grad(dot, u)[0]
    targets = objective.targets(batch, out)
    lam_jv = objective.loss.output_hessian_vp(out.detach(), targets, jv.detach())
    return pull(lam_jv)[0]


def output_residuals(objective: Objective, batch: Batch) -> Tensor:
    """``r = ∂(Σ_n L_n)/∂f`` at the current parameters (outputs' shape, detached)."""
    with torch.enable_grad():
        out = objective.outputs(batch.inputs, _detached(objective)).detach().requires_grad_(True)
        total = objective.loss.per_example(out, objective.targets(batch, out)).sum()
        return torch.autograd.grad(total, out)[0].detach()


def batch_residual_vp(
    objective: Objective,
    batch: Batch,
    vector: dict[str, Tensor],
    forward_mode: bool = True,
    residuals: Tensor | None = None,
) -> dict[str, Tensor]:
    """``Σ_n Σ_o r[n,o] ∇²f[n,o] v`` on one batch: the batch's ``(H - G) v`` (times its size)."""
    r = output_residuals(objective, batch) if residuals is None else residuals
    with twice_differentiable_attention():
        params = _detached(objective)

        def total(p: dict[str, Tensor]) -> Tensor:
            return (objective.outputs(batch.inputs, p) * r).sum()

        if forward_mode:
            return jvp(grad(total), (params,), (vector,))[1]

        def directional(p: dict[str, Tensor]) -> Tensor:
            g = grad(total)(p)
            return sum((g[k] * vector[k]).sum() for k in g)  # type: ignore[return-value]

        return grad(directional)(params)


Vec = dict[str, Tensor]


@dataclass
class BatchProducts:
    """One batch's ``C v`` for ``C`` = `kind` ('hessian', 'ggn' or 'residual'), by the
    first route the model supports: forward-over-reverse, switched off for good on
    ``NotImplementedError`` (an op without a forward-mode rule), then reverse-over-reverse;
    several vectors at once by ``torch.func.vmap``, switched off for good when a batching
    rule is missing, then one at a time."""

    objective: Objective
    kind: str
    forward_mode: bool = True
    vmap_ok: bool = True

    def product(self, batch: Batch, vector: Vec, residuals: Tensor | None = None) -> Vec:
        """``C v`` summed over the batch's examples (`residuals`: ``r`` for ``H - G``)."""
        if self.forward_mode:
            try:
                return self._route(batch, vector, True, residuals)
            except (NotImplementedError, RuntimeError) as e:
                if "forward" not in str(e).lower() and not isinstance(e, NotImplementedError):
                    raise
                self.forward_mode = False
        return self._route(batch, vector, False, residuals)

    def _route(self, batch: Batch, vector: Vec, forward: bool, r: Tensor | None) -> Vec:
        if self.kind == "ggn":
            return batch_ggnvp(self.objective, batch, vector, forward)
        if self.kind == "hessian":
            return batch_hvp(self.objective, batch, vector, forward)
        return batch_residual_vp(self.objective, batch, vector, forward, r)

    def each(self, one: Callable[[Vec], Vec], vectors: Vec, m: int) -> Vec:
        """`one` applied to each of the `m` rows of `vectors` (leading dimension), stacked:
        vectorised by ``vmap`` when the model allows, else in a loop."""
        if self.vmap_ok:
            try:
                return vmap(one)(vectors)
            except Exception:  # no batching rule somewhere: one product at a time
                self.vmap_ok = False
        rows = [one({k: t[j] for k, t in vectors.items()}) for j in range(m)]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
