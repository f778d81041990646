"""The one-off self-check of decomposed gradients against plain autograd.

On the first examples of the first batch, with a hook-free forward: the outputs must equal
the hooked ones (else the broadcast-expanded modules are at fault); per block,
``Σ_n g[n, 0]`` must equal autograd's ``Jᵀ G[0]`` (else a parameter is used outside its
module) and, in eval mode, ``g[e, 0]`` must equal autograd's gradient of example ``e`` alone
for the first and last example (else examples mix inside the model). A block that fails is
named so the `Capturer` can capture it densely.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from gmcurv.batch import Batch
from gmcurv.capture.gradients import DecomposedGradients
from gmcurv.capture.recording import only_selected_require_grad
from gmcurv.errors import GmcurvWarning, UnsupportedError
from gmcurv.objective import Objective

Grads = dict[str, Tensor | None]


def reference_gradients(
    objective: Objective, ref_out: Tensor, cols: Tensor, probes: list[int]
) -> list[Grads]:
    """Autograd's ``Jᵀ G[0]`` summed over the batch, then for each example in `probes`
    alone (its row of ``G[0]`` kept, the others zeroed)."""
    params = list(objective.params.values())
    masks = [None, *probes]  # None: the sum over the batch; e: example e alone
    refs = []
    for k, e in enumerate(masks):
        cot = cols[0]
        if e is not None:
            cot = torch.zeros_like(cot)
            cot[e] = cols[0][e]
        grads = torch.autograd.grad(
            ref_out, params, grad_outputs=cot, retain_graph=k < len(masks) - 1, allow_unused=True
        )
        refs.append(dict(zip(objective.params, grads, strict=True)))
    return refs


def agrees(got: dict[str, Tensor], ref: Grads, names, tol: float, floor: float) -> bool:
    """``||got - ref|| <= tol max(||ref||, floor)`` over a block (absent gradients are 0)."""
    err = ref_sq = 0.0
    for name in names:
        g = got[name].double()
        r = ref[name]
        r = torch.zeros_like(g) if r is None else r.double()
        err += float((g - r).pow(2).sum())
        ref_sq += float(r.pow(2).sum())
    return math.sqrt(err) <= tol * max(math.sqrt(ref_sq), floor, 1e-30)


def disagreeing_blocks(
    dg: DecomposedGradients,
    refs: list[Grads],
    probes: list[int],
    dtype: torch.dtype,
    device: torch.device,
) -> list[str]:
    """Names of the decomposed blocks whose sum (and probed examples) miss `refs`; the
    tolerance is relative, floored at 1e-3 of the whole gradient's norm."""
    tol = 1e-8 if dtype == torch.float64 else 2e-3
    floors = [
        1e-3 * math.sqrt(sum(float(g.double().pow(2).sum()) for g in r.values() if g is not None))
        for r in refs
    ]
    u = torch.zeros(dg.n, dg.columns, dtype=dtype, device=device)
    u[:, 0] = 1.0
    bad = []
    for block in dg.blocks:
        if block.kind == "dense":
            continue
        got_sets = [block.source.vjp(u)] + [
            {k: v[0, 0] for k, v in block.source.materialize(slice(e, e + 1)).items()}
            for e in probes
        ]
        for got, ref, floor in zip(got_sets, refs, floors, strict=True):
            if not agrees(got, ref, block.params, tol, floor):
                bad.append(block.name)
                break
    return bad


def self_check(
    objective: Objective,
    batch: Batch,
    dg: DecomposedGradients,
    hooked_out: Tensor,
    cols: Tensor,
    broadcast: set[str],
) -> list[str]:
    """Blocks to move to dense (see module doc), with a warning naming them."""
    obj = objective
    with only_selected_require_grad(obj.model, obj.params), torch.enable_grad():
        ref_out = obj.outputs(batch.inputs)
        if ref_out.shape != hooked_out.shape or not torch.allclose(
            ref_out.detach(), hooked_out, rtol=1e-5, atol=1e-6
        ):
            if not broadcast:  # pragma: no cover - hooks never change outputs otherwise
                raise UnsupportedError("capturing gradients changed the model's outputs")
            warnings.warn(
                f"modules {', '.join(sorted(broadcast))} run without the batch dimension "
                "in a way gmcurv cannot expand; their per-example gradients are computed "
                "densely instead",
                GmcurvWarning,
                stacklevel=3,
            )
            return sorted(broadcast)
        probes = sorted({0, dg.n - 1}) if obj.mode == "eval" else []
        refs = reference_gradients(obj, ref_out, cols, probes)
    bad = disagreeing_blocks(dg, refs, probes, obj.dtype, obj.device)
    if bad:
        warnings.warn(
            f"the decomposed gradients of {', '.join(bad)} disagree with autograd (a "
            "parameter also used outside its module's forward, e.g. through F.linear, or "
            "examples mixed inside the model); their per-example gradients are computed "
            "densely instead",
            GmcurvWarning,
            stacklevel=3,
        )
    return bad
