"""Cached gradient graphs: ``H v = ∇<g, v>`` by one backward through ``g``'s graph.

For the Hessian (``g = ∇ Σ_n L_n``) and the residual ``H - G`` (``g = ∇<f, r>``, ``r``
fixed), the graph of one batch's gradient, built once with ``create_graph``, serves every
later product as a single backward. Graphs are kept while they fit in the budget (bytes of
the storages autograd saves, each counted once, the parameters' own not counted); past it
they are all dropped and products recompute.

The saved tensors are counted by walking the built graph (`saved_bytes`), not by
``saved_tensors_hooks`` around the build: hooks stay attached to every tensor they saw, and
each later product would call the Python unpack hook once per saved tensor (+5-7 % per
product on a 2-layer BERT or Llama).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor

from gmcurv.attention import twice_differentiable_attention
from gmcurv.batch import Batch
from gmcurv.objective import Objective

DEFAULT_GRAPH_BYTES = 2**30  # at least this much for per-batch gradient graphs (Hessian, eval)

Graph = tuple[list[Tensor], tuple[Tensor, ...]]  # (leaves, g = ∇ total w.r.t. the leaves)
_G = TypeVar("_G")


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
    graphs: dict[int, Graph | OutputGraph] = field(default_factory=dict, repr=False)
    held: int = 0
    storages: set[int] = field(default_factory=set, repr=False)  # not counted (parameters)

    def drop(self) -> None:
        """Forget every graph (and stop caching, unless the caller asked for it)."""
        self.graphs.clear()
        self.held = 0
        if self.enabled is None:
            self.enabled = False

    def get(self, index: int) -> Graph | OutputGraph | None:
        """Batch `index`'s graph, if kept."""
        return self.graphs.get(index)

    def build(self, index: int, build: Callable[[], _G | None]) -> _G | None:
        """Build batch `index`'s graph, counting the bytes autograd saves, and keep it;
        None (and every graph dropped) when that goes over budget; None (nothing kept)
        when `build` gives None."""
        graph = build()
        if graph is None:
            return None
        self.held += saved_bytes(_roots(graph), self.storages)
        if self.held > self.budget:
            self.drop()
            return None
        self.graphs[index] = graph
        return graph


def _roots(graph: Graph | OutputGraph) -> list[Tensor]:
    """The tensors a kept graph hangs from."""
    if isinstance(graph, OutputGraph):
        return [graph.out, *(t for t in graph.jtu if t is not None)]
    return list(graph[1])


_SAVED: dict[type, tuple[str, ...]] = {}  # autograd node type -> its saved-tensor attributes


def _saved_names(node: object) -> tuple[str, ...]:
    kind = type(node)
    if kind not in _SAVED:
        _SAVED[kind] = tuple(a for a in dir(node) if a.startswith("_saved_"))
    return _SAVED[kind]


def _saved_tensors(node: object) -> list[Tensor]:
    """The tensors autograd saved for `node`'s backward (built-in ops' ``_saved_*``
    attributes, a custom ``Function``'s ``saved_tensors``)."""
    values: list[object] = []
    for name in _saved_names(node):
        try:
            values.append(getattr(node, name))
        except (RuntimeError, AttributeError):  # freed or not a tensor slot
            continue
    if isinstance(node, torch.autograd.function.BackwardCFunction):
        with contextlib.suppress(RuntimeError):  # freed
            values.extend(node.saved_tensors)
    out: list[Tensor] = []
    for v in values:
        if isinstance(v, Tensor):
            out.append(v)
        elif isinstance(v, (tuple, list)):
            out.extend(t for t in v if isinstance(t, Tensor))
    return out


def saved_bytes(roots: list[Tensor], skip: Collection[int] = ()) -> int:
    """Bytes of the storages autograd saved anywhere in the graph behind `roots`, each
    storage once, those in `skip` (data pointers: the parameters') not at all."""
    seen_storage, seen_node = set(skip), set()
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    held = 0
    while stack:
        node = stack.pop()
        if node is None or node in seen_node:
            continue
        seen_node.add(node)
        for t in _saved_tensors(node):
            key, nbytes = _storage(t)
            if key not in seen_storage:  # one storage saved by several ops is held once
                seen_storage.add(key)
                held += nbytes
            if t.grad_fn is not None:
                stack.append(t.grad_fn)
        stack.extend(n for n, _ in node.next_functions)
    return held


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
    return _kept_vjp([g[i] for i in live], leaves, outs, batched, names, vec)


# ---------------------------------------------------------------------------- GGN side
@dataclass
class OutputGraph:
    """A batch's outputs ``f`` with their graph and ``Jᵀu`` built with ``create_graph``
    for a zero cotangent leaf ``u`` (its value never matters: ``Jᵀu`` is linear in ``u``).
    ``J v = ∂<Jᵀu, v>/∂u`` is one backward through the ``Jᵀu`` graph and ``Jᵀw`` one
    through the outputs' graph: a GGN product without a forward pass."""

    leaves: list[Tensor]
    out: Tensor  # f(θ), attached to the leaves
    u: Tensor  # the cotangent leaf
    jtu: tuple[Tensor | None, ...]  # Jᵀu per leaf (None: f does not depend on it)
    targets: Tensor


