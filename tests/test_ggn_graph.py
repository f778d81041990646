"""GGN products through cached output graphs (`gmcurv.graphcache.OutputGraph`):
``J v`` by one backward through ``Jᵀu``'s graph, ``Jᵀ Λ J v`` by one through the outputs'
— against the dense float64 GGN from plain double backward (MLP, conv, attention)."""

from __future__ import annotations

import pytest
import torch
from oracles import dense_ggn_autograd
from test_hessian import _rand, problem
from torch import nn

from gmcurv.graphcache import OutputGraph
from gmcurv.hessian import dense_matrix
from gmcurv.objective import Objective
from gmcurv.operator import CurvatureOperator

MODELS = ["mlp", "attention", "conv", "sdpa", "nojvp", "mse", "embedzoo"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("merge", [True, False])
def test_ggn_products_through_output_graphs_match_dense(name, merge, tmp_path):
    obj, batch, data = problem(name, tmp_path, n=11)
    G = dense_ggn_autograd(obj, batch)
    op = CurvatureOperator(obj, data, batch_size=4, kind="ggn", merge=merge)
    assert op.graph_pending
    op.prepare()
    kept = list(op.graphs.graphs.values())
    assert len(kept) == (1 if merge else 3) and op.graphs.held > 0
    assert all(isinstance(g, OutputGraph) for g in kept)
    for seed in range(2):
        v = _rand(obj, seed)
        torch.testing.assert_close(op.matvec(v), G @ v, rtol=0, atol=1e-10)
    V = torch.stack([_rand(obj, s) for s in range(3, 6)])
    torch.testing.assert_close(op.matmat(V), V @ G, rtol=0, atol=1e-10)  # G symmetric
    torch.testing.assert_close(dense_matrix(op), G, rtol=0, atol=1e-10)
    assert list(op.graphs.graphs.values()) == kept  # built once, reused by every product
    assert op.n_matvecs == 2 + 3 + obj.space.size


@pytest.mark.parametrize("graph", [False, None])
def test_graph_and_recomputed_ggn_products_agree(graph, tmp_path):
    obj, batch, data = problem("attention", tmp_path, n=11)
    G = dense_ggn_autograd(obj, batch)
    op = CurvatureOperator(obj, data, batch_size=4, kind="ggn", cache_graph=graph)
    v = _rand(obj, 7)
    torch.testing.assert_close(op.matvec(v), G @ v, rtol=0, atol=1e-10)
    assert bool(op.graphs.graphs) is (graph is None)


def test_ggn_graph_respects_its_budget(tmp_path):
    obj, batch, data = problem("mlp", tmp_path, n=11)
    op = CurvatureOperator(obj, data, batch_size=4, kind="ggn", graph_bytes=1)
    v = _rand(obj)
    torch.testing.assert_close(op.matvec(v), dense_ggn_autograd(obj, batch) @ v, atol=1e-10, rtol=0)
    assert not op.graphs.graphs and op.graphs.enabled is False


class _OpaqueBackward(torch.autograd.Function):
    """tanh whose backward is computed outside autograd (not differentiable in its
    cotangent) but which has a forward-mode rule: ``Jᵀu`` cannot give ``J v``."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        with torch.no_grad():
            return g.detach() * (1 - y * y)

    @staticmethod
    def jvp(ctx, t):
        (y,) = ctx.saved_tensors
        return t * (1 - y * y)


class OpaqueMLP(nn.Module):
    """``b(h + σ(h))`` (`skip`) or ``b(σ(h))``, ``h = a(x)``, with σ = tanh, opaque or not."""

    def __init__(self, opaque: bool = True, skip: bool = False):
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 3)
        self.opaque, self.skip = opaque, skip

    def forward(self, x):
        h = self.a(x)
        s = _OpaqueBackward.apply(h) if self.opaque else torch.tanh(h)
        return self.b(h + s if self.skip else s)


@pytest.mark.parametrize("skip", [False, True])
def test_opaque_backward_falls_back_to_forward_mode(skip, tmp_path):
    """No silent zero: when ``Jᵀu`` does not depend on ``u`` through autograd — wholly, or
    on one branch only (`skip`: the adjoint check) — the output graph is refused for good
    and ``J v`` comes by forward mode, still exact."""
    _, batch, data = problem("mlp", tmp_path, n=11)
    torch.manual_seed(0)
    model = OpaqueMLP(skip=skip).double()
    twin = OpaqueMLP(opaque=False, skip=skip).double()
    twin.load_state_dict(model.state_dict())
    obj = Objective.build(model, "cross_entropy")
    G = dense_ggn_autograd(Objective.build(twin, "cross_entropy"), batch)
    op = CurvatureOperator(obj, data, batch_size=4, kind="ggn")
    v = _rand(obj, 2)
    torch.testing.assert_close(op.matvec(v), G @ v, rtol=0, atol=1e-10)
    assert op.graphs.enabled is False and not op.graphs.graphs and op.forward_mode


@pytest.mark.parametrize("exact_ggn", [0, 10**6])
def test_summaries_free_their_graphs_when_done(exact_ggn, tmp_path, monkeypatch):
    """``--curvature all``: the GGN's graphs are not held while the Hessian's are built."""
    from gmcurv import hessian as hs

    monkeypatch.setattr(hs, "DENSE_MAX_PARAMS", 0)
    monkeypatch.setattr(hs, "EXACT_GGN_MAX_COLUMNS", exact_ggn)
    obj, _, data = problem("attention", tmp_path)
    made: list[CurvatureOperator] = []

    class Tracked(CurvatureOperator):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(hs, "CurvatureOperator", Tracked)
    cache: dict = {}
    for kind in ("ggn", "hessian"):
        s = hs.curvature_summary(obj, data, kind, probes=12, k=2, cache=cache)
        assert s.n_matvecs > 0
    assert made and all(not op.graphs.graphs and op.graphs.held == 0 for op in made)
