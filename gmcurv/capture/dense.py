"""Dense per-example gradients for blocks the hooks cannot decompose.

``g[n, c] = J_nᵀ G[c, n]`` for every example ``n`` and Fisher column ``c``: ``vmap`` over
examples of ``vjp`` of the one-example output, ``vmap`` again over the columns.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap
from torch.utils._pytree import tree_map

from gmcurv.attention import twice_differentiable_attention
from gmcurv.batch import Batch
from gmcurv.capture.gradients import Block
from gmcurv.capture.plan import BlockPlan
from gmcurv.errors import UnsupportedError
from gmcurv.factors import DenseGradients
from gmcurv.objective import Objective


def dense_blocks(
    objective: Objective, plans: list[BlockPlan], batch: Batch, cols: Tensor
) -> list[Block]:
    """Per-example, per-column gradients via ``vmap`` over examples of ``vjp``."""
    obj = objective
    names = [n for p in plans for n in p.params]
    fixed = {k: v.detach() for k, v in obj.params.items() if k not in names}
    primals = {k: obj.params[k].detach() for k in names}

    def one(x, cot):  # x: one example (no batch dim); cot: [C, *out_shape]
        def f(p):
            xb = tree_map(lambda t: t.unsqueeze(0), x)
            return obj.outputs(xb, {**fixed, **p})[0]

        _, pull = vjp(f, primals)
        return vmap(pull)(cot)[0]

    cot = cols.transpose(0, 1)
    try:
        # attention on the math kernel: the fused CPU kernel has no vmap batching rule
        with twice_differentiable_attention():
            g = vmap(one)(batch.inputs, cot)
    except Exception as e:  # torch.func cannot trace some modules (e.g. train-mode BN)
        if obj.mode != "eval":  # a loop would draw other dropout masks than the batch
            raise _unsupported(plans, e, "or use --mode eval") from None
        g = _example_loop(one, batch, cot, plans)
    n, C = cols.shape[1], cols.shape[0]
    blocks = []
    for plan in plans:
        shapes = tuple(tuple(obj.params[k].shape) for k in plan.params)
        flat = torch.cat([g[k].reshape(n, C, -1) for k in plan.params], dim=-1)
        blocks.append(Block(plan.name, "dense", DenseGradients(plan.params, shapes, flat)))
    return blocks


def _example_loop(one, batch: Batch, cot: Tensor, plans: list[BlockPlan]) -> dict[str, Tensor]:
    """The same gradients one example at a time (``vmap`` over the columns only): for models
    whose forward branches on the data, e.g. Hugging Face encoders testing
    ``attention_mask.all()``, which ``vmap`` over examples cannot trace."""
    rows = []
    try:
        with twice_differentiable_attention():
            for i in range(cot.shape[0]):
                rows.append(one(tree_map(lambda t, i=i: t[i], batch.inputs), cot[i]))
    except Exception as e:
        raise _unsupported(plans, e, "") from None
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _unsupported(plans: list[BlockPlan], e: Exception, extra: str) -> UnsupportedError:
    return UnsupportedError(
        f"per-example gradients of {', '.join(p.name for p in plans)} could not be "
        f"computed with torch.func: {type(e).__name__}: {str(e).splitlines()[0]}",
        hint=f"exclude those parameters with --layers {extra}".rstrip(),
    )


def zero_source(
    params: dict[str, Tensor], module: nn.Module, local: dict[str, str], n: int, columns: int
) -> DenseGradients:
    """A module that was not called: its parameters (`local`: own name -> objective name)
    get zero gradient."""
    names = tuple(local.values())
    shapes = tuple(tuple(params[k].shape) for k in names)
    dim = sum(math.prod(s) for s in shapes)
    ref = params[names[0]]
    return DenseGradients(names, shapes, ref.new_zeros(n, columns, dim))
