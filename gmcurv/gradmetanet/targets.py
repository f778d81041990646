"""Exact large-sample curvature of an MLP: what the head learns to predict.

On all examples of DATA (the zoo uses >= 1,024 or the whole dataset):

- Fisher diagonal and trace (empirical Fisher, `gmcurv.fisher` closed forms);
- OBS curvature ``r_q = 1/[(F + eps I)^-1]_qq`` (`gmcurv.woodbury`, block-diagonal ``F``,
  ``eps = damping tr(F)/P``), so that the OBS saliency is ``w_q^2 r_q / 2``;
- Hessian diagonal and trace, exact, from the per-example Hessian w.r.t. each layer's
  pre-activations (below);
- top Hessian eigenvalue by Lanczos on `gmcurv.hessian.CurvatureOperator`.

Exact Hessian diagonal of an MLP. With ``z_l = W_l x_l + b_l`` and ``x_{l+1} = σ(z_l)``,
``∂²L_n/∂W_l[j,i]² = x_l[n,i]^2 H_l[n,j,j]`` where ``H_l[n] = ∂²L_n/∂z_l²`` obeys

    H_{L-1}[n] = Λ_n                                      (loss Hessian w.r.t. the outputs)
    H_l[n]     = D_l W_{l+1}^T H_{l+1}[n] W_{l+1} D_l + diag(σ''(z_l) ⊙ W_{l+1}^T g_{l+1}[n])

with ``D_l = diag σ'(z_l)`` and ``g_l[n] = ∂L_n/∂z_l``; the bias entry is ``H_l[n,j,j]``.
Cost ``O(N Σ_l O_l^2 (O_{l+1} + O_l))``, memory one batch of ``[n, O_l, O_l]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, vmap

from gmcurv.batch import Batch
from gmcurv.capture import DecomposedGradients, capture_all
from gmcurv.data import DataSample
from gmcurv.fisher import fisher_diagonal, fisher_trace
from gmcurv.gradmetanet.features import MLPChain, check_supported
from gmcurv.lanczos import LanczosResult, lanczos
from gmcurv.models.mlp import ACTIVATIONS
from gmcurv.objective import Objective
from gmcurv.operator import CurvatureOperator
from gmcurv.woodbury import DampedFisher, default_eps


@dataclass(frozen=True)
class Targets:
    """Large-sample curvature of one model (float64, parameter layout)."""

    n: int
    fisher_diag: dict[str, Tensor]
    fisher_trace: float
    hessian_diag: dict[str, Tensor]
    hessian_trace: float
    obs_curv: dict[str, Tensor] | None = None  # 1 / [(F + eps I)^-1]_qq
    eps: float | None = None
    hessian_top: float | None = None
    hessian_top_residual: float | None = None
    hessian_top_converged: bool | None = None
    hessian_top_matvecs: int | None = None


def _derivatives(activation: str) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """Elementwise ``σ'`` and ``σ''`` of a named activation (torch.func on a scalar)."""
    act = ACTIVATIONS[activation]()

    def f(t: Tensor) -> Tensor:
        return act(t)

    d1, d2 = vmap(grad(f)), vmap(grad(grad(f)))
    return (lambda z: d1(z.reshape(-1)).reshape(z.shape)), (
        lambda z: d2(z.reshape(-1)).reshape(z.shape)
    )


def mlp_hessian_diagonal(
    objective: Objective, data: DataSample, chain: MLPChain, batch_size: int = 1024
) -> dict[str, Tensor]:
    """Exact ``diag ∇²L`` of the mean loss over `data` (see module doc), float64."""
    out: dict[str, Tensor] = {}
    n_total = 0
    for batch in data.batches(batch_size, objective.device, torch.float64):
        for k, v in batch_hessian_diagonal_sum(objective, batch, chain).items():
            out[k] = out.get(k, 0.0) + v
        n_total += len(batch)
    return {k: v / n_total for k, v in out.items()}