def output_graph(objective: Objective, batch: Batch, names: list[str]) -> OutputGraph | None:
    """The batch's `OutputGraph`, or None when ``Jᵀu`` is not (wholly) differentiable in
    ``u`` — a custom ``autograd.Function`` whose backward runs outside autograd — so that
    ``J v`` must come by forward mode. Native ops' backward formulas are differentiable;
    graphs through custom Functions must pass `_adjoint_holds` first."""
    leaves = [objective.params[k].detach().requires_grad_(True) for k in names]
    with twice_differentiable_attention(), torch.enable_grad():
        out = objective.outputs(batch.inputs, dict(zip(names, leaves, strict=True)))
        u = torch.zeros_like(out, requires_grad=True)
        jtu = torch.autograd.grad(out, leaves, u, create_graph=True, allow_unused=True)
    graph = OutputGraph(leaves, out, u, jtu, objective.targets(batch, out.detach()))
    if any(t is not None and not t.requires_grad for t in jtu):
        return None
    if _has_custom_function(out) and not _adjoint_holds(graph):
        return None
    return graph


def _has_custom_function(out: Tensor) -> bool:
    """Whether `out`'s graph runs through a custom ``torch.autograd.Function``."""
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            return True
        stack.extend(n for n, _ in node.next_functions)
    return False


def _adjoint_holds(graph: OutputGraph) -> bool:
    """``<w, J v> = <Jᵀw, v>`` for one random pair, ``J v`` through the ``Jᵀu`` graph and
    ``Jᵀw`` through the outputs' (first order, always right): a path missing from the
    double backward breaks it by far more than rounding (float32: 1e-3 of the scale)."""
    gen = torch.Generator(device=graph.out.device).manual_seed(0)
    v = [torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device) for x in graph.leaves]
    w = torch.randn(graph.out.shape, generator=gen, dtype=graph.out.dtype, device=graph.out.device)
    live = [i for i, t in enumerate(graph.jtu) if t is not None]
    with torch.enable_grad():
        (jv,) = torch.autograd.grad(
            [graph.jtu[i] for i in live], graph.u, [v[i] for i in live], retain_graph=True
        )  # type: ignore[misc]
        jtw = torch.autograd.grad(graph.out, graph.leaves, w, retain_graph=True, allow_unused=True)
    lhs = float((w.double() * jv.double()).sum())
    terms = [(t.double() * v[i].double()).sum() for i, t in enumerate(jtw) if t is not None]
    rhs = float(sum(terms))
    scale = float(w.double().norm() * jv.double().norm()) + sum(abs(float(t)) for t in terms)
    tol = 1e-3 if graph.out.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
    return abs(lhs - rhs) <= tol * max(scale, 1e-30)


def output_graph_product(
    graph: OutputGraph,
    names: list[str],
    vec: dict[str, Tensor],
    lam: Callable[[Tensor, Tensor, Tensor], Tensor],
    batched: bool,
) -> dict[str, Tensor]:
    """``Jᵀ Λ J v`` summed over the batch through a cached `OutputGraph`, with
    ``lam(f, targets, w) = Λ w`` (the loss's output Hessian); `batched`: a leading
    dimension of vectors (``Λ`` vectorised by ``vmap``)."""
    live = [i for i, t in enumerate(graph.jtu) if t is not None]
    if not live:
        return {k: vec[k].new_zeros(vec[k].shape) for k in names}
    with torch.enable_grad():
        (jv,) = torch.autograd.grad(
            [graph.jtu[i] for i in live],  # type: ignore[misc]
            graph.u,
            grad_outputs=[vec[names[i]] for i in live],
            retain_graph=True,
            is_grads_batched=batched,
        )
    f = graph.out.detach()
    if batched:
        from torch.func import vmap

        w = vmap(lambda x: lam(f, graph.targets, x))(jv)
    else:
        w = lam(f, graph.targets, jv)
    return _kept_vjp(graph.out, graph.leaves, w, batched, names, vec)


def _kept_vjp(outputs, leaves, cotangents, batched: bool, names, like) -> dict[str, Tensor]:
    """``Σ (∂outputs/∂leaves)^T cotangents`` through a kept graph, by parameter name;
    parameters the outputs do not depend on get zeros shaped like `like`."""
    with torch.enable_grad():
        grads = torch.autograd.grad(
            outputs,
            leaves,
            grad_outputs=cotangents,
            retain_graph=True,
            is_grads_batched=batched,
            allow_unused=True,
        )
    return {
        k: like[k].new_zeros(like[k].shape) if t is None else t.detach() if t.requires_grad else t
        for k, t in zip(names, grads, strict=True)
    }
