"""The one-off self-check of decomposed gradients against plain autograd.

Eval mode (`check_example`, the default): the first batch is captured once, then its first
example alone runs a hook-free forward and one backward. Its outputs must equal its row of
the hooked batch's (else broadcast-expanded modules are at fault, or examples interact
inside the model), and per block its decomposed gradient ``g[0, 0]`` — taken from the whole
batch's factors — must equal autograd's gradient of that example alone, ``J_0ᵀ G[0, 0]``
(else a parameter is used outside its module, rows are not example-major, or examples
mix). Cost: about half a forward+backward of one example on top of the capture; the
forward is the memory preflight's when it ran on that example (`Capturer.offer_reference`).

Train mode (`self_check`): Dropout masks depend on the batch's shape, so the first examples
of the first batch are captured on their own and checked against a hook-free pass of the
same slice: the outputs, and per block ``Σ_n g[n, 0]`` against autograd's ``Jᵀ G[0]``.

A block that fails is named so the `Capturer` can capture it densely; `CheckReport` says
what was checked, for the report.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gmcurv.batch import Batch, slice_inputs
from gmcurv.capture.gradients import DecomposedGradients
from gmcurv.capture.recording import only_selected_require_grad
from gmcurv.errors import GmcurvWarning, UnsupportedError
from gmcurv.objective import Objective

Grads = dict[str, Tensor | None]


@dataclass
class CheckReport:
    """What the one-off self-check compared (recorded in reports)."""

    examples: int  # examples checked (the first ones of the first batch)
    batch: int  # examples in that batch
    method: str  # what was compared with what
    blocks: int = 0  # decomposed blocks compared with autograd
    fallbacks: list[str] = field(default_factory=list)  # blocks moved to dense

    def as_dict(self) -> dict:
        return {
            "examples": self.examples,
            "column": 0,
            "method": self.method,
            "blocks_checked": self.blocks,
            "dense_fallbacks": list(self.fallbacks),
        }


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
        g = got[name]
        r = ref[name]
        if r is None:
            err += float(torch.linalg.vector_norm(g)) ** 2
            continue
        e, s = _sq_dist(g, r)
        err, ref_sq = err + e, ref_sq + s
    return math.sqrt(err) <= tol * max(math.sqrt(ref_sq), floor, 1e-30)


CHECK_CHUNK = 1 << 18  # elements per chunk of `_sq_dist` (1 MB of float32: stays in cache)


def _sq_dist(g: Tensor, r: Tensor) -> tuple[float, float]:
    """``(||g - r||², ||r||²)`` (norms in `g`'s dtype, squares summed in float64) chunk by
    chunk: no full-size difference (a tied ``[V, O]`` table's is 154 MB on GPT-2)."""
    g, r = g.reshape(-1), r.reshape(-1)
    err = ref = 0.0
    for lo in range(0, g.numel(), CHECK_CHUNK):
        gc, rc = g[lo : lo + CHECK_CHUNK], r[lo : lo + CHECK_CHUNK].to(g.dtype)
        err += float(torch.linalg.vector_norm(gc - rc)) ** 2
        ref += float(torch.linalg.vector_norm(rc)) ** 2
    return err, ref


def _tol(dtype: torch.dtype) -> float:
    return 1e-8 if dtype == torch.float64 else 2e-3


def _norm(grads: Grads) -> float:
    """``||g||`` over all parameters (norms in the gradients' own dtype)."""
    return math.sqrt(
        sum(float(torch.linalg.vector_norm(g)) ** 2 for g in grads.values() if g is not None)
    )


def disagreeing_blocks(
    dg: DecomposedGradients,
    refs: list[Grads],
    probes: list[int],
    dtype: torch.dtype,
    device: torch.device,
) -> list[str]:
    """Names of the decomposed blocks whose sum (and probed examples) miss `refs`; the
    tolerance is relative, floored at 1e-3 of the whole gradient's norm."""
    tol = _tol(dtype)
    floors = [1e-3 * _norm(r) for r in refs]
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
        _warn_disagree(bad)
    return bad


def _outputs_agree(ref: Tensor, got: Tensor) -> bool:
    """Same outputs up to rounding: ``||ref - got|| <= tol ||ref||`` (a batch and a single
    example may take different kernels, so not bitwise)."""
    if ref.shape != got.shape:
        return False
    tol = 1e-9 if ref.dtype == torch.float64 else 1e-4
    scale = float(torch.linalg.vector_norm(ref))
    return float(torch.linalg.vector_norm(ref - got)) <= tol * max(scale, 1e-30)


def check_example(
    objective: Objective,
    batch: Batch,
    dg: DecomposedGradients,
    hooked_out: Tensor,
    cols: Tensor,
    broadcast: set[str],
    reference: tuple[Batch, Tensor] | None = None,
) -> tuple[list[str], int]:
    """Eval-mode check of the first example (see module doc): (blocks to move to dense,
    blocks compared). `dg`, `hooked_out` and `cols` are the hooked capture of `batch`;
    `reference`: (an example, its hook-free outputs with their graph), used instead of a
    forward of its own when the example is `batch`'s first (same start, equal inputs)."""
    obj = objective
    one = Batch(slice_inputs(batch.inputs, slice(0, 1)), _head_targets(batch), batch.start)
    hooked = [b for b in dg.blocks if b.kind != "dense"]
    with only_selected_require_grad(obj.model, obj.params), torch.enable_grad():
        if reference is not None and _same_example(reference[0], one):
            ref_out = reference[1]
        else:
            ref_out = obj.outputs(one.inputs)
        del reference
        if not _outputs_agree(ref_out.detach(), hooked_out[:1]):
            bad = sorted(broadcast) or [b.name for b in hooked]
            why = (
                f"modules {', '.join(sorted(broadcast))} run without the batch dimension in a "
                "way gmcurv cannot expand"
                if broadcast
                else "the first example alone gives other outputs than in its batch "
                "(examples interact inside the model)"
            )
            warnings.warn(
                f"{why}; the per-example gradients of {', '.join(bad)} are computed densely "
                "instead",
                GmcurvWarning,
                stacklevel=3,
            )
            return bad, len(hooked)
        params = list(obj.params.values())
        grads = torch.autograd.grad(ref_out, params, grad_outputs=cols[0][:1], allow_unused=True)
    ref = dict(zip(obj.params, grads, strict=True))
    del grads, ref_out
    tol, floor = _tol(obj.dtype), 1e-3 * _norm(ref)
    bad = []
    for block in hooked:
        got = {k: v[0, 0] for k, v in block.source.materialize(slice(0, 1)).items()}
        if not agrees(got, ref, block.params, tol, floor):
            bad.append(block.name)
        del got
    if bad:
        _warn_disagree(bad)
    return bad, len(hooked)


def _same_example(a: Batch, b: Batch) -> bool:
    """Same start index and equal inputs (tensors, or dicts of tensors)?"""
    if a.start != b.start or len(a) != len(b):
        return False
    x, y = a.inputs, b.inputs
    if isinstance(x, dict) or isinstance(y, dict):
        if not (isinstance(x, dict) and isinstance(y, dict)) or x.keys() != y.keys():
            return False
        return all(_equal(x[k], y[k]) for k in x)
    return _equal(x, y)


def _equal(x, y) -> bool:
    if not (isinstance(x, Tensor) and isinstance(y, Tensor)):
        return False
    return x.shape == y.shape and x.dtype == y.dtype and bool(torch.equal(x, y))


def _head_targets(batch: Batch):
    return None if batch.targets is None else batch.targets[:1]


def _warn_disagree(bad: list[str]) -> None:
    warnings.warn(
        f"the decomposed gradients of {', '.join(bad)} disagree with autograd (a "
        "parameter also used outside its module's forward, e.g. through F.linear, or "
        "examples mixed inside the model); their per-example gradients are computed "
        "densely instead",
        GmcurvWarning,
        stacklevel=4,
    )
