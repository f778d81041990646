"""The gradient-graph cache: what it counts against its budget, and the default budget."""

from __future__ import annotations

import pytest
import torch
from oracles import dense_hessian
from test_hessian import _rand, problem

from gmcurv import graphcache
from gmcurv.graphcache import GraphCache
from gmcurv.operator import CurvatureOperator


def test_a_storage_saved_twice_counts_once_and_parameters_not_at_all():
    w = torch.randn(1000, dtype=torch.float64)
    cache = GraphCache(budget=10**9, storages={w.untyped_storage().data_ptr()})

    def build():
        leaf = w.detach().requires_grad_(True)  # shares the parameter's storage
        x = leaf * 2.0  # mul by a scalar saves nothing of x's size
        # the gradient's graph keeps x twice (cos' and sin's backward), leaf once
        total = x.sin().sum() + x.cos().sum() + leaf.sin().sum()
        g = torch.autograd.grad(total, [leaf], create_graph=True)
        return [leaf], g

    assert cache.build(0, build) is not None
    nbytes = w.numel() * w.element_size()
    assert nbytes <= cache.held <= nbytes + 64  # x's storage once (+ scalar grad outputs)


def test_only_what_the_kept_graph_holds_is_counted():
    """Tensors saved during the build but not reachable from the gradient (freed with the
    forward) do not count: ``∇ Σ x²`` with ``x = 2θ`` keeps no copy of x."""
    w = torch.randn(1000, dtype=torch.float64)
    cache = GraphCache(budget=10**9, storages={w.untyped_storage().data_ptr()})

    def build():
        leaf = w.detach().requires_grad_(True)
        x = leaf * 2.0
        g = torch.autograd.grad((x * x).sum(), [leaf], create_graph=True)
        return [leaf], g

    assert cache.build(0, build) is not None and cache.held <= 64


@pytest.mark.parametrize("kind", ["hessian", "ggn", "residual"])
def test_kept_graphs_carry_no_saved_tensor_hooks(kind, tmp_path):
    """The graph is counted by walking it after the build, not through saved-tensor hooks:
    hooks stay attached to the saved tensors and every later product would call Python
    once per saved tensor. Probe: a saved tensor with hooks refuses a second pair."""
    from oracles import dense_ggn_autograd

    obj, batch, data = problem("attention", tmp_path, n=11)
    ref = dense_hessian(obj, batch)
    if kind != "hessian":
        ggn = dense_ggn_autograd(obj, batch)
        ref = ggn if kind == "ggn" else ref - ggn
    op = CurvatureOperator(obj, data, batch_size=4, kind=kind)
    op.prepare()
    (graph,) = op.graphs.graphs.values()
    v = _rand(obj, 3)
    torch.testing.assert_close(op.matvec(v), ref @ v, rtol=0, atol=1e-10)
    saved = [
        raw
        for node in _nodes(graphcache._roots(graph))
        for name in dir(node)
        if name.startswith("_raw_saved_")
        for raw in _as_list(getattr(node, name))
        if isinstance(raw, torch._C._autograd.SavedTensor)
    ]
    probed = 0
    for raw in saved:
        try:
            raw.register_hooks(lambda t: t, lambda t: t)
        except RuntimeError as e:  # an empty slot (value None) is fine; hooks set is not
            message = str(e)
        else:
            probed += 1
            continue
        assert "None" in message, message
    assert probed > 20


def _as_list(value):
    return list(value) if isinstance(value, (tuple, list)) else [value]


def _nodes(roots):
    seen, stack = set(), [t.grad_fn for t in roots]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    return seen


@pytest.mark.parametrize("graph", [False, None])
def test_products_accumulate_in_their_own_tensors(graph, tmp_path):
    """Batches are summed in place: the input vector and earlier results stay intact."""
    obj, batch, data = problem("mlp", tmp_path, n=11)
    H = dense_hessian(obj, batch)
    op = CurvatureOperator(obj, data, batch_size=4, cache_graph=graph, merge=False)
    v = _rand(obj, 2)
    vec = obj.space.unflatten(v.clone())
    first = op.matvec_dict(vec)
    second = op.matvec_dict(vec)
    torch.testing.assert_close(obj.space.flatten(vec), v, rtol=0, atol=0)
    torch.testing.assert_close(obj.space.flatten(first), H @ v, rtol=0, atol=1e-10)
    torch.testing.assert_close(obj.space.flatten(second), H @ v, rtol=0, atol=1e-10)


