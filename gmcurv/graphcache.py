"""Cached gradient graphs: ``H v = ∇<g, v>`` by one backward through ``g``'s graph.

For the Hessian (``g = ∇ Σ_n L_n``) and the residual ``H - G`` (``g = ∇<f, r>``, ``r``
fixed), the graph of one batch's gradient, built once with ``create_graph``, serves every
later product as a single backward. Graphs are kept while they fit in the budget (bytes of
the storages autograd saves, each counted once, the parameters' own not counted); past it
they are all dropped and products recompute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gmcurv.attention import twice_differentiable_attention
from gmcurv.batch import Batch
from gmcurv.objective import Objective

DEFAULT_GRAPH_BYTES = 2**30  # at least this much for per-batch gradient graphs (Hessian, eval)

Graph = tuple[list[Tensor], tuple[Tensor, ...]]  # (leaves, g = ∇ total w.r.t. the leaves)


def default_graph_bytes() -> int:
    """Graph cache budget: half the memory available now, shared by the ranks on this
    host (torchrun's ``LOCAL_WORLD_SIZE``), at least 1 GiB; the other half is left for a
    product's backward through the graph (its temporaries are at most about the graph's
    size) and everything else.

    Over budget the graphs are dropped and every product recomputes its batch's forward
    and backward (about 2x the time, bounded memory), so a generous
    default only trades memory that is free anyway for speed, as PyHessian does (it
    always keeps its graph).
    """
    import os

    from gmcurv.memory import available_bytes

    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(DEFAULT_GRAPH_BYTES, available_bytes() // (2 * local_ranks))


@dataclass
class GraphCache:
    """Per-batch gradient graphs within `budget` bytes; `enabled` None = until the first
    overrun, then off for good (False); True/False as the caller chose."""

    budget: int = field(default_factory=default_graph_bytes)
    enabled: bool | None = None
    graphs: dict[int, Graph] = field(default_factory=dict, repr=False)
    held: int = 0
    storages: set[int] = field(default_factory=set, repr=False)  # not counted (parameters)

    def drop(self) -> None:
        """Forget every graph (and stop caching, unless the caller asked for it)."""
        self.graphs.clear()
        self.held = 0
        if self.enabled is None:
            self.enabled = False

    def get(self, index: int) -> Graph | None:
        """Batch `index`'s graph, if kept."""
        return self.graphs.get(index)

    def build(self, index: int, build: Callable[[], Graph]) -> Graph | None:
        """Build batch `index`'s graph, counting the bytes autograd saves, and keep it;
        None (and every graph dropped) when that goes over budget."""
        held, seen = [0], set(self.storages)

        def pack(t: Tensor) -> Tensor:
            key, nbytes = _storage(t)
            if key not in seen:  # one storage saved by several ops is held once
                seen.add(key)
                held[0] += nbytes
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            graph = build()
        self.held += held[0]
        if self.held > self.budget:
            self.drop()
            return None
        self.graphs[index] = graph
        return graph


def _storage(t: Tensor) -> tuple[int, int]:
    """(identity, bytes) of the memory a saved tensor keeps alive."""
    try:
        st = t.untyped_storage()
        return st.data_ptr(), st.nbytes()
    except (RuntimeError, NotImplementedError):  # no storage (e.g. a wrapper subclass)
        return id(t), t.numel() * t.element_size()


def gradient_graph(objective: Objective, batch: Batch, names: list[str], r: Tensor | None) -> Graph:
    """``(leaves, g)`` with ``g = ∇(Σ_n L_n)`` (Hessian, `r` None) or ``g = ∇<f, r>``
    (residual ``H - G``, ``r`` held fixed), built with ``create_graph``."""
    leaves = [objective.params[k].detach().requires_grad_(True) for k in names]
    with twice_differentiable_attention(), torch.enable_grad():
        params = dict(zip(names, leaves, strict=True))
        if r is not None:  # (H - G) v = ∇<∇<f, r>, v> with r held fixed
            total = (objective.outputs(batch.inputs, params) * r).sum()
        else:
            total = objective.per_example_loss(batch, params).sum()
        g = torch.autograd.grad(total, leaves, create_graph=True)
    return leaves, g


def graph_product(
    graph: Graph, names: list[str], vec: dict[str, Tensor], batched: bool
) -> dict[str, Tensor]:
    """``∇<g, v>`` through a cached graph (`batched`: a leading dimension of vectors);
    parameters ``g`` does not depend on get zero curvature."""
    leaves, g = graph
    live = [i for i, t in enumerate(g) if t.requires_grad]  # constant parts: no curvature
    if not live:
        return {k: vec[k].new_zeros(vec[k].shape) for k in names}
    outs = [vec[names[i]] for i in live]
    with torch.enable_grad():
        hv = torch.autograd.grad(
            [g[i] for i in live],
            leaves,
            grad_outputs=outs,
            retain_graph=True,
            is_grads_batched=batched,
            allow_unused=True,
        )
    return {
        k: vec[k].new_zeros(vec[k].shape) if t is None else t.detach()
        for k, t in zip(names, hv, strict=True)
    }
