"""Hessian and GGN as matrix-free operators over the objective's flat parameter space.

``H = ∇² L(θ)`` and ``G = (1/N) Σ_n J_n^T Λ_n J_n`` (``Λ_n`` the loss Hessian w.r.t. the
outputs, see `gmcurv.losses`) for ``L = (1/N) Σ_n L_n``; products accumulate over data
batches in a fixed order. Hessian-vector products use forward-over-reverse
(``torch.func.jvp`` of ``torch.func.grad``) through ``functional_call`` and fall back to
reverse-over-reverse automatically when an op has no forward-mode rule.
``.backward(create_graph=True)`` is never used. ``F.scaled_dot_product_attention`` runs on
PyTorch's math kernel inside these products: the fused kernels (the CPU flash kernel in
torch 2.13) have neither a forward-mode rule nor a differentiable backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp

from gmcurv.data import Batch, DataSample
from gmcurv.errors import ConfigError
from gmcurv.objective import Objective
from gmcurv.params import ParamSpace

CURVATURES = ("hessian", "ggn")


def twice_differentiable_attention() -> contextlib.AbstractContextManager:
    """Route ``scaled_dot_product_attention`` to the math kernel (second-order safe)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


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


@dataclass
class CurvatureOperator:
    """``v -> C v`` for ``C`` the Hessian or GGN of the mean loss over `data` (flat vectors).

    Counts products in `n_matvecs`. Forward mode is tried first and switched off for good
    on ``NotImplementedError``.
    """

    objective: Objective
    data: DataSample
    batch_size: int = 256
    kind: str = "hessian"
    forward_mode: bool = True
    n_matvecs: int = 0
    progress: Callable[[int], None] | None = None
    _batches: list[Batch] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in CURVATURES:
            raise ConfigError(f"unknown curvature {self.kind!r}", hint=f"use one of {CURVATURES}")

    @property
    def space(self) -> ParamSpace:
        return self.objective.space

    @property
    def size(self) -> int:
        return self.space.size

    @property
    def n(self) -> int:
        return self.data.n

    def batches(self):
        return self.data.batches(self.batch_size, self.objective.device, self.objective.dtype)

    def _batch_product(self, batch: Batch, vec: dict[str, Tensor]) -> dict[str, Tensor]:
        fn = batch_hvp if self.kind == "hessian" else batch_ggnvp
        if self.forward_mode:
            try:
                return fn(self.objective, batch, vec, True)
            except (NotImplementedError, RuntimeError) as e:
                if "forward" not in str(e).lower() and not isinstance(e, NotImplementedError):
                    raise
                self.forward_mode = False
        return fn(self.objective, batch, vec, False)

    def matvec_dict(self, vector: dict[str, Tensor]) -> dict[str, Tensor]:
        """``C v`` in parameter layout."""
        out: dict[str, Tensor] | None = None
        for batch in self.batches():
            part = self._batch_product(batch, vector)
            out = part if out is None else {k: out[k] + part[k] for k in out}
        assert out is not None
        self.n_matvecs += 1
        if self.progress:
            self.progress(1)
        return {k: v / self.n for k, v in out.items()}

    def matvec(self, v: Tensor) -> Tensor:
        """``C v`` for a flat vector (any float dtype; computed in the model's dtype)."""
        vec = self.space.unflatten(v.to(self.objective.dtype))
        return self.space.flatten(self.matvec_dict(vec)).to(v.dtype)

    __call__ = matvec
