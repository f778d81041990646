"""`CurvatureOperator`: ``v -> C v`` over the objective's flat parameter space.

``C`` is the Hessian ``H = ∇² L(θ)``, the GGN ``G = (1/N) Σ_n J_nᵀ Λ_n J_n`` or their
difference ``R = H - G`` (``kind='residual'``) of the mean loss ``L = (1/N) Σ_n L_n`` over a
data sample: per-batch products (`gmcurv.products`) summed over the batches in a fixed,
checked order (`gmcurv.batchpass`), through cached gradient graphs where they fit
(`gmcurv.graphcache`), summed over ranks under torchrun, divided by ``N``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import vmap

from gmcurv.batch import Batch
from gmcurv.batchpass import DEFAULT_CACHE_BYTES, FixedBatches
from gmcurv.data import DataSample
from gmcurv.distributed import current
from gmcurv.errors import ConfigError
from gmcurv.graphcache import GraphCache, default_graph_bytes, gradient_graph, graph_product
from gmcurv.objective import Objective
from gmcurv.params import ParamSpace
from gmcurv.products import batch_ggnvp, batch_hvp, batch_residual_vp, output_residuals

CURVATURES = ("hessian", "ggn", "residual")


def _accumulate(out: dict[str, Tensor], part: dict[str, Tensor]) -> dict[str, Tensor]:
    """``out += part`` in place (`out` holds a product's own, freshly made tensors)."""
    for k, t in out.items():
        t.add_(part[k])
    return out


@dataclass
class CurvatureOperator:
    """``v -> C v`` for ``C`` the Hessian, the GGN or their difference (``kind='residual'``)
    of the mean loss over `data` (flat vectors).

    Counts products in `n_matvecs`. Forward mode is tried first and switched off for good
    on ``NotImplementedError``. Batches are kept in memory after the first pass when the
    sample is at most `cache_bytes`; otherwise they are re-read on every product and
    checked against the first pass's fingerprints (`DataError` if the order changed).
    Gradient graphs are cached within `graph_bytes` (`cache_graph`: None = while they fit).
    """

    objective: Objective
    data: DataSample
    batch_size: int = 256
    kind: str = "hessian"
    forward_mode: bool = True
    n_matvecs: int = 0
    progress: Callable[[int], None] | None = None
    cache_bytes: int = DEFAULT_CACHE_BYTES
    cache_graph: bool | None = None
    graph_bytes: int = field(default_factory=default_graph_bytes)
    vmap_ok: bool = field(default=True, repr=False)
    merge: bool = True  # one whole-sample graph once the per-batch ones fit (`_whole_sample`)

    def __post_init__(self) -> None:
        if self.kind not in CURVATURES:
            raise ConfigError(f"unknown curvature {self.kind!r}", hint=f"use one of {CURVATURES}")
        obj = self.objective
        self.source = FixedBatches(
            self.data, self.batch_size, obj.device, obj.dtype, self.cache_bytes
        )
        params = {p.untyped_storage().data_ptr() for p in obj.params.values()}
        self.graphs = GraphCache(self.graph_bytes, self.cache_graph, storages=params)
        self.residuals: dict[int, Tensor] = {}

    @property
    def space(self) -> ParamSpace:
        return self.objective.space

    @property
    def size(self) -> int:
        return self.space.size

    @property
    def n(self) -> int:
        """Examples averaged over (all ranks' under torchrun)."""
        return self.data.n_total if current().active else self.data.n

    @staticmethod
    def _reduce(out: dict[str, Tensor]) -> dict[str, Tensor]:
        """Sum partial products over ranks under torchrun (each holds a shard)."""
        comm = current()
        return {k: comm.all_reduce(v) for k, v in out.items()} if comm.active else out

    def batches(self):
        """The data's batches in a fixed order (cached, or re-read and fingerprint-checked);
        nothing per batch is kept when the batches are not."""
        yield from self.source
        if self.source.cached is None:
            self.residuals.clear()
            self.graphs.drop()

    def _whole_sample(self) -> None:
        """After a first pass that kept every batch's data and gradient graph within the
        budget, make the sample one batch: its graph holds the same saved tensors (their
        measured sum fits), and a product becomes one backward over the whole sample
        instead of one per batch (PyHessian's layout: fewer, larger kernels; values equal
        up to summation order). Per-batch graphs and residuals are rebuilt once for it."""
        self.merge = False  # decided once
        n_batches = len(self.source.prints or [])
        if len(self.graphs.graphs) != n_batches or not self._graph_wanted():
            return
        if self.source.merge():
            self.graphs.graphs.clear()
            self.graphs.held = 0
            self.residuals.clear()

    def _product_batches(self):
        """`batches`, made one by `_whole_sample` once the graphs are known to fit."""
        if self.merge and len(self.graphs.graphs) > 1:
            self._whole_sample()
        return self.batches()

    def _residual(self, index: int, batch: Batch) -> Tensor:
        """``r = ∂(Σ_n L_n)/∂f`` of batch `index` (kept while batches are)."""
        if index not in self.residuals:
            r = output_residuals(self.objective, batch)
            if self.source.reusable:
                self.residuals[index] = r
            return r
        return self.residuals[index]

    # -- cached gradient graphs: H v = ∇<g, v> by one backward through g's graph ----------
    def _graph_wanted(self) -> bool:
        if self.kind == "ggn" or self.objective.mode != "eval" or self.graphs.enabled is False:
            return False
        return self.source.reusable

    def _graph_product(self, index: int, batch: Batch, vec: dict[str, Tensor], batched: bool):
        if not self._graph_wanted():
            return None
        graph = self.graphs.get(index)
        if graph is None:
            r = self._residual(index, batch) if self.kind == "residual" else None
            graph = self.graphs.build(
                index, lambda: gradient_graph(self.objective, batch, self.space.names, r)
            )
        return None if graph is None else graph_product(graph, self.space.names, vec, batched)

    # -- products --------------------------------------------------------------------------
    def _call(self, index: int, batch: Batch, vec: dict[str, Tensor], forward: bool):
        if self.kind == "ggn":
            return batch_ggnvp(self.objective, batch, vec, forward)
        if index >= 0 and (out := self._graph_product(index, batch, vec, False)) is not None:
            return out
        if self.kind == "hessian":
            return batch_hvp(self.objective, batch, vec, forward)
        r = self._residual(index, batch)
        return batch_residual_vp(self.objective, batch, vec, forward, r)

    def _batch_product(
        self, batch: Batch, vec: dict[str, Tensor], index: int = -1
    ) -> dict[str, Tensor]:
        if self.forward_mode:
            try:
                return self._call(index, batch, vec, True)
            except (NotImplementedError, RuntimeError) as e:
                if "forward" not in str(e).lower() and not isinstance(e, NotImplementedError):
                    raise
                self.forward_mode = False
        return self._call(index, batch, vec, False)

    def _mean(self, out: dict[str, Tensor] | None, count: int) -> dict[str, Tensor]:
        """Sum over ranks, count the products, divide by ``N``."""
        assert out is not None
        out = self._reduce(out)
        self.n_matvecs += count
        if self.progress:
            self.progress(count)
        return {k: v.div_(self.n) for k, v in out.items()}  # products' own tensors

    def matvec_dict(self, vector: dict[str, Tensor]) -> dict[str, Tensor]:
        """``C v`` in parameter layout."""
        out: dict[str, Tensor] | None = None
        for i, batch in enumerate(self._product_batches()):
            part = self._batch_product(batch, vector, i)
            out = part if out is None else _accumulate(out, part)
        return self._mean(out, 1)

    def matvec(self, v: Tensor) -> Tensor:
        """``C v`` for a flat vector (any float dtype; computed in the model's dtype)."""
        vec = self.space.unflatten(v.to(self.objective.dtype))
        return self.space.flatten(self.matvec_dict(vec)).to(v.dtype)

    __call__ = matvec

    def matmat(self, V: Tensor) -> Tensor:
        """``C V^T`` for ``V: [m, P]`` (rows are vectors), ``[m, P]``; the products of one
        batch run vectorised with ``torch.func.vmap`` when the model allows, else in a loop."""
        vecs = self.space.unflatten(V.to(self.objective.dtype))
        m = V.shape[0]
        out: dict[str, Tensor] | None = None
        for i, batch in enumerate(self._product_batches()):
            part = self._batch_matmat(batch, vecs, i, m)
            out = part if out is None else _accumulate(out, part)
        mean = self._mean(out, m)
        flat = torch.cat([mean[k].reshape(m, -1) for k in self.space.names], dim=1)  # [m, P]
        return flat.to(V.dtype)

    def _batch_matmat(self, batch: Batch, vecs: dict[str, Tensor], index: int, m: int):
        if self.kind == "hessian" and self.vmap_ok and self._graph_wanted():
            try:
                out = self._graph_product(index, batch, vecs, True)
                if out is not None:
                    return out
            except Exception:  # no batching rule somewhere: one product at a time
                self.vmap_ok = False
        if self.vmap_ok:
            if self.kind == "residual":
                self._residual(index, batch)  # computed outside vmap
            try:
                return vmap(lambda v: self._batch_product(batch, v, index))(vecs)
            except Exception:  # no batching rule somewhere: one product at a time
                self.vmap_ok = False
        rows = [
            self._batch_product(batch, {k: t[j] for k, t in vecs.items()}, index) for j in range(m)
        ]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def is_random(self, seed: int = 0) -> bool:
        """Whether products are random (train mode with active Dropout): two products with
        the same vector disagree. Costs two products, and only in that case."""
        if self.objective.mode != "train" or not any(
            isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0
            for m in self.objective.model.modules()
        ):
            return False
        gen = torch.Generator(device=self.objective.device).manual_seed(seed)
        v = torch.randn(self.size, generator=gen, dtype=torch.float64, device=self.objective.device)
        a, b = self.matvec(v), self.matvec(v)
        return not torch.allclose(a, b, rtol=1e-6, atol=1e-12)
