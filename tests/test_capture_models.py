"""Capture and every Fisher closed form on conv, embedding, tied and transformer models.

Oracles are dense float64 matrices: ``J`` (rows ``∇L_n`` from ``vmap(grad)``) for the
empirical Fisher, explicit output Jacobians times ``sqrt(Λ)`` for the exact one. Checked:
captured per-example gradients, trace, diagonal, Gram kernel (whole and per block),
squared norms, eigenvalues and eigenvectors (dense ``eigh`` and Lanczos routes), ``J v``,
``J^T u``, ``F v``, ``v^T F v``, streaming accumulation, capture plans and the memory
estimate.
"""

from __future__ import annotations

import math

import pytest
import torch
from models import ConvZoo, EmbedZoo, TiedPair, seeded, tiny_gpt2
from oracles import output_jacobians, per_example_grads
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from gmcurv.batch import Batch
from gmcurv.capture import Capturer, capture, plan_capture
from gmcurv.capture.budget import estimate_capture
from gmcurv.fisher import (
    FisherAccumulator,
    fisher_diagonal,
    fisher_eigen,
    fisher_matvec,
    fisher_quadratic_form,
    fisher_trace,
    gram_kernel,
    jvp,
    vjp,
)
from gmcurv.objective import Objective

N = 6
CASES = ["conv", "embed", "tied", "gpt2"]
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