def _count_builds(monkeypatch) -> list[int]:
    from gmcurv import batchstate

    sizes: list[int] = []
    real = batchstate.gradient_graph

    def counted(objective, batch, names, r):
        sizes.append(len(batch))
        return real(objective, batch, names, r)

    monkeypatch.setattr(batchstate, "gradient_graph", counted)
    return sizes


@pytest.mark.parametrize("kind", ["hessian", "residual"])
def test_prepare_builds_the_whole_sample_graph_from_the_first_batchs_estimate(
    kind, tmp_path, monkeypatch
):
    """The first batch's graph, scaled by the examples, fits: the batches merge and one
    graph over the whole sample is built — not every per-batch graph first, then again."""
    from oracles import dense_ggn_autograd

    obj, batch, data = problem("attention", tmp_path, n=11)
    ref = dense_hessian(obj, batch)
    if kind == "residual":
        ref = ref - dense_ggn_autograd(obj, batch)
    sizes = _count_builds(monkeypatch)
    op = CurvatureOperator(obj, data, batch_size=4, kind=kind)
    assert op.graph_pending
    op.prepare()
    assert sizes == [4, 11] and not op.graph_pending and op.n_matvecs == 0
    assert len(op.graphs.graphs) == len(op.source.cached) == 1
    for seed in range(2):
        v = _rand(obj, seed)
        torch.testing.assert_close(op.matvec(v), ref @ v, rtol=0, atol=1e-10)
    assert sizes == [4, 11]  # products reuse it


def test_first_product_prepares_and_without_merge_keeps_per_batch_graphs(tmp_path, monkeypatch):
    obj, batch, data = problem("mlp", tmp_path, n=11)
    H = dense_hessian(obj, batch)
    sizes = _count_builds(monkeypatch)
    op = CurvatureOperator(obj, data, batch_size=4)
    v = _rand(obj)
    torch.testing.assert_close(op.matvec(v), H @ v, rtol=0, atol=1e-10)
    assert sizes == [4, 11]  # the first product prepared: no per-batch graphs besides the first
    sizes.clear()
    op = CurvatureOperator(obj, data, batch_size=4, merge=False)
    torch.testing.assert_close(op.matvec(v), H @ v, rtol=0, atol=1e-10)
    torch.testing.assert_close(op.matvec(v), H @ v, rtol=0, atol=1e-10)
    assert sizes == [4, 4, 3] and len(op.graphs.graphs) == 3


def test_prepare_skips_graphs_that_would_not_all_fit(tmp_path, monkeypatch):
    """Estimated over budget: no more graphs (products recompute) unless the caller insists;
    data too large to keep: no graph in advance (the first product's pass builds and drops)."""
    obj, batch, data = problem("mlp", tmp_path, n=11)
    H = dense_hessian(obj, batch)
    v = _rand(obj)
    probe = CurvatureOperator(obj, data, batch_size=4, merge=False)
    probe.prepare()
    first = probe.graphs.held // 3  # about one batch's graph
    sizes = _count_builds(monkeypatch)
    op = CurvatureOperator(obj, data, batch_size=4, graph_bytes=2 * first)
    op.prepare()
    assert sizes == [4] and op.graphs.enabled is False and not op.graphs.graphs
    torch.testing.assert_close(op.matvec(v), H @ v, rtol=0, atol=1e-10)
    sizes.clear()
    op = CurvatureOperator(obj, data, batch_size=4, cache_bytes=0)
    op.prepare()
    assert sizes == [] and op.graph_pending
    torch.testing.assert_close(op.matvec(v), H @ v, rtol=0, atol=1e-10)
    assert sizes == [4, 4, 3] and not op.graphs.graphs  # used by that product, then dropped


def test_matvec_divides_the_flat_vector_as_matvec_dict_divides_each_tensor(tmp_path):
    """``matvec`` scales the flat sum by ``1/N`` once: bitwise what ``matvec_dict`` gives."""
    obj, _, data = problem("attention", tmp_path, n=11)
    op = CurvatureOperator(obj, data, batch_size=4)
    v = _rand(obj, 5)
    flat = op.matvec(v)
    per_tensor = obj.space.flatten(op.matvec_dict(obj.space.unflatten(v.to(obj.dtype))))
    assert torch.equal(flat, per_tensor.to(v.dtype))
    assert op.n_matvecs == 2
