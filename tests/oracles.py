"""Dense float64 oracles: explicit per-example gradients and Hessians via torch.func."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

from gmcurv.batch import Batch
from gmcurv.objective import Objective
from gmcurv.params import ParamSpace


def per_example_grads(obj: Objective, batch: Batch) -> Tensor:
    """``J``: ``[N, P]`` rows ``∇L_n`` from ``vmap(grad)`` (empirical Fisher rows)."""
    params = {k: v.detach() for k, v in obj.params.items()}
    space = ParamSpace.of(params)

    def loss_one(p, x, y):
        xb = {k: v.unsqueeze(0) for k, v in x.items()} if isinstance(x, dict) else x.unsqueeze(0)
        out = obj.outputs(xb, p)
        yb = obj.targets(Batch(xb, None if y is None else y.unsqueeze(0), 0), out)
        return obj.loss.per_example(out, yb)[0]

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, batch.inputs, batch.targets)
    return torch.stack([space.flatten({k: v[i] for k, v in g.items()}) for i in range(len(batch))])


def output_jacobians(obj: Objective, batch: Batch) -> Tensor:
    """``[N, *out_shape, P]``: Jacobian of each example's output w.r.t. the parameters."""
    params = {k: v.detach() for k, v in obj.params.items()}
    space = ParamSpace.of(params)

    def f(flat, x):
        xb = {k: v.unsqueeze(0) for k, v in x.items()} if isinstance(x, dict) else x.unsqueeze(0)
        return obj.outputs(xb, space.unflatten(flat))[0]

    return vmap(jacrev(f), in_dims=(None, 0))(space.flatten(params), batch.inputs)


def dense_hessian(obj: Objective, batch: Batch) -> Tensor:
    """``[P, P]`` Hessian of ``(1/N) Σ_n L_n``, row by row with plain double backward.

    Not ``torch.func.hessian``: in torch 2.13 its vmap-based rows come out wrong (and
    asymmetric) for the LayerNorm weight of the tiny attention model, while plain autograd,
    finite differences and jvp-of-grad agree (see tests/test_oracles.py).
    """
    params = {k: v.detach() for k, v in obj.params.items()}
    space = ParamSpace.of(params)
    flat = space.flatten(params).clone().requires_grad_(True)
    loss = obj.per_example_loss(batch, space.unflatten(flat)).mean()
    (g,) = torch.autograd.grad(loss, flat, create_graph=True)
    rows = [torch.autograd.grad(g[i], flat, retain_graph=True)[0] for i in range(flat.numel())]
    return torch.stack(rows)


def func_hessian(obj: Objective, batch: Batch) -> Tensor:
    """``torch.func.hessian`` of the same loss (kept to document its disagreement)."""
    params = {k: v.detach() for k, v in obj.params.items()}
    space = ParamSpace.of(params)

    def loss(flat):
        return obj.per_example_loss(batch, space.unflatten(flat)).mean()

    return hessian(loss)(space.flatten(params))


def dense_ggn(obj: Objective, batch: Batch) -> Tensor:
    """``(1/N) Σ_n J_n^T Λ_n J_n`` from explicit output Jacobians and output Hessians."""
    J = output_jacobians(obj, batch)  # [N, *out, P]
    n, P = J.shape[0], J.shape[-1]
    with torch.no_grad():
        out = obj.outputs(batch.inputs)
        tgt = obj.targets(batch, out)
    Jf = J.reshape(n, -1, P)
    E = Jf.shape[1]
    G = torch.zeros(P, P, dtype=J.dtype)
    for i in range(n):
        # Λ_i column by column through the loss's own Hessian-vector product
        lam = torch.stack(
            [
                obj.loss.output_hessian_vp(
                    out[i : i + 1], tgt[i : i + 1], e.reshape(1, *out.shape[1:])
                ).reshape(-1)
                for e in torch.eye(E, dtype=J.dtype)
            ]
        )
        G += Jf[i].T @ lam @ Jf[i]
    return G / n


def functional(model: nn.Module):
    """(params, buffers) of a model for functional_call."""
    return dict(model.named_parameters()), dict(model.named_buffers()), functional_call


def dense_ggn_autograd(obj: Objective, batch: Batch) -> Tensor:
    """``(1/N) Σ_n J_n^T Λ_n J_n`` with ``Λ_n`` from plain double backward of the per-example
    loss w.r.t. the outputs — independent of the loss's own ``output_hessian_vp``."""
    J = output_jacobians(obj, batch)  # [N, *out, P]
    n, P = J.shape[0], J.shape[-1]
    with torch.no_grad():
        out = obj.outputs(batch.inputs)
        tgt = obj.targets(batch, out)
    Jf = J.reshape(n, -1, P)
    E = Jf.shape[1]
    G = torch.zeros(P, P, dtype=J.dtype)
    for i in range(n):
        o = out[i : i + 1].clone().requires_grad_(True)
        loss = obj.loss.per_example(o, tgt[i : i + 1]).sum()
        (g,) = torch.autograd.grad(loss, o, create_graph=True)
        g = g.reshape(-1)
        lam = torch.stack(
            [torch.autograd.grad(g[e], o, retain_graph=True)[0].reshape(-1) for e in range(E)]
        )
        G += Jf[i].T @ lam @ Jf[i]
    return G / n


def finite_difference_hvp(obj: Objective, batch: Batch, v: Tensor, h: float = 1e-5) -> Tensor:
    """``(∇L(θ + h v) - ∇L(θ - h v)) / 2h`` by plain autograd (central differences)."""
    params = {k: p.detach() for k, p in obj.params.items()}
    space = ParamSpace.of(params)
    flat = space.flatten(params)

    def gradient(theta: Tensor) -> Tensor:
        theta = theta.clone().requires_grad_(True)
        loss = obj.per_example_loss(batch, space.unflatten(theta)).mean()
        return torch.autograd.grad(loss, theta)[0]

    return (gradient(flat + h * v) - gradient(flat - h * v)) / (2 * h)
