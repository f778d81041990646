"""The exact GGN trace from C-class square-root factors, without products.

``tr G = (1/N) Σ_n s_n Σ_c ||g[n,c]||²`` where ``g[n,c] = J_nᵀ s_c`` are the exact Fisher's
columns (``Λ_n = Σ_c s_c s_cᵀ``, `gmcurv.losses`) and ``s_n`` turns the Fisher of a
per-token mean into the GGN (`_ggn_scale`). Costs one capture per batch with ``C``
backward passes (``C`` classes x tokens), so `auto` uses it up to `EXACT_GGN_MAX_COLUMNS`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gmcurv.batch import Batch
from gmcurv.data import DataSample
from gmcurv.objective import Objective

EXACT_GGN_MAX_COLUMNS = 256  # C-class factors per example beyond which auto goes stochastic
# `grow`: capture batches up to this much memory (and the budget). Larger is not faster in a
# one-off command: a bigger batch is more fresh memory to fault in (W2, cold process, one
# thread: 256 examples 0.16 s, 512 0.12 s, 1,024 0.14 s, 2,048 0.18 s)
GROWN_BATCH_BYTES = 16 * 2**20


def _ggn_scale(objective: Objective, batch: Batch) -> Tensor | None:
    """Per-example factor turning the exact Fisher into the GGN (None: they are equal).

    Cross-entropy averaged over an example's ``T_n`` valid tokens has token weights
    ``w = 1/T_n``: the exact Fisher is ``Σ_t w^2 J_t^T Λ_t J_t`` and the GGN
    ``Σ_t w J_t^T Λ_t J_t``, so ``GGN_n = T_n F_n``. For MSE (``Λ = (2/E) I``) and one
    prediction per example they coincide.
    """
    from gmcurv.losses import IGNORE_INDEX, CrossEntropy

    loss = objective.loss
    if not isinstance(loss, CrossEntropy):
        return None
    tgt = objective.targets(batch, None)  # type: ignore[arg-type]  # CE ignores outputs
    if loss.shift:
        tgt = tgt[:, 1:]
    if tgt.ndim < 2:
        return None
    return (tgt != IGNORE_INDEX).reshape(tgt.shape[0], -1).sum(1).clamp_min(1).double()


def exact_ggn_columns(objective: Objective, data: DataSample) -> int:
    """C-class factor columns per example the exact GGN trace needs."""
    example = data.first(1, objective.device, objective.dtype)
    with torch.no_grad():
        out = objective.outputs(example.inputs)
    return objective.loss.n_columns(out.shape, "exact", 1)


def capture_batch(estimate, n: int, batch_size: int, budget_bytes: int | None) -> int:
    """The largest batch (evened out over the batches it makes), from `batch_size` up to
    all `n` examples, whose capture
    (`CaptureEstimate.batch_bytes`, self-check included) fits both `GROWN_BATCH_BYTES`
    and the budget; `batch_size` itself when no larger one does. With at least twice
    `GROWN_BATCH_BYTES` free (the default budget is half of it) it depends on the model
    and the data only, so the batches are reproducible."""
    from gmcurv.memory import default_budget

    limit = min(GROWN_BATCH_BYTES, default_budget() if budget_bytes is None else budget_bytes)
    if batch_size >= n or estimate.batch_bytes(batch_size) > limit:
        return batch_size
    per = max(estimate.batch_bytes(1, first=False), 1)
    fit = max(batch_size, min(n, int((limit - estimate.check) // per)))
    return max(batch_size, -(-n // -(-n // fit)))  # evened out: no small remainder batch


def exact_ggn_trace(
    objective: Objective,
    data: DataSample,
    batch_size: int = 256,
    budget_bytes: int | None = None,
    progress: Callable[[int], None] | None = None,
    check: bool = True,
    grow: bool = False,
):
    """``tr G`` per block from the C-class square-root factors (no products):
    ``tr G = (1/N) Σ_n s_n Σ_c ||g[n,c]||^2`` with ``s_n`` from `_ggn_scale`.

    Returns a `gmcurv.fisher.FisherAccumulator` whose ``trace(block)`` gives the value on
    the sample and the standard error over examples. `check`: the capture's first-batch
    self-check against autograd (`gmcurv.capture.Capturer`); leave on unless the model's
    capture was already verified. `grow`: `batch_size` is only a default (the command
    line's ``--batch-size`` left unset), so batches grow to what `capture_batch` allows:
    fewer, larger kernels (W2: 8 batches of 256 -> 4 of 512, about 25 % less CPU);
    per-example values are the same up to float rounding.
    """
    from gmcurv.capture import Capturer
    from gmcurv.capture.budget import preflight_capture
    from gmcurv.fisher import FisherAccumulator

    cap = Capturer(objective, "exact", check=check)
    est = preflight_capture(objective, data, batch_size, "exact", 1, budget_bytes, False)
    if grow:
        batch_size = capture_batch(est, data.n, batch_size, budget_bytes)
    acc = FisherAccumulator(diagonal=False)
    for batch in data.batches(batch_size, objective.device, objective.dtype):
        dg = cap(batch)
        scale = _ggn_scale(objective, batch)
        for b in dg.blocks:
            acc.block_params[b.name] = b.params
            acc.block_kinds[b.name] = b.kind
            s = b.source.sq_norms().sum(1).double()
            acc.sq_norms.setdefault(b.name, []).append(s if scale is None else s * scale)
        acc.losses.append(dg.losses.double())
        if progress:
            progress(dg.n)
    return acc.gathered()  # all ranks' examples under torchrun