def batch_hessian_diagonal_sum(
    objective: Objective, batch: Batch, chain: MLPChain
) -> dict[str, Tensor]:
    """``Σ_n diag ∇²L_n`` over the examples of one batch (float64; see module doc)."""
    model = objective.model
    linears = [model.get_submodule(p) for p in chain.paths]
    d1, d2 = _derivatives(chain.activation)
    act = ACTIVATIONS[chain.activation]()
    out: dict[str, Tensor] = {}
    x = batch.inputs
    assert isinstance(x, Tensor)
    x = x.double()
    if x.shape[-1] != linears[0].in_features:
        x = x.reshape(x.shape[0], -1)
    with torch.no_grad():
        xs, zs = [], []
        for l, lin in enumerate(linears):
            xs.append(x)
            z = torch.nn.functional.linear(
                x, lin.weight.double(), None if lin.bias is None else lin.bias.double()
            )
            zs.append(z)
            x = act(z) if l < len(linears) - 1 else z
    f = zs[-1].detach().requires_grad_(True)
    targets = objective.targets(batch, f)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(objective.loss.per_example(f, targets).sum(), f)
    n, c = f.shape
    eye = torch.eye(c, dtype=torch.float64)
    H = torch.stack(
        [
            objective.loss.output_hessian_vp(f.detach(), targets, eye[k].expand(n, c))
            for k in range(c)
        ],
        -1,
    )  # [n, c, c]
    for l in range(len(linears) - 1, -1, -1):
        hd = H.diagonal(dim1=1, dim2=2)  # [n, O_l]
        w_name, b_name = chain.weights[l], chain.biases[l]
        out[w_name] = torch.einsum("no,ni->oi", hd, xs[l].pow(2))
        if b_name is not None:
            out[b_name] = hd.sum(0)
        if l == 0:
            break
        W = linears[l].weight.detach().double()  # [O_l, I_l]
        gx = g @ W  # gradient w.r.t. x_l = σ(z_{l-1})
        z = zs[l - 1]
        s1, s2 = d1(z), d2(z)
        B = torch.einsum("oi,nop,pj->nij", W, H, W)
        H = s1[:, :, None] * B * s1[:, None, :] + torch.diag_embed(s2 * gx)
        g = s1 * gx
    return out


def top_hessian_eigenvalue(
    objective: Objective,
    data: DataSample,
    batch_size: int = 1024,
    tol: float = 1e-4,
    max_iters: int = 60,
    seed: int = 0,
) -> LanczosResult:
    """Largest (algebraic) eigenvalue of ``∇²L`` on `data` by Lanczos (HVPs over all data)."""
    op = CurvatureOperator(objective, data, batch_size, kind="hessian")
    return lanczos(
        op.matvec,
        op.size,
        1,
        which="LA",
        tol=tol,
        max_iters=max_iters,
        seed=seed,
        dtype=torch.float64,
    )


def compute_targets(
    objective: Objective,
    data: DataSample,
    *,
    batch_size: int = 1024,
    obs: bool = True,
    top: bool = True,
    seed: int = 0,
    top_tol: float = 1e-4,
    dg: DecomposedGradients | None = None,
) -> tuple[Targets, DecomposedGradients]:
    """All targets of one model on `data` (the objective should be float64).

    Returns the targets and the captured gradients of all examples (for drawing sets).
    """
    chain = check_supported(objective)
    if dg is None:
        dg = capture_all(objective, data, batch_size)
    diag = {k: v.double() for k, v in fisher_diagonal(dg).items()}
    obs_curv = eps = None
    if obs:
        eps = default_eps(dg)
        inv = DampedFisher(dg, eps, "block").inverse_diagonal()
        obs_curv = {k: 1.0 / v for k, v in inv.items()}
    hdiag = mlp_hessian_diagonal(objective, data, chain, batch_size)
    res = top_hessian_eigenvalue(objective, data, batch_size, top_tol, seed=seed) if top else None
    return (
        Targets(
            n=dg.n,
            fisher_diag=diag,
            fisher_trace=fisher_trace(dg),
            hessian_diag=hdiag,
            hessian_trace=float(sum(v.sum() for v in hdiag.values())),
            obs_curv=obs_curv,
            eps=eps,
            hessian_top=None if res is None else float(res.values[0]),
            hessian_top_residual=None if res is None else float(res.residuals[0]),
            hessian_top_converged=None if res is None else bool(res.converged[0]),
            hessian_top_matvecs=None if res is None else res.n_matvecs,
        ),
        dg,
    )
