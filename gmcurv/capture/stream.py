"""Capturing a whole data sample: one batch, a stream of batches, or all at once."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from gmcurv.batch import Batch
from gmcurv.capture.budget import preflight_capture
from gmcurv.capture.capturer import Capturer, CaptureSteps
from gmcurv.capture.gradients import DecomposedGradients
from gmcurv.data import DataSample
from gmcurv.distributed import gather_decomposed
from gmcurv.objective import Objective

ProgressFn = Callable[[int], None]


def capture(
    objective: Objective,
    batch: Batch,
    fisher: str = "empirical",
    mc_samples: int = 1,
    seed: int = 0,
) -> DecomposedGradients:
    """Decomposed per-example gradients of one batch."""
    return Capturer(objective, fisher, mc_samples, seed)(batch)


def capture_stream(
    objective: Objective,
    data: DataSample,
    batch_size: int,
    fisher: str = "empirical",
    mc_samples: int = 1,
    seed: int = 0,
    progress: ProgressFn | None = None,
    capturer: Capturer | None = None,
    budget_bytes: int | None = None,
    keep: bool = False,
) -> Iterator[DecomposedGradients]:
    """Capture batch after batch (memory: one batch of factors at a time).

    A memory preflight runs first (`gmcurv.capture.budget.preflight_capture`; `budget_bytes`
    None = the default budget); `keep`: the caller holds every batch's factors.
    """
    cap = capturer or Capturer(objective, fisher, mc_samples, seed)
    preflight_capture(
        objective,
        data,
        batch_size,
        cap.fisher,
        cap.mc_samples,
        budget_bytes,
        keep,
        on_forward=cap.offer_reference,  # the preflight's forward serves the self-check
    )
    for batch in data.batches(batch_size, objective.device, objective.dtype):
        dg = cap(batch)
        if progress:
            progress(dg.n)
        yield dg


def capture_all(
    objective: Objective,
    data: DataSample,
    batch_size: int,
    fisher: str = "empirical",
    mc_samples: int = 1,
    seed: int = 0,
    progress: ProgressFn | None = None,
    budget_bytes: int | None = None,
    steps: CaptureSteps | None = None,
) -> DecomposedGradients:
    """All examples' factors at once (needed for Gram kernels), memory O(N (I+O)) per layer.

    Under torchrun each rank captures its shard and the factors are all-gathered.
    `steps`: progress inside each batch (`CaptureSteps`).
    """
    cap = Capturer(objective, fisher, mc_samples, seed, steps=steps)
    stream = capture_stream(
        objective, data, batch_size, fisher, mc_samples, seed, progress, cap, budget_bytes, True
    )
    local = DecomposedGradients.cat(list(stream))
    return gather_decomposed(local)  # all ranks' examples under torchrun
