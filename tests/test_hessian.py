"""Hessian / GGN / residual operators and summaries against dense float64 oracles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import EmbedZoo, TinyAttention, TinyConv, mlp, seeded
from oracles import dense_ggn_autograd, dense_hessian, finite_difference_hvp, func_hessian
from safetensors.torch import save_file
from torch import nn

from gmcurv import hessian as hs
from gmcurv.batch import Batch
from gmcurv.errors import DataError
from gmcurv.estimate import Estimate
from gmcurv.fisher import fisher_eigen
from gmcurv.hessian import curvature_summary, dense_matrix, exact_ggn_trace, top_eigen
from gmcurv.io.data import load_data
from gmcurv.objective import Objective
from gmcurv.operator import CurvatureOperator
from gmcurv.products import batch_ggnvp, batch_hvp, batch_residual_vp


class SDPAttention(nn.Module):
    """Calls F.scaled_dot_product_attention (the fused CPU kernel has no forward-mode AD)."""

    def __init__(self, vocab=6, d=4, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        q, k, v = self.qkv(self.emb(ids)).chunk(3, dim=-1)
        return self.head(F.scaled_dot_product_attention(q, k, v, is_causal=True).mean(1))


class _NoJvp(torch.autograd.Function):
    """tanh with a backward but no forward-mode rule (exercises the fallback)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class NoJvpMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(_NoJvp.apply(self.a(x)))


def _inputs(name: str, n: int, g: torch.Generator):
    if name in ("attention", "sdpa", "embedzoo"):
        vocab, t = {"attention": (7, 5), "sdpa": (6, 4), "embedzoo": (40, 4)}[name]
        return torch.randint(0, vocab, (n, t), generator=g)
    if name == "conv":
        return torch.randn(n, 2, 4, 4, generator=g, dtype=torch.float64)
    d = 4 if name == "nojvp" else 5
    return torch.randn(n, d, generator=g, dtype=torch.float64)


MODELS = {
    "mlp": lambda: seeded(mlp),
    "attention": lambda: seeded(TinyAttention),
    "conv": lambda: seeded(TinyConv),
    "sdpa": lambda: seeded(SDPAttention),
    "nojvp": lambda: seeded(NoJvpMLP),
    "embedzoo": lambda: seeded(EmbedZoo),
    "mse": lambda: seeded(mlp, sizes=(5, 6, 2)),
    "relu": lambda: seeded(mlp, act=nn.ReLU),
    "leaky": lambda: seeded(mlp, sizes=(5, 6, 6, 3), act=nn.LeakyReLU),
}


def problem(name: str, tmp_path, n: int = 10, seed: int = 0):
    """(objective, the whole sample as one batch, the sample on disk)."""
    g = torch.Generator().manual_seed(seed)
    model = MODELS[name]()
    x = _inputs(name, n, g)
    if name == "mse":
        y, loss = torch.randn(n, 2, generator=g, dtype=torch.float64), "mse"
    elif name == "embedzoo":
        y, loss = torch.randint(0, 3, (n, 4), generator=g), "cross_entropy"
        y[0, 1] = y[3, 0] = y[3, 2] = -100  # ignored tokens: examples have 2..4 tokens
    else:
        y, loss = torch.randint(0, 3, (n,), generator=g), "cross_entropy"
    obj = Objective.build(model, loss)
    path = tmp_path / f"{name}.safetensors"
    save_file({"inputs": x.contiguous(), "targets": y.contiguous()}, str(path))
    return obj, Batch(x, y, 0), load_data(path, None)


