"""``L(θ0 + Σ_k c_k d_k)`` at many points ``c``, several per forward pass.

The points of a chunk are stacked into parameter tensors ``[C, *shape]`` and run through one
functional model (`gmcurv.landscape.chunks`) per data batch; the chunk size comes from a
memory budget. The model is never copied and its parameters are never modified. Each chunk
sees every batch; a small data sample (and the affine terms of its input layers) is kept in
memory after the first pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gmcurv.batch import Batch
from gmcurv.data import DataSample
from gmcurv.landscape.chunks import ChunkOutputs
from gmcurv.landscape.stacked import FastLinears, affine_terms
from gmcurv.landscape.totals import PointTotals
from gmcurv.memory import default_budget
from gmcurv.objective import Objective

ProgressFn = Callable[[float], None]

DEFAULT_BUDGET = 512 * 2**20  # bytes for one chunk of grid points (parameters + activations)
MAX_CHUNK = 256
CHUNK_ROWS = 4096  # examples x points per forward (activations stay in cache on CPU)
DEFAULT_CACHE_BYTES = 256 * 2**20  # keep the data sample in memory up to this size


@dataclass
class PointValues:
    """Mean loss (and accuracy) at each evaluated point, float64."""

    loss: Tensor
    accuracy: Tensor | None
    n: int
    chunk: int
    vmapped: bool
    mode: str = "vmap"  # 'stacked' (baddbmm), 'vmap' or 'loop' (one point at a time)


# ------------------------------------------------------------------------------ chunk size
def _activation_elems(objective: Objective, batch: Batch) -> int:
    """Output elements of every module for one example (a bound on live activations)."""
    total = 0

    def hook(_m, _inp, out):
        nonlocal total
        if isinstance(out, Tensor):
            total += out.numel()

    inputs = batch.inputs
    one = {n: v[:1] for n, v in inputs.items()} if isinstance(inputs, dict) else inputs[:1]
    handles = [m.register_forward_hook(hook) for m in objective.model.modules()]
    try:
        with torch.no_grad():
            objective.outputs(one)
    finally:
        for h in handles:
            h.remove()
    return max(total, 1)


def chunk_size(
    objective: Objective, probe: Batch, batch_size: int, budget_bytes: int | None = None
) -> int:
    """Grid points per vmapped forward: about `CHUNK_ROWS` rows (points x examples), bigger
    chunks being memory-bound on CPU, and parameters plus activations within budget."""
    budget = budget_bytes if budget_bytes is not None else min(DEFAULT_BUDGET, default_budget())
    elt = torch.empty((), dtype=objective.dtype).element_size()
    per_point = elt * (objective.space.size + 2 * batch_size * _activation_elems(objective, probe))
    return int(max(1, min(MAX_CHUNK, CHUNK_ROWS // batch_size, budget // per_point)))


# ------------------------------------------------------------------ parameters and batches
class PointParams:
    """``θ0 + Σ_k c[:, k] d_k`` stacked over a chunk: ``[C, *shape]`` per parameter; the
    weight slot of an affine input layer carries the coordinates ``[C, K]`` instead."""

    def __init__(
        self,
        objective: Objective,
        directions: Sequence[Mapping[str, Tensor]],
        fast: FastLinears,
    ) -> None:
        device, dtype = objective.device, objective.dtype
        self.center = {k: p.detach() for k, p in objective.params.items()}
        self.dirs = [{k: d[k].to(device, dtype) for k in self.center} for d in directions]
        self.fast = fast
        self._skip = fast.affine_params

    def at(self, c: Tensor) -> dict[str, Tensor]:
        out = {}
        for name, t in self.center.items():
            if name in self._skip:
                continue
            view = (-1, *([1] * t.ndim))
            acc = torch.addcmul(t, c[:, 0].reshape(view), self.dirs[0][name])  # [C, *shape]
            for k in range(1, len(self.dirs)):
                acc.addcmul_(c[:, k].reshape(view), self.dirs[k][name])
            out[name] = acc
        for w, _ in self.fast.affine.values():
            out[w] = c
        return out

    def terms(self, x) -> dict[str, Tensor]:
        """The affine terms ``[K+1, B, out]`` of the input layers for the batch inputs `x`."""
        return affine_terms(x, self.fast.affine, self.center, self.dirs)


def _nbytes(batch: Batch) -> int:
    parts = list(batch.inputs.values()) if isinstance(batch.inputs, dict) else [batch.inputs]
    if batch.targets is not None:
        parts.append(batch.targets)
    return sum(t.numel() * t.element_size() for t in parts)


class BatchPasses:
    """The data batches, pass after pass: kept in memory after the first pass when they fit
    in `cache_bytes` (each with a dict for values derived from it), else re-read."""

    def __init__(self, data: DataSample, batch_size: int, device, dtype, cache_bytes: int):
        self.data, self.batch_size, self.device, self.dtype = data, batch_size, device, dtype
        self.cache_bytes = cache_bytes
        self.kept: list[tuple[Batch, dict]] | None = None

    def __iter__(self) -> Iterator[tuple[Batch, dict]]:
        if self.kept is not None:
            yield from self.kept
            return
        store: list[tuple[Batch, dict]] | None = []
        held = 0
        for batch in self.data.batches(self.batch_size, self.device, self.dtype):
            entry: tuple[Batch, dict] = (batch, {})
            if store is not None:
                held += _nbytes(batch)
                if held <= self.cache_bytes:
                    store.append(entry)
                else:
                    store = None
            yield entry
        self.kept = store


# ------------------------------------------------------------------------------ evaluation
def evaluate_points(
    objective: Objective,
    data: DataSample,
    directions: Sequence[Mapping[str, Tensor]],
    coords: Tensor,
    *,
    batch_size: int = 256,
    budget_bytes: int | None = None,
    chunk: int | None = None,
    progress: ProgressFn | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    affine_inputs: bool = True,
    stacked: bool = True,
) -> PointValues:
    """``L(θ0 + Σ_k coords[m, k] d_k)`` for every row `m` of `coords` ``[M, K]``.

    Chunks of points go through one functional model (``vmap`` over stacked parameters),
    falling back to one point at a time for models ``vmap`` cannot batch. With
    `affine_inputs`, Linear layers fed by the raw input use their affine form; with
    `stacked`, models whose selected parameters all sit in Linear layers run without
    ``vmap``, as stacked ``baddbmm`` products (`gmcurv.landscape.stacked`). Under torchrun
    the sums are all-reduced over ranks.
    """
    if coords.ndim != 2 or coords.shape[1] != len(directions):
        raise ValueError("coords must be [M, number of directions]")
    device, dtype = objective.device, objective.dtype
    probe = data.first(min(2, data.n), device, dtype)
    size = chunk or chunk_size(objective, probe, min(batch_size, data.n), budget_bytes)
    fast = FastLinears.plan(objective, probe.inputs, affine=affine_inputs, stacked=stacked)
    points = PointParams(objective, directions, fast)
    outputs = ChunkOutputs(objective, fast)
    passes = BatchPasses(data, batch_size, device, dtype, cache_bytes)
    totals = PointTotals(objective, coords.shape[0], device)
    n_batches = max(1, math.ceil(data.n / batch_size))
    cs = coords.to(device, dtype)
    with torch.no_grad():
        for first, s in enumerate(range(0, cs.shape[0], size)):
            c = cs[s : s + size]
            params = points.at(c)
            for batch, derived in passes:
                if fast.affine and "terms" not in derived:
                    derived["terms"] = points.terms(batch.inputs)
                outs = outputs(c, params, batch.inputs, derived.get("terms", {}))
                totals.add(s, outs, batch, first_pass=first == 0)
                if progress is not None:
                    progress(c.shape[0] / n_batches)
    mean, acc, n = totals.means()
    return PointValues(mean, acc, n, int(size or 1), outputs.vmapped, outputs.mode)
