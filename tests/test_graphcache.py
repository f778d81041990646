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
        total = (x * x).sum() + (leaf * leaf).sum()  # x saved twice, leaf twice
        g = torch.autograd.grad(total, [leaf], create_graph=True)
        return [leaf], g

    assert cache.build(0, build) is not None
    nbytes = w.numel() * w.element_size()
    assert nbytes <= cache.held <= nbytes + 64  # x's storage once (+ a scalar grad output)


def test_default_budget_is_half_the_available_memory_per_local_rank(monkeypatch):
    import gmcurv.memory

    monkeypatch.setattr(gmcurv.memory, "available_bytes", lambda: 16 * 2**30)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert graphcache.default_graph_bytes() == 8 * 2**30
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert graphcache.default_graph_bytes() == 2 * 2**30
    monkeypatch.setattr(gmcurv.memory, "available_bytes", lambda: 2**20)
    assert graphcache.default_graph_bytes() == graphcache.DEFAULT_GRAPH_BYTES


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