def _rand(obj, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(obj.space.size, generator=g, dtype=torch.float64)


ORACLE_MODELS = ["mlp", "attention", "conv", "sdpa", "nojvp", "mse"]


@pytest.mark.parametrize("name", ORACLE_MODELS)
def test_hvp_ggnvp_residual_match_dense(name, tmp_path):
    obj, batch, _ = problem(name, tmp_path)
    H, G = dense_hessian(obj, batch), dense_ggn_autograd(obj, batch)
    v = _rand(obj)
    vec = obj.space.unflatten(v)
    n = len(batch)
    for forward in (True, False):
        if name == "nojvp" and forward:
            with pytest.raises((NotImplementedError, RuntimeError)):
                batch_hvp(obj, batch, vec, True)
            continue
        hv = obj.space.flatten(batch_hvp(obj, batch, vec, forward)) / n
        gv = obj.space.flatten(batch_ggnvp(obj, batch, vec, forward)) / n
        rv = obj.space.flatten(batch_residual_vp(obj, batch, vec, forward)) / n
        torch.testing.assert_close(hv, H @ v, rtol=0, atol=1e-10)
        torch.testing.assert_close(gv, G @ v, rtol=0, atol=1e-10)
        torch.testing.assert_close(rv, (H - G) @ v, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["mlp", "attention", "sdpa", "nojvp"])
@pytest.mark.parametrize("graph", [False, None])
def test_operator_streams_batches_and_falls_back(name, graph, tmp_path):
    obj, batch, data = problem(name, tmp_path, n=11)
    H = dense_hessian(obj, batch)
    op = CurvatureOperator(obj, data, batch_size=4, kind="hessian", cache_graph=graph)
    v = _rand(obj, 3)
    torch.testing.assert_close(op.matvec(v), H @ v, rtol=0, atol=1e-10)
    if graph is not False:  # the first product built one graph over the whole sample
        assert len(op.graphs.graphs) == 1 and len(op.source.cached) == 1 and op.graphs.held > 0
    torch.testing.assert_close(op(v.float()).double(), (H @ v), rtol=1e-5, atol=1e-5)
    assert op.n_matvecs == 2
    if graph is False:  # forward-over-reverse, switched off for good after a failure
        assert op.forward_mode is (name != "nojvp") and not op.graphs.graphs
    else:  # then one graph over the whole sample: one backward per product
        assert len(op.graphs.graphs) == 1 and len(op.source.cached) == 1 and op.graphs.held > 0
    torch.testing.assert_close(dense_matrix(op), H, rtol=0, atol=1e-10)


def test_graph_cache_respects_its_budget(tmp_path):
    obj, batch, data = problem("mlp", tmp_path, n=11)
    op = CurvatureOperator(obj, data, batch_size=4, graph_bytes=1)
    v = _rand(obj)
    torch.testing.assert_close(op.matvec(v), dense_hessian(obj, batch) @ v, rtol=0, atol=1e-10)
    assert not op.graphs.graphs and op.graphs.enabled is False


def test_plain_autograd_finite_differences_and_hvp_agree(tmp_path):
    """The oracle is plain double backward, not torch.func.hessian: on the attention model's
    LayerNorm weight torch 2.13's func.hessian has been seen to disagree. Plain autograd,
    central finite differences and our jvp-of-grad product agree; func.hessian is only
    compared on the rows that do not touch the LayerNorm weight."""
    obj, batch, data = problem("attention", tmp_path)
    H = dense_hessian(obj, batch)
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-12)
    op = CurvatureOperator(obj, data, batch_size=4)
    for seed in range(3):
        v = _rand(obj, seed)
        fd = finite_difference_hvp(obj, batch, v)
        torch.testing.assert_close(fd, H @ v, rtol=0, atol=1e-7)
        torch.testing.assert_close(op.matvec(v), H @ v, rtol=0, atol=1e-10)
    Hf = func_hessian(obj, batch)
    ln = obj.space.offsets()["ln.weight"]
    keep = torch.ones(obj.space.size, dtype=torch.bool)
    keep[ln] = False
    torch.testing.assert_close(Hf[keep][:, keep], H[keep][:, keep], rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["mlp", "attention", "conv", "embedzoo", "mse"])