def _perturb(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial norm scales, biases and (for GPT-2) weights of order one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if p.ndim == 1:
                p.add_(0.3 * noise)
            elif isinstance(model, nn.Module) and "transformer" in name:
                p.copy_(0.4 * noise)
    return model


def _problem(name: str):
    g = torch.Generator().manual_seed(11)
    if name == "conv":
        model = seeded(ConvZoo)
        x = torch.randn(N, 2, 6, 6, generator=g, dtype=torch.float64)
        loss = "cross_entropy"
        y = torch.randint(0, 3, (N,), generator=g)
    elif name == "embed":
        model = seeded(EmbedZoo)
        x = torch.randint(0, 40, (N, 5), generator=g)
        x[0, :2] = 0  # padding_idx tokens
        x[1, 1] = x[1, 3] = 7  # a repeated token
        loss = "cross_entropy"
        y = torch.randint(0, 3, (N, 5), generator=g)
        y[2, 4] = -100  # an ignored position
    elif name == "tied":
        model = seeded(TiedPair)
        x = torch.randint(0, 6, (N, 3), generator=g)
        loss = "cross_entropy"
        y = torch.randint(0, 6, (N,), generator=g)
    elif name == "gpt2":
        model = seeded(tiny_gpt2)
        x = torch.randint(0, 9, (N, 6), generator=g)
        loss = "next_token"
        y = x.clone()
        y[3, 2] = -100
    else:  # pragma: no cover
        raise KeyError(name)
    obj = Objective.build(_perturb(model, 5), loss)
    return obj, Batch(x, y, 0)


@pytest.fixture(scope="module", params=CASES)
def case(request):
    """(objective, batch, factors, dense J [N, P]) per model."""
    obj, batch = _problem(request.param)
    with sdpa_kernel([SDPBackend.MATH]):  # vmap has batching rules for the math kernel
        J = per_example_grads(obj, batch)
    return request.param, obj, batch, Capturer(obj)(batch), J


def _rows(dg, obj) -> torch.Tensor:
    """``[N, C, P]`` per-example, per-column gradients assembled from the factors."""
    grads: dict[str, torch.Tensor] = {}
    for block in dg.blocks:
        grads.update(block.source.materialize(slice(0, dg.n)))
    flat = [grads[k].reshape(dg.n, dg.columns, -1) for k in obj.space.names]
    return torch.cat(flat, dim=-1)


def _block_columns(obj, block) -> torch.Tensor:
    offsets = obj.space.offsets()
    return torch.cat([torch.arange(offsets[p].start, offsets[p].stop) for p in block.params])


# ------------------------------------------------------------------------------ the plans
def test_plans_use_decomposed_forms(case):
    name, obj, _, dg, _ = case
    kinds = {b.name: b.kind for b in dg.blocks}
    expected = {
        "conv": {"strided": "conv2d", "even": "conv2d", "reflect": "conv2d",
                 "circular": "conv2d", "twice": "conv2d", "grouped": "dense", "head": "linear"},
        "embed": {"big": "embedding", "small": "embedding", "norm": "norm", "head": "linear"},
        "tied": {"emb": "tied", "a": "tied", "gn": "norm"},
        "gpt2": {"transformer.wte": "tied", "transformer.wpe": "embedding",
                 "transformer.h.0.attn.c_attn": "conv1d", "transformer.h.1.ln_2": "norm"},
    }[name]  # fmt: skip
    for block, kind in expected.items():
        assert kinds[block] == kind, (block, kinds)
    covered = sorted(p for b in dg.blocks for p in b.params)
    assert covered == sorted(obj.params)
    # tied blocks: one block, several modules (the tied weight counted once)
    plans = {p.name: p for p in plan_capture(obj.model, obj.params)}
    if name == "tied":
        assert set(plans["a"].modules) == {"a", "b"}
        assert set(plans["emb"].modules) == {"emb", "out"}
        assert plans["emb"].params == ("emb.weight", "out.bias")


def test_factors_equal_vmap_grad(case):
    _, obj, _, dg, J = case
    assert dg.columns == 1 and dg.n == N
    torch.testing.assert_close(_rows(dg, obj)[:, 0], J, rtol=1e-10, atol=1e-13)


# ------------------------------------------------------------------------- closed forms
def test_trace_and_diagonal(case):
    _, obj, _, dg, J = case
    F = J.T @ J / N
    assert math.isclose(fisher_trace(dg), float(torch.trace(F)), rel_tol=1e-10)
    diag = obj.space.flatten(fisher_diagonal(dg))
    torch.testing.assert_close(diag, torch.diagonal(F), rtol=1e-10, atol=1e-15)
    acc = FisherAccumulator()
    for idx in (torch.arange(0, 2), torch.arange(2, N)):
        acc.add(dg.select(idx))
    assert math.isclose(acc.trace()[0], float(torch.trace(F)), rel_tol=1e-10)
    torch.testing.assert_close(
        obj.space.flatten(acc.diag()), torch.diagonal(F), rtol=1e-10, atol=1e-15
    )


def test_diagonal_streamed_one_example_at_a_time(case, monkeypatch):
    """Sequence diagonals stream over example chunks; chunk boundaries change nothing."""
    import gmcurv.factors.linear_kernels

    _, obj, _, dg, J = case
    monkeypatch.setattr(gmcurv.factors.linear_kernels, "CACHE_ELEMENTS", 1)
    diag = obj.space.flatten(fisher_diagonal(dg))
    torch.testing.assert_close(diag, torch.diagonal(J.T @ J / N), rtol=1e-10, atol=1e-15)


def test_gram_and_sq_norms_per_block(case):
    _, obj, _, dg, J = case
    torch.testing.assert_close(gram_kernel(dg), J @ J.T, rtol=1e-10, atol=1e-13)
    for block in dg.blocks:
        Jb = J[:, _block_columns(obj, block)]
        torch.testing.assert_close(gram_kernel(dg, [block.name]), Jb @ Jb.T, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(
            block.source.sq_norms()[:, 0], (Jb**2).sum(1), rtol=1e-10, atol=1e-15
        )


def test_eigenvalues_and_vectors(case):
    _, obj, _, dg, J = case
    F = J.T @ J / N
    ref = torch.linalg.eigvalsh(F).flip(0)[:4]
    res = fisher_eigen(dg, 4, vectors=True)
    torch.testing.assert_close(res.values, ref, rtol=1e-9, atol=1e-13)
    assert res.method == "gram" and res.rank == torch.linalg.matrix_rank(J).item()
    for lam, vec in zip(res.values, res.vectors, strict=True):
        v = obj.space.flatten(vec)
        assert math.isclose(float(v.norm()), 1.0, rel_tol=1e-9)
        torch.testing.assert_close(F @ v, lam * v, rtol=1e-8, atol=1e-12)
    lanczos = fisher_eigen(dg, 3, dense_limit=2, tol=1e-12)
    assert lanczos.method == "gram-lanczos" and bool(lanczos.converged.all())
    torch.testing.assert_close(lanczos.values, ref[:3], rtol=1e-8, atol=1e-12)
    # per block: the eigenvalues of that block's Fisher
    block = max(dg.blocks, key=lambda b: b.dim)
    Jb = J[:, _block_columns(obj, block)]
    ref_b = torch.linalg.eigvalsh(Jb.T @ Jb / N).flip(0)[:2]
    torch.testing.assert_close(
        fisher_eigen(dg, 2, blocks=[block.name]).values, ref_b, rtol=1e-9, atol=1e-13
    )


def test_products(case):
    _, obj, _, dg, J = case
    F = J.T @ J / N
    g = torch.Generator().manual_seed(3)
    v = torch.randn(obj.space.size, generator=g, dtype=torch.float64)
    u = torch.randn(N, 1, generator=g, dtype=torch.float64)
    vec = obj.space.unflatten(v)
    torch.testing.assert_close(jvp(dg, vec)[:, 0], J @ v, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(obj.space.flatten(vjp(dg, u)), J.T @ u[:, 0], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(
        obj.space.flatten(fisher_matvec(dg, vec)), F @ v, rtol=1e-10, atol=1e-13
    )
    assert math.isclose(fisher_quadratic_form(dg, vec), float(v @ F @ v), rel_tol=1e-10)
    # a direction on one block only (other parameters absent from the dict)
    name = dg.blocks[-1].params[0]
    only = {name: vec[name]}
    cols = obj.space.offsets()[name]
    torch.testing.assert_close(
        jvp(dg, only)[:, 0], J[:, cols.start : cols.stop] @ v[cols.start : cols.stop],
        rtol=1e-10, atol=1e-13,
    )  # fmt: skip


# ------------------------------------------------------------------- exact and MC Fisher
@pytest.mark.parametrize("name", ["embed", "gpt2"])
def test_exact_columns_on_sequence_outputs(name):
    """Exact Fisher of a token-averaged CE: ``Σ_t w_t² J_t^T (diag p_t - p_t p_t^T) J_t``."""
    obj, batch = _problem(name)
    dg = capture(obj, batch, fisher="exact")
    with sdpa_kernel([SDPBackend.MATH]):
        Jo = output_jacobians(obj, batch)  # [N, T, V, P]
    with torch.no_grad():
        out = obj.outputs(batch.inputs)
    shift = name == "gpt2"
    logits = out[:, :-1] if shift else out
    targets = batch.targets[:, 1:] if shift else batch.targets
    Jt = Jo[:, :-1] if shift else Jo
    rows = _rows(dg, obj)  # [N, C, P]
    for n in range(N):
        valid = targets[n] != -100
        w = 1.0 / float(valid.sum())
        ref = torch.zeros(obj.space.size, obj.space.size, dtype=torch.float64)
        for t in torch.nonzero(valid).flatten():
            p = logits[n, t].softmax(-1)
            lam = torch.diag(p) - torch.outer(p, p)
            ref += w**2 * Jt[n, t].T @ lam @ Jt[n, t]
        torch.testing.assert_close(rows[n].T @ rows[n], ref, rtol=1e-9, atol=1e-13)


def test_mc_fisher_is_unbiased_on_gpt2():
    obj, batch = _problem("gpt2")
    exact = fisher_trace(capture(obj, batch, fisher="exact"))
    draws = torch.tensor(
        [fisher_trace(capture(obj, batch, fisher="mc", mc_samples=2, seed=s)) for s in range(60)],
        dtype=torch.float64,
    )
    se = float(draws.std()) / math.sqrt(len(draws))
    assert se > 0 and abs(float(draws.mean()) - exact) < 4 * se


# ------------------------------------------------------------------------ memory estimate
@pytest.mark.parametrize("name", CASES)
def test_memory_estimate_bounds_the_factors(name):
    """The preflight's factor bytes cover what a capture actually holds (same order)."""
    obj, batch = _problem(name)
    one = Batch(batch.inputs[:1], batch.targets[:1], 0)
    est = estimate_capture(obj, one, "empirical")
    dg = capture(obj, batch)
    held = sum(b.source.nbytes() for b in dg.blocks) / dg.n
    assert est.columns == 1
    assert held <= est.factors + est.dense <= 4 * held
    assert est.activations > 0
    if name == "conv":
        assert est.dense_modules == ("grouped",) and est.dense_params == 4 * 2 * 9 + 4
    exact = estimate_capture(obj, one, "exact")
    with torch.no_grad():
        out = obj.outputs(one.inputs)
    assert exact.columns == obj.loss.n_columns(out.shape, "exact", 1) > 1
    assert exact.batch_bytes(N) > est.batch_bytes(N)


def test_repeated_capture_frees_each_batch():
    """Hooks must not tie a batch's graph and factors into an uncollectable cycle."""
    import gc
    import weakref

    obj, batch = _problem("gpt2")
    cap = Capturer(obj)
    first = cap(batch)
    linear = next(b for b in first.blocks if b.kind in ("linear", "conv1d"))
    probe = weakref.ref(linear.source.delta)  # a captured delta tensor
    del linear
    del first
    gc.collect()
    assert probe() is None
    for _ in range(2):
        cap(batch)
    gc.collect()
    live = sum(1 for o in gc.get_objects() if torch.is_tensor(o))
    for _ in range(3):
        cap(batch)
    gc.collect()
    assert sum(1 for o in gc.get_objects() if torch.is_tensor(o)) <= live
