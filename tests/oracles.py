"""Dense float64 oracles: explicit per-example gradients and Hessians via torch.func."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

from gmcurv.data import Batch
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
    """``[P, P]`` Hessian of ``(1/N) Σ_n L_n`` via ``torch.func.hessian``."""
    params = {k: v.detach() for k, v in obj.params.items()}
    space = ParamSpace.of(params)

    def loss(flat):
        return obj.per_example_loss(batch, space.unflatten(flat)).mean()

    return hessian(loss)(space.flatten(params))


def functional(model: nn.Module):
    """(params, buffers) of a model for functional_call."""
    return dict(model.named_parameters()), dict(model.named_buffers()), functional_call
