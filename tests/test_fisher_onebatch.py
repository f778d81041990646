"""The default `gmcurv trace` path: one Gram kernel per block formed once when the sample is
one batch (its diagonal gives the traces), the cheap one-off self-check and what it records,
and the Gram routes — all against float64 dense oracles or the multi-batch path."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from oracles import per_example_grads
from safetensors.torch import save_file
from test_capture import N, _problem
from test_fisher import _dense_fisher
from torch import nn

from gmcurv.batch import Batch
from gmcurv.capture import Capturer
from gmcurv.errors import GmcurvWarning
from gmcurv.factors import LinearFactors
from gmcurv.factors import linear_kernels as kernels
from gmcurv.fisher import fisher_summary
from gmcurv.io.data import load_data
from gmcurv.losses import softmax
from gmcurv.objective import Objective


def _sample(tmp_path, batch: Batch):
    path = tmp_path / "data.safetensors"
    save_file({"inputs": batch.inputs.contiguous(), "targets": batch.targets}, str(path))
    return load_data(path, None)


@pytest.mark.parametrize("name", ["mlp", "tokens", "attention", "conv", "tied"])
def test_one_batch_summary_matches_dense_oracle_and_streamed_path(name, tmp_path):
    obj, batch = _problem(name)
    data = _sample(tmp_path, batch)
    F, _ = _dense_fisher(obj, batch)
    one = fisher_summary(obj, data, batch_size=N, k=3, per_layer_eigen=True)
    streamed = fisher_summary(obj, data, batch_size=3, k=3, per_layer_eigen=True)
    assert math.isclose(one.trace.value, float(torch.trace(F)), rel_tol=1e-10)
    ref = torch.linalg.eigvalsh(F).flip(0)[:3]
    got = torch.tensor([e.value for e in one.eigenvalues], dtype=torch.float64)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-13)
    assert one.rank == streamed.rank
    assert math.isclose(one.trace.stderr or 0.0, streamed.trace.stderr or 0.0, rel_tol=1e-9)
    assert one.per_layer.keys() == streamed.per_layer.keys()
    for layer, a in one.per_layer.items():
        b = streamed.per_layer[layer]
        assert math.isclose(a.trace.value, b.trace.value, rel_tol=1e-10, abs_tol=1e-15)
        for x, y in zip(a.eigenvalues, b.eigenvalues, strict=True):
            assert math.isclose(x.value, y.value, rel_tol=1e-9, abs_tol=1e-13)


def test_summary_records_the_self_check_slice(tmp_path):
    obj, batch = _problem("attention")
    s = fisher_summary(obj, _sample(tmp_path, batch), batch_size=N, k=2)
    check = s.self_check
    assert check is not None
    assert check["examples"] == 1 and check["column"] == 0
    assert check["blocks_checked"] > 0 and check["dense_fallbacks"] == []
    assert "example 0 alone" in check["method"]


def test_train_mode_checks_its_own_slice():
    obj, batch = _problem("mlp")
    obj = Objective.build(obj.model, "cross_entropy", mode="train")
    cap = Capturer(obj)
    cap(batch)
    assert cap.check_report is not None and cap.check_report.examples == N
    assert "captured on its own" in cap.check_report.method


class MixesExamples(nn.Module):
    """Subtracts the batch mean: examples interact, per-example gradients are not those of
    each example alone."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.head(h - h.mean(0, keepdim=True))


def test_examples_that_interact_are_caught_and_captured_densely():
    torch.manual_seed(0)
    obj = Objective.build(MixesExamples().double(), "cross_entropy")
    g = torch.Generator().manual_seed(0)
    batch = Batch(
        torch.randn(N, 5, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (N,), generator=g),
        0,
    )
    cap = Capturer(obj)
    with pytest.warns(GmcurvWarning, match="examples interact"):
        dg = cap(batch)
    assert sorted(cap.fallbacks) == ["fc", "head"]
    assert cap.check_report is not None and cap.check_report.fallbacks == cap.fallbacks
    assert {b.kind for b in dg.blocks} == {"dense"}


