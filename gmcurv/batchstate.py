"""What a curvature operator keeps per batch between passes over the data.

The batches themselves (`gmcurv.batchpass.FixedBatches`: cached, or re-read and
fingerprint-checked), each batch's output residual ``r = ∂(Σ_n L_n)/∂f`` (for ``H - G``)
and its gradient graph (`gmcurv.graphcache`: ``H v = ∇<g, v>`` by one backward). Nothing
per batch is kept when the batches are not.

When every graph fits the budget and the batches are cached, the sample becomes one batch
with one graph (PyHessian's layout: a product is one backward over the whole sample, fewer
and larger kernels; values equal up to summation order). `BatchState.prepare` decides that
on the first pass from the first batch's graph — measured bytes, scaled by the examples —
so the per-batch graphs are not all built first and then rebuilt as one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import Tensor

from gmcurv.batch import Batch
from gmcurv.batchpass import FixedBatches, batch_nbytes
from gmcurv.graphcache import Graph, GraphCache, OutputGraph, gradient_graph, output_graph
from gmcurv.objective import Objective
from gmcurv.products import output_residuals


@dataclass
class BatchState:
    """The batches of a curvature operator's data, with their residuals and graphs."""

    objective: Objective
    kind: str  # 'hessian', 'ggn' or 'residual'
    source: FixedBatches
    graphs: GraphCache
    merge: bool = True  # one whole-sample batch and graph once they are known to fit
    residuals: dict[int, Tensor] = field(default_factory=dict, repr=False)

    # -- passes ----------------------------------------------------------------------------
    def batches(self) -> Iterator[tuple[int, Batch]]:
        """``(index, batch)`` in the fixed order; per-batch state is forgotten after a pass
        whose batches were not kept."""
        yield from enumerate(self.source)
        if self.source.cached is None:
            self.residuals.clear()
            self.graphs.drop()

    @property
    def first_pass_done(self) -> bool:
        return self.source.prints is not None

    def residual(self, index: int, batch: Batch) -> Tensor:
        """``r = ∂(Σ_n L_n)/∂f`` of batch `index` (kept while batches are)."""
        r = self.residuals.get(index)
        if r is None:
            r = output_residuals(self.objective, batch)
            if self.source.reusable:
                self.residuals[index] = r
        return r

    # -- gradient graphs -------------------------------------------------------------------
    def graph_wanted(self) -> bool:
        """Graphs serve every kind in eval mode (train-mode masks are drawn per pass),
        while the batches can be replayed and the cache is not off: gradient graphs the
        Hessian and ``H - G``, output graphs (`gmcurv.graphcache.OutputGraph`) the GGN."""
        if self.objective.mode != "eval" or self.graphs.enabled is False:
            return False
        return self.source.reusable

    def graph(self, index: int, batch: Batch) -> Graph | OutputGraph | None:
        """Batch `index`'s graph, built (and counted) on first use; None when graphs are
        not wanted or do not fit (or, for the GGN, when ``J v`` needs forward mode)."""
        if not self.graph_wanted():
            return None
        graph = self.graphs.get(index)
        if graph is None:
            names = self.objective.space.names
            if self.kind == "ggn":
                usable = [True]

                def build() -> OutputGraph | None:
                    out = output_graph(self.objective, batch, names)
                    usable[0] = out is not None
                    return out

                graph = self.graphs.build(index, build)
                if not usable[0]:  # Jᵀu not differentiable in u: forward mode for good
                    self.graphs.drop()
                    self.graphs.enabled = False
                return graph
            r = self.residual(index, batch) if self.kind == "residual" else None
            graph = self.graphs.build(
                index, lambda: gradient_graph(self.objective, batch, names, r)
            )
        return graph

    @property
    def pending(self) -> bool:
        """Whether the first product would build gradient graphs (`prepare` does it)."""
        return not self.first_pass_done and self.graph_wanted()

    def prepare(self) -> None:
        """The first pass, before any product: the first batch's graph, and from its bytes
        (scaled by the examples) whether one graph over the whole sample fits the budget.
        If it does and the batches are cached, they merge and that one graph is built;
        otherwise the graphs are built per batch (none when even the first does not fit,
        or when the estimate says they would not all fit and the caller did not insist)."""
        if not self.pending:
            return
        self.merge, merge = False, self.merge  # decided here, once
        deferred = False
        for i, batch in self.batches():
            if i == 0:
                if self._cache_would_refuse(batch) or self.graph(0, batch) is None:
                    return  # nothing kept past this pass: products build as they go
                whole = self.graphs.held * self.source.data.n / max(len(batch), 1)
                if whole > self.graphs.budget and self.graphs.enabled is None:
                    self.graphs.drop()  # would not all fit: products recompute
                    return
                deferred = merge and whole <= self.graphs.budget
            elif not deferred and self.graph(i, batch) is None:
                return  # over budget after all: dropped, products recompute
        if not deferred:  # per-batch graphs: merged if they all fit, as after a product
            self.merge = merge
            self.merge_if_fitting()
        elif self.source.cached is not None:
            self._merge()
        kept = self.source.cached
        if kept is not None and len(kept) == 1:
            self.graph(0, kept[0])  # the whole sample's graph (built here, not by a product)

    def _cache_would_refuse(self, batch: Batch) -> bool:
        """Whether the batches will not be kept (their bytes, scaled from the first batch,
        exceed the data cache): then graphs could serve one product only."""
        n = self.source.data.n
        return batch_nbytes(batch) * n / max(len(batch), 1) > self.source.cache_bytes

    def merge_if_fitting(self) -> None:
        """After a first pass that kept every batch and its graph (the product's own pass,
        when `prepare` was not called), make the sample one batch with one graph."""
        if not self.merge or len(self.graphs.graphs) < 2:
            return
        self.merge = False  # decided once
        n_batches = len(self.source.prints or [])
        if len(self.graphs.graphs) == n_batches and self.graph_wanted():
            self._merge()

    def _merge(self) -> bool:
        """Cached batches -> one; their graphs and residuals are rebuilt for it on use."""
        if not self.source.merge():
            return False
        self.graphs.graphs.clear()
        self.graphs.held = 0
        self.residuals.clear()
        return True
