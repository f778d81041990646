"""Memory preflight for capture: what capturing per-example gradients will cost, measured
from one hooked forward pass of a single example, checked against the budget before any
batch runs (`preflight_capture`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gmcurv.capture.plan import module_kind, plan_capture
from gmcurv.capture.recording import only_selected_require_grad
from gmcurv.memory import DENSE_GRAM_LIMIT, default_budget, human, preflight


@dataclass(frozen=True)
class CaptureEstimate:
    """Bytes one example costs when its gradients are captured (`estimate_capture`).

    - ``activations``: tensors autograd saves for the backward pass (parameters excluded);
    - ``cotangents``: the Fisher's output columns ``G`` (``C`` x the outputs);
    - ``factors``: decomposed factors (``delta``: ``C`` x the module's outputs, inputs once);
    - ``dense``: dense per-example gradients, ``C`` x the parameters of `dense_modules`;
    - ``check`` (per capture, not per example): the first batch's self-check against
      autograd (`gmcurv.capture.selfcheck`) — one example's graph, one full gradient and
      the largest block's gradient materialised twice.
    """

    columns: int
    activations: int
    cotangents: int
    factors: int
    dense: int
    dense_modules: tuple[str, ...] = ()
    dense_params: int = 0
    check: int = 0
    outputs: int = 0  # the model's outputs (the loss makes a few temporaries of this size)

    def batch_bytes(self, batch_size: int, first: bool = True) -> int:
        """Peak while one batch is captured: the saved graph and as much again for the
        backward pass (the dense fallback re-runs it per column), the loss's temporaries,
        columns and factors; `first`: the first batch also runs the self-check."""
        graph = 2 * self.activations * (1 + (self.columns if self.dense else 0))
        loss = 4 * self.outputs + self.cotangents
        per_batch = batch_size * (graph + loss + self.factors + self.dense)
        return per_batch + (self.check if first else 0)

    def kept_bytes(self, n: int) -> int:
        """Factors of `n` examples held at once, plus the largest Gram kernel formed on them."""
        rows = min(n * self.columns, DENSE_GRAM_LIMIT)
        return n * (self.factors + self.dense) + 3 * rows * rows * 8

    def describe(self) -> str:
        parts = [
            ("activations", self.activations),
            ("output columns", self.cotangents),
            ("factors", self.factors),
            ("dense gradients", self.dense),
        ]
        text = ", ".join(f"{name} {human(b)}" for name, b in parts if b)
        return text + (f"; self-check {human(self.check)} once" if self.check else "")


def estimate_capture(objective, example, fisher: str = "empirical", mc_samples: int = 1):
    """`CaptureEstimate` from one hooked forward pass of a one-example `Batch` (no backward).

    Shapes of every captured module's inputs and outputs give the factor sizes; a
    saved-tensors hook measures what autograd keeps; nothing of size ``C`` is allocated,
    so even an exact Fisher with millions of columns is estimated safely.
    """
    return measure_capture(objective, example, fisher, mc_samples)[0]


def measure_capture(objective, example, fisher: str = "empirical", mc_samples: int = 1):
    """(`estimate_capture`'s estimate, the example's outputs with their autograd graph).

    The forward hooks only read shapes and the saved-tensors hook returns each tensor
    unchanged, so the outputs and graph are those of a hook-free forward of the example
    (with the selected parameters requiring grad): the capture's self-check reuses them
    as its reference forward (`Capturer.offer_reference`).
    """
    obj = objective
    itemsize = torch.empty((), dtype=obj.dtype).element_size()
    plans = plan_capture(obj.model, obj.params)
    hooked = {m for p in plans if p.kind != "dense" for m in p.modules}
    factor_elems = [0, 0]  # [per column, once]
    norm_params = 0
    handles = []

    def record(module, args, output) -> None:
        if not args or not isinstance(output, torch.Tensor):
            return
        x, kind = args[0], module_kind(module)
        factor_elems[0] += output.numel()  # delta: C x the module's outputs
        if kind in ("linear", "conv1d"):
            factor_elems[1] += x.numel()
        elif kind == "conv2d":
            k = math.prod(module.kernel_size) * module.in_channels
            factor_elems[1] += output.numel() // module.out_channels * k
        elif kind == "embedding":
            factor_elems[1] += x.numel() * 8 // itemsize  # int64 indices

    for path in hooked:
        module = obj.model.get_submodule(path)
        if module_kind(module) == "norm":
            norm_params += sum(p.numel() for p in module.parameters(recurse=False))
        handles.append(module.register_forward_hook(record))
    params = {p.untyped_storage().data_ptr() for p in obj.model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    try:
        with (
            only_selected_require_grad(obj.model, obj.params),
            torch.enable_grad(),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            out = obj.outputs(example.inputs)
    finally:
        for h in handles:
            h.remove()
    columns = obj.loss.n_columns(out.shape, fisher, mc_samples)
    dense = [p for p in plans if p.kind == "dense"]
    dense_params = sum(obj.params[k].numel() for p in dense for k in p.params)
    n_params = sum(p.numel() for p in obj.params.values())
    largest = max(sum(obj.params[k].numel() for k in p.params) for p in plans)
    estimate = CaptureEstimate(
        columns=columns,
        activations=sum(saved.values()),
        cotangents=columns * out.numel() * itemsize,
        factors=(columns * (factor_elems[0] + norm_params) + factor_elems[1]) * itemsize,
        dense=columns * dense_params * itemsize,
        dense_modules=tuple(p.name for p in dense),
        dense_params=dense_params,
        check=2 * sum(saved.values()) + (n_params + 2 * largest) * itemsize,
        outputs=out.numel() * itemsize,
    )
    return estimate, out


def check_capture(
    estimate: CaptureEstimate,
    n: int,
    batch_size: int,
    budget: int | None,
    keep: bool = False,
    fisher: str = "empirical",
    n_kept: int | None = None,
) -> None:
    """Raise `MemoryBudgetError` naming the option that fixes it, if capture would not fit.

    `keep`: all examples' factors are held at once (Gram kernels, exact eigenvalues) —
    `n_kept` of them (default `n`; under torchrun, every rank's examples).
    """
    n_kept = n if n_kept is None else n_kept
    limit = default_budget() if budget is None else budget
    one = estimate.batch_bytes(1)
    columns_fix = ""
    if fisher == "exact" and estimate.columns > 1:
        columns_fix = (
            f"; or use --fisher mc or empirical (the exact Fisher has {estimate.columns:,} "
            "columns per example)"
        )
    if one > limit:
        dense = estimate.dense_modules
        exclude = f" (e.g. leave out {', '.join(dense[:4])}, captured densely)" if dense else ""
        preflight(
            one,
            limit,
            f"capturing per-example gradients of a single example ({estimate.describe()})",
            f"use --layers to analyse fewer parameters{exclude}{columns_fix}",
        )
    b = min(batch_size, n)
    if estimate.batch_bytes(b) > limit:
        per_example = max(estimate.batch_bytes(1, first=False), 1)
        fit = max(1, int((limit - estimate.check) // per_example))
        preflight(
            estimate.batch_bytes(b),
            limit,
            f"capturing a batch of {b} examples (per example: {estimate.describe()})",
            f"lower --batch-size to {fit} or less{columns_fix}",
        )
    if keep and estimate.kept_bytes(n_kept) > limit:
        per = estimate.factors + estimate.dense
        fit = max(1, int((limit - estimate.kept_bytes(0)) // max(per, 1)))
        preflight(
            estimate.kept_bytes(n_kept),
            limit,
            f"keeping the decomposed gradients of all {n_kept} examples for eigenvalues "
            f"({human(per)} per example)",
            f"use --samples {fit} or less, or --layers to analyse fewer parameters{columns_fix}",
        )


def preflight_capture(
    objective,
    data,
    batch_size: int,
    fisher: str = "empirical",
    mc_samples: int = 1,
    budget: int | None = None,
    keep: bool = False,
    on_forward=None,
) -> CaptureEstimate:
    """Estimate the memory of capturing `data` and stop early if it exceeds the budget.

    `on_forward(example, outputs)`: receives the preflight's one-example forward (outputs
    with their graph, see `measure_capture`) once the budget check passed.
    """
    example = data.first(1, objective.device, objective.dtype)
    estimate, out = measure_capture(objective, example, fisher, mc_samples)
    n_kept = getattr(data, "n_total", data.n)
    check_capture(estimate, data.n, batch_size, budget, keep, fisher, n_kept)
    if on_forward is not None:
        on_forward(example, out)
    return estimate