def test_clean_models_pass_the_check_without_warnings():
    obj, batch = _problem("tied")
    with warnings.catch_warnings():
        warnings.simplefilter("error", GmcurvWarning)
        cap = Capturer(obj)
        dg = cap(batch)
    assert not cap.fallbacks and cap.check_report.blocks == len(dg.blocks)
    J = per_example_grads(obj, batch)
    assert dg.n == J.shape[0]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_materialised_and_token_gram_routes_agree(bias, dtype):
    g = torch.Generator().manual_seed(3)
    n, c, t, o, i = 5, 2, 6, 7, 4
    delta = torch.randn(n, c, t, o, generator=g, dtype=torch.float64)
    x = torch.randn(n, t, i, generator=g, dtype=torch.float64)
    names = ("w", "b") if bias else ("w",)
    shapes = ((o, i), (o,)) if bias else ((o, i),)
    src = LinearFactors(names, shapes, delta.to(dtype), x.to(dtype), True, bias)
    rows = torch.cat(
        [v.reshape(n, c, -1) for v in src.materialize(slice(0, n)).values()], -1
    ).double()
    ref = rows.reshape(n * c, -1) @ rows.reshape(n * c, -1).T
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-4}
    torch.testing.assert_close(src._materialised_gram(), ref, **tol)
    torch.testing.assert_close(kernels.gram(src.delta, src.x, True, bias), ref, **tol)


def test_empirical_columns_equal_the_one_hot_form():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(3, 4, 6, generator=g, dtype=torch.float64).softmax(-1)
    y = torch.randint(0, 6, (3, 4), generator=g)
    y[0, 1] = -100
    w = torch.rand(3, 4, 1, generator=g, dtype=torch.float64)
    w[0, 1] = 0.0
    onehot = torch.nn.functional.one_hot(y.clamp_min(0), 6).double()
    torch.testing.assert_close(
        softmax.empirical_columns(p, y, w), (w * (p - onehot)).unsqueeze(0), rtol=0, atol=1e-15
    )


@pytest.mark.parametrize("rows", [1, 256])  # one example per block (symmetric halves) / one block
@pytest.mark.parametrize("parts", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_token_pair_gram_by_example_blocks(rows, parts, dtype, monkeypatch):
    """`kernels.gram` by blocks of examples against the later ones (``K`` mirrored) equals
    the materialised gradients' ``J Jᵀ``, with several columns and an inner dimension
    beyond one float32 chunk."""
    monkeypatch.setattr(kernels, "GEMM_ROWS", rows)
    monkeypatch.setattr(kernels, "rows_gram", _small_chunk_rows_gram)
    has_weight, has_bias = parts
    g = torch.Generator().manual_seed(5)
    n, c, t, o, i = 5, 2, 3, 9, 4
    delta = torch.randn(n, c, t, o, generator=g, dtype=torch.float64)
    x = torch.randn(n, t, i, generator=g, dtype=torch.float64)
    names = tuple(k for k, on in zip(("w", "b"), parts, strict=True) if on)
    shapes = tuple(s for s, on in zip(((o, i), (o,)), parts, strict=True) if on)
    src = LinearFactors(names, shapes, delta.to(dtype), x.to(dtype), has_weight, has_bias)
    rows_ = torch.cat(
        [v.reshape(n, c, -1) for v in src.materialize(slice(0, n)).values()], -1
    ).double()
    ref = rows_.reshape(n * c, -1) @ rows_.reshape(n * c, -1).T
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-4}
    got = kernels.gram(src.delta, src.x, has_weight, has_bias)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, **tol)
    torch.testing.assert_close(src.gram(), ref, **tol)  # whichever route the costs pick


def _small_chunk_rows_gram(a, b=None):
    """`rows_gram` with 4-wide float32 chunks (the chunked path on a tiny problem)."""
    from gmcurv.factors import source

    old = source.GEMM_CHUNK
    source.GEMM_CHUNK = 4
    try:
        return source.rows_gram(a, b)
    finally:
        source.GEMM_CHUNK = old


def test_gram_route_costs_pick_token_pairs_for_a_vocabulary_head():
    """At GPT-2's sizes (8 x 128 tokens) the token-pair route is cheaper for every block
    (measured 2-3x on CPU), including the 50,257-row head; far more examples: materialised."""
    from gmcurv.factors.linear import MATERIALISED_RATE

    def token_wins(n, o, i):
        mat = MATERIALISED_RATE * n * (128 + n) * o * i
        return kernels.token_pair_cost(n, 1, 128, o, i) <= mat

    assert all(token_wins(8, o, i) for o, i in [(768, 769), (3072, 769), (768, 3073)])
    assert token_wins(8, 50257, 769)
    assert not token_wins(64, 3072, 769)


