"""`CurvatureOperator`: ``v -> C v`` over the objective's flat parameter space.

``C`` is the Hessian ``H = ∇² L(θ)``, the GGN ``G = (1/N) Σ_n J_nᵀ Λ_n J_n`` or their
difference ``R = H - G`` (``kind='residual'``) of the mean loss ``L = (1/N) Σ_n L_n`` over a
data sample: per-batch products (`gmcurv.products.BatchProducts`) summed over the batches
in a fixed, checked order, through cached gradient graphs where they fit (what is kept per
batch: `gmcurv.batchstate`), summed over ranks under torchrun, divided by ``N``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from gmcurv.batch import Batch
from gmcurv.batchpass import DEFAULT_CACHE_BYTES, FixedBatches
from gmcurv.batchstate import BatchState
from gmcurv.data import DataSample
from gmcurv.distributed import current
from gmcurv.errors import ConfigError
from gmcurv.graphcache import (
    GraphCache,
    OutputGraph,
    default_graph_bytes,
    graph_product,
    output_graph_product,
)
from gmcurv.objective import Objective
from gmcurv.params import ParamSpace
from gmcurv.products import BatchProducts

CURVATURES = ("hessian", "ggn", "residual")


def _accumulate(out: dict[str, Tensor], part: dict[str, Tensor]) -> dict[str, Tensor]:
    """``out += part`` in place (`out` holds a product's own, freshly made tensors)."""
    for k, t in out.items():
        t.add_(part[k])
    return out


class CurvatureOperator:
    """``v -> C v`` for ``C`` the Hessian, the GGN or their difference (``kind='residual'``)
    of the mean loss over `data` (flat vectors).

    Counts products in `n_matvecs` and reports each to `progress(k)`. Forward mode is tried
    first and switched off for good on ``NotImplementedError``. Batches are kept in memory
    after the first pass when the sample is at most `cache_bytes`; otherwise they are
    re-read on every product and checked against the first pass's fingerprints
    (`DataError` if the order changed). Gradient graphs are cached within `graph_bytes`
    (`cache_graph`: None = while they fit), as one whole-sample graph when it fits
    (`merge`); `prepare` builds them before the first product (else that product does).
    """

    def __init__(
        self,
        objective: Objective,
        data: DataSample,
        batch_size: int = 256,
        kind: str = "hessian",
        forward_mode: bool = True,
        n_matvecs: int = 0,
        progress: Callable[[int], None] | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        cache_graph: bool | None = None,
        graph_bytes: int | None = None,
        vmap_ok: bool = True,
        merge: bool = True,
    ) -> None:
        if kind not in CURVATURES:
            raise ConfigError(f"unknown curvature {kind!r}", hint=f"use one of {CURVATURES}")
        self.objective, self.data, self.batch_size, self.kind = objective, data, batch_size, kind
        self._space = objective.space  # fixed for the objective's life; built once, not per use
        self.n_matvecs, self.progress = n_matvecs, progress
        source = FixedBatches(data, batch_size, objective.device, objective.dtype, cache_bytes)
        params = {p.untyped_storage().data_ptr() for p in objective.params.values()}
        budget = default_graph_bytes() if graph_bytes is None else graph_bytes
        graphs = GraphCache(budget, cache_graph, storages=params)
        self.state = BatchState(objective, kind, source, graphs, merge)
        self.engine = BatchProducts(objective, kind, forward_mode, vmap_ok)

    def __repr__(self) -> str:
        return (
            f"CurvatureOperator(kind={self.kind!r}, size={self.size}, n={self.data.n}, "
            f"batch_size={self.batch_size}, n_matvecs={self.n_matvecs})"
        )

    # -- what it acts on -------------------------------------------------------------------
    @property
    def space(self) -> ParamSpace:
        return self._space

    @property
    def size(self) -> int:
        return self.space.size

    @property
    def n(self) -> int:
        """Examples averaged over (all ranks' under torchrun)."""
        return self.data.n_total if current().active else self.data.n

    # -- state, by the parts that hold it -------------------------------------------------
    source = property(lambda self: self.state.source)
    graphs = property(lambda self: self.state.graphs)
    residuals = property(lambda self: self.state.residuals)
    forward_mode = property(lambda self: self.engine.forward_mode)
    vmap_ok = property(lambda self: self.engine.vmap_ok)

    def batches(self) -> Iterator[Batch]:
        """The data's batches in a fixed order (cached, or re-read and fingerprint-checked);
        nothing per batch is kept when the batches are not."""
        for _, batch in self.state.batches():
            yield batch

    @property
    def graph_pending(self) -> bool:
        """Whether the next product would first build gradient graphs (`prepare`)."""
        return self.state.pending

    def prepare(self) -> None:
        """Build the gradient graphs now (the first pass), not inside the first product:
        one over the whole sample when it fits (`gmcurv.batchstate.BatchState.prepare`)."""
        self.state.prepare()

    def _product_batches(self) -> Iterator[tuple[int, Batch]]:
        if self.state.pending:
            self.state.prepare()
        self.state.merge_if_fitting()
        return self.state.batches()

    # -- products --------------------------------------------------------------------------
    def _batch(self, index: int, batch: Batch, vec: dict[str, Tensor]) -> dict[str, Tensor]:
        """Batch `index`'s sum ``Σ_n C_n v``: through its gradient graph when kept."""
        graph = self.state.graph(index, batch)
        if graph is not None:
            return self._through(graph, vec, False)
        r = self.state.residual(index, batch) if self.kind == "residual" else None
        return self.engine.product(batch, vec, r)

    def _through(self, graph, vec: dict[str, Tensor], batched: bool) -> dict[str, Tensor]:
        """A product through a kept graph: ``∇<g, v>`` (Hessian, ``H - G``) or
        ``Jᵀ Λ J v`` (GGN, `gmcurv.graphcache.OutputGraph`)."""
        names = self.space.names
        if isinstance(graph, OutputGraph):
            lam = self.objective.loss.output_hessian_vp
            return output_graph_product(graph, names, vec, lam, batched)
        return graph_product(graph, names, vec, batched)

    def _batch_matmat(self, index: int, batch: Batch, vecs: dict[str, Tensor], m: int):
        engine = self.engine
        if self.kind != "residual" and engine.vmap_ok and self.state.graph_wanted():
            try:  # the vectors as one batched backward through the graph
                graph = self.state.graph(index, batch)
                if graph is not None:
                    return self._through(graph, vecs, True)
            except Exception:  # no batching rule somewhere: one product at a time
                engine.vmap_ok = False
        if self.kind == "residual":
            self.state.residual(index, batch)  # computed (and kept) outside vmap
        return engine.each(lambda v: self._batch(index, batch, v), vecs, m)

    def _total(self, out: dict[str, Tensor] | None, count: int) -> dict[str, Tensor]:
        """Sum over ranks and count the products (the sum ``Σ_n C_n v``, not yet / ``N``)."""
        assert out is not None
        comm = current()
        if comm.active:  # each rank holds a shard's partial sum
            out = {k: comm.all_reduce(v) for k, v in out.items()}
        self.n_matvecs += count
        if self.progress:
            self.progress(count)
        return out

    def _mean(self, out: dict[str, Tensor] | None, count: int) -> dict[str, Tensor]:
        """Sum over ranks, count the products, divide by ``N``."""
        n = self.n
        return {k: v.div_(n) for k, v in self._total(out, count).items()}  # products' own

    def _sum(self, vector: dict[str, Tensor]) -> dict[str, Tensor]:
        """``Σ_n C_n v`` over every batch (and rank), counted as one product."""
        out: dict[str, Tensor] | None = None
        for i, batch in self._product_batches():
            part = self._batch(i, batch, vector)
            out = part if out is None else _accumulate(out, part)
        return self._total(out, 1)

    def matvec_dict(self, vector: dict[str, Tensor]) -> dict[str, Tensor]:
        """``C v`` in parameter layout."""
        n = self.n
        return {k: v.div_(n) for k, v in self._sum(vector).items()}  # products' own tensors

    def matvec(self, v: Tensor) -> Tensor:
        """``C v`` for a flat vector (any float dtype; computed in the model's dtype); the
        ``1/N`` is one division of the flat vector, not one per parameter tensor."""
        vec = self.space.unflatten(v.to(self.objective.dtype))
        return self.space.flatten(self._sum(vec)).div_(self.n).to(v.dtype)

    __call__ = matvec

    def matmat(self, V: Tensor) -> Tensor:
        """``C V^T`` for ``V: [m, P]`` (rows are vectors), ``[m, P]``; the products of one
        batch run vectorised with ``torch.func.vmap`` when the model allows, else in a loop."""
        vecs = self.space.unflatten(V.to(self.objective.dtype))
        m = V.shape[0]
        out: dict[str, Tensor] | None = None
        for i, batch in self._product_batches():
            part = self._batch_matmat(i, batch, vecs, m)
            out = part if out is None else _accumulate(out, part)
        mean = self._mean(out, m)
        flat = torch.cat([mean[k].reshape(m, -1) for k in self.space.names], dim=1)  # [m, P]
        return flat.to(V.dtype)

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