def test_exact_ggn_trace_from_factors(name, tmp_path):
    obj, batch, data = problem(name, tmp_path)
    G = dense_ggn_autograd(obj, batch)
    acc = exact_ggn_trace(obj, data, batch_size=3)
    value, se = acc.trace(None)
    assert value == pytest.approx(float(torch.trace(G)), rel=1e-10, abs=1e-12)
    assert se > 0
    offsets = obj.space.offsets()
    for block, params in acc.block_params.items():
        ref = sum(float(torch.diagonal(G)[offsets[p]].sum()) for p in params)
        assert acc.trace(block)[0] == pytest.approx(ref, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", ["mlp", "attention"])
def test_exact_ggn_trace_grown_batches(name, tmp_path, monkeypatch):
    """`grow`: batches as large as the capture bytes allow — the whole sample, or batches
    larger than asked when the byte cap is tight — give the same values as small ones
    and the dense float64 GGN."""
    from gmcurv import ggn
    from gmcurv.capture.budget import CaptureEstimate

    obj, batch, data = problem(name, tmp_path)
    G = dense_ggn_autograd(obj, batch)
    ref = exact_ggn_trace(obj, data, batch_size=2)
    sizes = []
    real = ggn.capture_batch
    monkeypatch.setattr(ggn, "capture_batch", lambda *a: sizes.append(real(*a)) or sizes[-1])
    grown = exact_ggn_trace(obj, data, batch_size=2, grow=True)
    assert sizes == [data.n]  # a tiny model: the whole sample in one batch
    monkeypatch.setattr(ggn, "capture_batch", real)
    est = CaptureEstimate(columns=1, activations=100, cotangents=0, factors=0, dense=0)
    per = est.batch_bytes(1, first=False)
    monkeypatch.setattr(ggn, "GROWN_BATCH_BYTES", 3 * per)
    assert ggn.capture_batch(est, 9, 2, None) == 3  # grown, within the byte cap
    assert ggn.capture_batch(est, 10, 2, None) == 3  # 4 batches: 3, 3, 3, 1 -> evened out
    assert ggn.capture_batch(est, 8, 2, None) == 3  # 3 batches of at most 3
    assert ggn.capture_batch(est, data.n, 5, None) == 5  # never below what was asked
    assert ggn.capture_batch(est, 2, 1, None) == 2  # never beyond the sample
    for acc in (ref, grown):
        assert acc.trace(None)[0] == pytest.approx(float(torch.trace(G)), rel=1e-10)
        for block in acc.block_params:
            assert acc.trace(block)[0] == pytest.approx(ref.trace(block)[0], rel=1e-12)
    assert grown.trace(None)[1] == pytest.approx(ref.trace(None)[1], rel=1e-9)


def test_data_order_change_is_an_error(tmp_path):
    obj, _, data = problem("mlp", tmp_path, n=12)
    op = CurvatureOperator(obj, data, batch_size=4, cache_bytes=0)  # re-read every pass
    v = _rand(obj)
    first = op.matvec(v)
    torch.testing.assert_close(op.matvec(v), first, rtol=0, atol=1e-14)  # deterministic

    original = type(data).batches

    def shuffled(self, *a, **kw):
        return reversed(list(original(self, *a, **kw)))

    type(data).batches = shuffled
    try:
        with pytest.raises(DataError, match="changed between passes"):
            op.matvec(v)
    finally:
        type(data).batches = original


def test_cache_keeps_batches_and_residuals(tmp_path):
    obj, _, data = problem("mlp", tmp_path, n=9)
    op = CurvatureOperator(obj, data, batch_size=4, kind="residual", merge=False)
    v = _rand(obj)
    a = op.matvec(v)
    assert op.source.cached is not None and len(op.source.cached) == 3 and len(op.residuals) == 3
    torch.testing.assert_close(op.matvec(v), a, rtol=0, atol=0)


def test_train_mode_dropout_masks_are_fixed_by_the_seed(tmp_path):
    """Train-mode Dropout: every pass over a batch sees the masks drawn from the objective's
    seed, so products are deterministic and Lanczos converges; another seed, other masks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).double()
    with pytest.warns(UserWarning, match="--mode train with Dropout"):
        obj = Objective.build(model, "cross_entropy", mode="train", seed=3)
    _, _, data = problem("mlp", tmp_path)
    op = CurvatureOperator(obj, data, batch_size=5)
    assert not op.is_random()
    v = _rand(obj)
    torch.testing.assert_close(op.matvec(v), op.matvec(v), rtol=0, atol=0)
    res = top_eigen(obj, data, "hessian", 2, method="lanczos", tol=1e-8, max_iters=60)
    assert all(e.converged for e in res.values)
    with pytest.warns(UserWarning, match="--mode train with Dropout"):
        other = Objective.build(model, "cross_entropy", mode="train", seed=4)
    assert not torch.allclose(CurvatureOperator(other, data, batch_size=5).matvec(v), op.matvec(v))
    eval_obj = Objective.build(model, "cross_entropy", mode="eval")
    assert not CurvatureOperator(eval_obj, data).is_random()


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_summary_exact_route(kind, tmp_path):
    obj, batch, data = problem("attention", tmp_path)
    ref = dense_hessian(obj, batch) if kind == "hessian" else dense_ggn_autograd(obj, batch)
    s = curvature_summary(obj, data, kind, k=3, batch_size=4)
    assert s.method == "exact(dense)" and s.n_matvecs == obj.space.size
    assert s.trace.value == pytest.approx(float(torch.trace(ref)), rel=1e-10)
    assert s.trace.stderr is None
    w = torch.linalg.eigvalsh(ref).flip(0)[:3]
    got = torch.tensor([e.value for e in s.eigenvalues], dtype=torch.float64)
    torch.testing.assert_close(got, w, atol=1e-10, rtol=0)
    total = sum(layer.trace.value for layer in s.per_layer.values())
    assert total == pytest.approx(s.trace.value, rel=1e-10)
    assert sum(layer.n_params for layer in s.per_layer.values()) == obj.space.size


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_summary_stochastic_route_with_exact_ggn(kind, tmp_path, monkeypatch):
    monkeypatch.setattr(hs, "DENSE_MAX_PARAMS", 0)  # force the large-model route
    obj, batch, data = problem("mlp", tmp_path)
    H, G = dense_hessian(obj, batch), dense_ggn_autograd(obj, batch)
    ref = H if kind == "hessian" else G
    s = curvature_summary(obj, data, kind, probes=30, k=3, tol=1e-10, seed=1, batch_size=4)
    offsets = obj.space.offsets()
    if kind == "ggn":
        assert s.method == "exact(factors)" and s.trace.stderr is None
        assert s.trace.value == pytest.approx(float(torch.trace(G)), rel=1e-10)
    else:
        assert s.method.startswith("exact-ggn+") and "(H-G)" in s.method
        assert abs(s.trace.value - float(torch.trace(H))) <= 4 * s.trace.stderr
    for name, layer in s.per_layer.items():
        params = obj.model.get_submodule(name)
        idx = [offsets[f"{name}.{p}"] for p, _ in params.named_parameters()]
        exact = sum(float(torch.diagonal(ref)[i].sum()) for i in idx)
        se = layer.trace.stderr or 0.0
        assert abs(layer.trace.value - exact) <= 4 * se + 1e-10
    w = torch.linalg.eigvalsh(ref).flip(0)[:3]
    got = torch.tensor([e.value for e in s.eigenvalues], dtype=torch.float64)
    torch.testing.assert_close(got, w, atol=1e-8, rtol=0)
    assert all(e.converged and e.method == "lanczos" for e in s.eigenvalues)


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp"])
def test_summary_plain_estimators_are_unbiased(method, tmp_path):
    obj, batch, data = problem("conv", tmp_path)
    exact = float(torch.trace(dense_hessian(obj, batch)))
    z = []
    for seed in range(6):
        s = curvature_summary(
            obj, data, "hessian", method=method, probes=12, k=0, per_layer=False, seed=seed
        )
        assert s.trace.method == method and s.trace.n_matvecs == 12
        z.append((s.trace.value - exact) / s.trace.stderr)
    assert max(abs(x) for x in z) < 4.5


def test_top_eigen_lanczos_vectors_and_fisher_route(tmp_path):
    obj, batch, data = problem("attention", tmp_path)
    H = dense_hessian(obj, batch)
    res = top_eigen(obj, data, "hessian", 3, method="lanczos", tol=1e-12, vectors=True)
    w = torch.linalg.eigvalsh(H).flip(0)[:3]
    vals = torch.tensor([e.value for e in res.values], dtype=torch.float64)
    torch.testing.assert_close(vals, w, atol=1e-8, rtol=0)
    for e, vec in zip(res.values, res.vectors, strict=True):
        v = obj.space.flatten(vec)
        assert float(v.norm()) == pytest.approx(1.0)
        true_residual = float((H @ v - e.value * v).norm())
        assert true_residual < 1e-6
        assert e.residual == pytest.approx(true_residual, rel=1e-3, abs=1e-10)
    exact = top_eigen(obj, data, "ggn", 2, method="exact", vectors=True)
    G = dense_ggn_autograd(obj, batch)
    v = obj.space.flatten(exact.vectors[0])
    torch.testing.assert_close(G @ v, exact.values[0].value * v, atol=1e-10, rtol=0)
    fisher = top_eigen(obj, data, "fisher", 2, fisher="empirical", vectors=True)
    from gmcurv.capture import capture_all

    ref = fisher_eigen(capture_all(obj, data, 256), 2)
    vals = torch.tensor([e.value for e in fisher.values], dtype=torch.float64)
    torch.testing.assert_close(vals, ref.values)
    assert fisher.method == "gram" and set(fisher.vectors[0]) == set(obj.params)


def _block_index(obj, name):
    offsets = obj.space.offsets()
    params = [f"{name}.{p}" for p, _ in obj.model.get_submodule(name).named_parameters()]
    return torch.cat([torch.arange(offsets[p].start, offsets[p].stop) for p in params])


@pytest.mark.parametrize("name", ["relu", "leaky"])
def test_piecewise_linear_networks_have_zero_within_layer_h_minus_g(name, tmp_path, monkeypatch):
    """Dense oracle: the within-layer blocks of H - G vanish (not the cross blocks), so
    per-layer tr H = tr G and tr H = tr G; the summary reports that with no products."""
    from gmcurv.piecewise import piecewise_linear_reason

    obj, batch, data = problem(name, tmp_path, n=12)
    H, G = dense_hessian(obj, batch), dense_ggn_autograd(obj, batch)
    R = H - G
    blocks = [n for n, m in obj.model.named_children() if isinstance(m, nn.Linear)]
    for b in blocks:
        idx = _block_index(obj, b)
        assert float(R[idx][:, idx].abs().max()) <= 1e-12
    assert float(R.abs().max()) > 1e-3  # the cross-layer blocks do not vanish
    assert float(torch.trace(H)) == pytest.approx(float(torch.trace(G)), rel=1e-12)
    assert piecewise_linear_reason(obj.model, obj.mode) is not None
    monkeypatch.setattr(hs, "DENSE_MAX_PARAMS", 0)  # force the large-model route
    s = curvature_summary(obj, data, "hessian", k=0, batch_size=5)
    assert s.method == "exact-ggn+zero(H-G)" and s.n_matvecs == 0 and s.trace.stderr is None
    assert s.trace.value == pytest.approx(float(torch.trace(H)), rel=1e-10)
    for b in blocks:
        idx = _block_index(obj, b)
        want = float(torch.diagonal(H)[idx].sum())
        assert s.per_layer[b].trace.value == pytest.approx(want, rel=1e-10, abs=1e-12)
    assert any("piecewise linear" in note for note in s.notes)


def test_piecewise_linear_detection_is_conservative():
    from gmcurv.piecewise import piecewise_linear_reason

    assert piecewise_linear_reason(mlp(act=nn.Tanh)) is None
    assert piecewise_linear_reason(seeded(TinyAttention)) is None
    shared = nn.Linear(4, 4)
    assert piecewise_linear_reason(nn.Sequential(shared, nn.ReLU(), shared)) is None
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    assert piecewise_linear_reason(bn, "eval") is not None
    assert piecewise_linear_reason(bn, "train") is None


def test_summary_adaptive_stop_and_shared_per_layer_products(tmp_path, monkeypatch):
    """tanh: H - G is estimated; per-layer traces use the total's products (no more)."""
    monkeypatch.setattr(hs, "DENSE_MAX_PARAMS", 0)
    obj, _, data = problem("mlp", tmp_path)
    flat = curvature_summary(obj, data, "hessian", probes=30, k=0, per_layer=False, rtol=0.0)
    layered = curvature_summary(obj, data, "hessian", probes=30, k=0, rtol=0.0)
    assert flat.n_matvecs == layered.n_matvecs == 30 and layered.stopped == "probes"
    assert layered.trace.value == pytest.approx(flat.trace.value, rel=1e-12)
    loose = curvature_summary(obj, data, "hessian", probes=300, k=0, rtol=0.5)
    assert loose.stopped == "tol" and loose.n_matvecs < 300
    assert loose.trace.stderr <= 0.5 * abs(loose.trace.value)


def test_ggn_factors_captured_once_for_ggn_and_hessian(tmp_path, monkeypatch):
    monkeypatch.setattr(hs, "DENSE_MAX_PARAMS", 0)
    obj, _, data = problem("relu", tmp_path)
    calls = []
    real = hs.exact_ggn_trace
    monkeypatch.setattr(hs, "exact_ggn_trace", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    cache: dict = {}
    g = curvature_summary(obj, data, "ggn", k=0, cache=cache)
    h = curvature_summary(obj, data, "hessian", k=0, cache=cache)
    assert len(calls) == 1 and g.trace.value == pytest.approx(h.trace.value, rel=1e-12)


@pytest.mark.parametrize("kind", ["hessian", "residual"])
def test_whole_sample_graph_against_double_backward(kind, tmp_path):
    """After the first pass the batches merge into one graph (PyHessian's layout): products
    agree with plain double backward over the whole sample; without the merge too."""
    obj, batch, data = problem("attention", tmp_path, n=11)
    H = dense_hessian(obj, batch)
    ref = H if kind == "hessian" else H - dense_ggn_autograd(obj, batch)
    for merge in (True, False):
        op = CurvatureOperator(obj, data, batch_size=4, kind=kind, merge=merge)
        for seed in range(3):
            v = _rand(obj, seed)
            torch.testing.assert_close(op.matvec(v), ref @ v, rtol=0, atol=1e-10)
        assert len(op.graphs.graphs) == len(op.source.cached) == (1 if merge else 3)


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_summary_trace_shares_the_lanczos_products(kind, tmp_path, monkeypatch):
    """auto with k > 0 (no exact GGN): the top-k Lanczos basis deflates the trace, so the
    trace costs only its residual probes beyond the eigenvalues' products; eigenvalues are
    the dense oracle's, traces (total and per layer) within their standard errors."""
    monkeypatch.setattr(hs, "DENSE_MAX_PARAMS", 0)
    monkeypatch.setattr(hs, "EXACT_GGN_MAX_COLUMNS", 0)
    obj, batch, data = problem("attention", tmp_path)
    ref = dense_hessian(obj, batch) if kind == "hessian" else dense_ggn_autograd(obj, batch)
    s = curvature_summary(obj, data, kind, probes=40, k=3, tol=1e-10, rtol=0.0, batch_size=4)
    w = torch.linalg.eigvalsh(ref).flip(0)[:3]
    got = torch.tensor([e.value for e in s.eigenvalues], dtype=torch.float64)
    torch.testing.assert_close(got, w, atol=1e-8, rtol=0)
    lanczos_products = s.eigenvalues[0].n_matvecs
    assert s.method == "hutchpp(lanczos)" and s.n_matvecs == s.trace.n_matvecs == 40
    assert s.trace.n_samples == 40 - lanczos_products >= 2
    assert abs(s.trace.value - float(torch.trace(ref))) <= 4 * s.trace.stderr
    offsets = obj.space.offsets()
    blocks = hs.capture_blocks(obj)
    for name, layer in s.per_layer.items():
        exact = sum(float(torch.diagonal(ref)[offsets[p]].sum()) for p in blocks[name][0])
        assert abs(layer.trace.value - exact) <= 4 * layer.trace.stderr + 1e-10
    assert len(s.per_layer) == len(blocks) > 2
    flat = curvature_summary(obj, data, kind, probes=40, k=3, tol=1e-10, rtol=0.0, per_layer=False)
    assert flat.n_matvecs == s.n_matvecs and flat.trace.value == pytest.approx(s.trace.value)
    plain = curvature_summary(obj, data, kind, method="hutchpp", probes=40, k=3, tol=1e-10)
    assert plain.method == "hutchpp" and plain.n_matvecs > 40  # its own Lanczos on top


def test_memory_budget_guards_lanczos_and_sketch(tmp_path, monkeypatch):
    """A Lanczos basis over the budget stops early with a clear error; a Hutch++ sketch
    over it falls back to plain Hutchinson (unbiased), said in the notes."""
    from gmcurv.errors import MemoryBudgetError

    monkeypatch.setattr(hs, "DENSE_MAX_PARAMS", 0)
    monkeypatch.setattr(hs, "EXACT_GGN_MAX_COLUMNS", 0)
    obj, batch, data = problem("attention", tmp_path)
    P = obj.space.size
    with pytest.raises(MemoryBudgetError, match="Lanczos basis"):
        curvature_summary(obj, data, "hessian", k=2, budget_bytes=8 * P * 10)
    with pytest.raises(MemoryBudgetError, match="--k 0"):
        top_eigen(obj, data, "hessian", 2, method="lanczos", budget_bytes=8 * P * 10)
    s = curvature_summary(obj, data, "hessian", probes=30, k=0, rtol=0.0, budget_bytes=8 * P)
    assert s.method == "hutchinson" and s.n_matvecs == 30
    assert any("does not fit the memory budget" in note for note in s.notes)
    H = dense_hessian(obj, batch)
    assert abs(s.trace.value - float(torch.trace(H))) <= 4 * s.trace.stderr


def test_stop_note_projects_probes_or_says_the_trace_is_near_zero():
    """At the cap, the note says how many probes --tol would take (s.e. ~ 1/sqrt(m)), or,
    when the trace is within 2 standard errors of zero, that no relative tolerance is
    reachable (a random-init GPT-2's Hessian trace: -374 ± 1570 after 11 probes)."""
    far = Estimate(100.0, 10.0, 20, "hutchinson", True)  # rel s.e. 0.1 -> 0.05 needs 4x
    note = hs._stop_note("probes", 20, 20, 0.05, far)
    assert "cap of 20 products" in note and "about 80 probes would reach it" in note
    near = Estimate(-374.0, 1570.0, 11, "hutchinson", True)
    note = hs._stop_note("probes", 11, 11, 0.05, near)
    assert "within 2 standard errors of zero" in note and "probes would" not in note
    assert "relative standard error <= 0.05" in hs._stop_note("tol", 9, 50, 0.05, far)


def test_auto_eigen_is_dense_only_when_lanczos_could_take_as_many_products(tmp_path):
    """`eigen --method auto`: P products for a dense matrix only when P <= the Lanczos cap;
    either way the top eigenvalues agree with the float64 oracle, and no phase's product
    count passes the total it announced."""
    obj, batch, data = problem("attention", tmp_path)
    P = obj.space.size
    w = torch.linalg.eigvalsh(dense_hessian(obj, batch)).flip(0)[:2]
    for max_iters, method in ((P, "exact(dense)"), (P - 1, "lanczos")):
        phases: list[tuple[str, int | None]] = []
        res = top_eigen(
            obj, data, "hessian", 2, tol=1e-10, max_iters=max_iters,
            phase=lambda label, total, seen=phases: seen.append((label, total)),
        )  # fmt: skip
        assert res.method == method
        assert res.n_matvecs <= phases[-1][1]
        vals = torch.tensor([e.value for e in res.values], dtype=torch.float64)
        torch.testing.assert_close(vals, w, atol=1e-7, rtol=0)


def test_shared_lanczos_trace_announces_its_basis_products(tmp_path, monkeypatch):
    """The trace that reuses the top-k Lanczos basis takes basis + residual products:
    the announced total covers both, also when --probes is below the basis size."""
    monkeypatch.setattr(hs, "DENSE_MAX_PARAMS", 0)  # not dense, not the exact GGN:
    monkeypatch.setattr(hs, "EXACT_GGN_MAX_COLUMNS", 0)  # the shared Lanczos route
    obj, _, data = problem("attention", tmp_path)
    phases: list[tuple[str, int | None]] = []
    res = hs.curvature_summary(
        obj, data, "hessian", k=2, probes=4, per_layer=False,
        phase=lambda label, total: phases.append((label, total)),
    )  # fmt: skip
    totals = [t for label, t in phases if "products" in label]
    assert totals and res.n_matvecs <= sum(t or 0 for t in totals)


def test_eigen_tol_reaches_the_fisher_route(tmp_path, monkeypatch):
    """`eigen --curvature fisher --tol` is the Gram eigenvalues' bound; unset, the Fisher
    keeps the kernel-rounding default (None) and Lanczos its 1e-3."""
    import gmcurv.fisher as fm

    seen = []
    real = fm.fisher_eigen
    monkeypatch.setattr(
        fm, "fisher_eigen", lambda *a, **kw: seen.append(kw["tol"]) or real(*a, **kw)
    )
    obj, _, data = problem("mlp", tmp_path)
    top_eigen(obj, data, "fisher", 2, tol=1e-12)
    top_eigen(obj, data, "fisher", 2)
    assert seen == [1e-12, None]