def _counting(model: nn.Module) -> list[int]:
    """Count the model's forward calls."""
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_the_preflight_forward_serves_as_the_self_checks_reference(tmp_path):
    """One batch: the preflight's one-example forward, the hooked batch forward, nothing
    else (the self-check reuses the preflight's graph); numbers as the dense oracle."""
    obj, batch = _problem("tokens")  # no dense block (those run torch.func forwards)
    calls = _counting(obj.model)
    F, _ = _dense_fisher(obj, batch)
    calls[0] = 0
    s = fisher_summary(obj, _sample(tmp_path, batch), batch_size=N, k=2)
    assert calls[0] == 2
    assert s.self_check is not None and s.self_check["dense_fallbacks"] == []
    assert math.isclose(s.trace.value, float(torch.trace(F)), rel_tol=1e-10)


@pytest.mark.parametrize("model", ["shared_outside", "mixes_examples"])
def test_a_reused_reference_still_catches_a_wrong_capture(model, tmp_path):
    """Through the preflight's reference forward, a parameter used outside its module and
    examples that interact are still caught (dense fallback; exact numbers where defined)."""
    from test_capture import SharedOutside

    torch.manual_seed(0)
    net = (SharedOutside() if model == "shared_outside" else MixesExamples()).double()
    obj = Objective.build(net, "cross_entropy")
    g = torch.Generator().manual_seed(0)
    width = 4 if model == "shared_outside" else 5
    batch = Batch(
        torch.randn(N, width, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (N,), generator=g),
        0,
    )
    F, _ = _dense_fisher(obj, batch)
    calls = _counting(obj.model)
    with pytest.warns(GmcurvWarning):
        s = fisher_summary(obj, _sample(tmp_path, batch), batch_size=N, k=2)
    assert s.self_check is not None and s.self_check["dense_fallbacks"]
    # the preflight (the check's reference), the batch, the batch again and its dense
    # (torch.func) forward: no forward of the check's own
    assert calls[0] == 4
    if model == "shared_outside":  # (interacting examples have no per-example truth)
        assert math.isclose(s.trace.value, float(torch.trace(F)), rel_tol=1e-10)


def test_a_reference_of_another_example_is_not_used():
    """An offered forward of another example is ignored: the check runs its own forward."""
    obj, batch = _problem("mlp")
    other = Batch(batch.inputs[1:2], None, 0)  # same start index, other inputs
    with torch.enable_grad():
        wrong = obj.outputs(other.inputs) * 2.0  # would fail the outputs' comparison
    cap = Capturer(obj)
    cap.offer_reference(other, wrong)
    calls = _counting(obj.model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GmcurvWarning)
        cap(batch)
    assert calls[0] == 2 and not cap.fallbacks


def test_a_reference_is_dropped_once_the_check_ran():
    obj, batch = _problem("mlp")
    cap = Capturer(obj)
    cap(batch)
    with torch.enable_grad():
        out = obj.outputs(batch.inputs[:1])
    cap.offer_reference(Batch(batch.inputs[:1], None, 0), out)
    assert cap._reference is None


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("fisher", ["empirical", "mc", "exact"])
def test_losses_and_columns_equal_the_separate_calls(shift, fisher):
    """Cross-entropy's one-pass losses and columns equal `per_example` and
    `output_columns` (ignored tokens included)."""
    from gmcurv.losses.cross_entropy import CrossEntropy
    from gmcurv.rng import example_noise

    loss = CrossEntropy(shift=shift)
    g = torch.Generator().manual_seed(2)
    out = torch.randn(3, 5, 7, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 7, (3, 5), generator=g)
    y[0, 2] = y[2, 4] = -100
    if not shift:  # classification with token positions: [N, T, C] against [N, T]
        y[1, 0] = -100
    shape, kind = loss.noise_spec(out.shape, 2)
    noise = example_noise(0, 0, 3, shape, kind, out.dtype, out.device) if fisher == "mc" else None
    losses, cols = loss.losses_and_columns(out, y, fisher, 2, noise)
    torch.testing.assert_close(losses, loss.per_example(out, y), rtol=1e-13, atol=1e-14)
    ref = loss.output_columns(out, y, fisher, 2, noise)
    torch.testing.assert_close(cols, ref, rtol=1e-13, atol=1e-15)
