"""Captured factors reproduce per-example gradients from vmap(grad), float64, rtol 1e-10."""

from __future__ import annotations

import pytest
import torch
from models import Tied, TinyAttention, TinyConv, TokenMLP, WithCustom, mlp, seeded
from oracles import output_jacobians, per_example_grads
from torch import nn

from gmcurv.batch import Batch
from gmcurv.capture import Capturer, DecomposedGradients, capture, plan_capture
from gmcurv.objective import Objective

N = 7


def _problem(name: str, loss: str = "cross_entropy"):
    g = torch.Generator().manual_seed(7)
    if name == "mlp":
        model, x = seeded(mlp), torch.randn(N, 5, generator=g, dtype=torch.float64)
    elif name == "mlp_nobias":
        model, x = seeded(mlp, bias=False), torch.randn(N, 5, generator=g, dtype=torch.float64)
    elif name == "tokens":
        model, x = seeded(TokenMLP), torch.randn(N, 5, 4, generator=g, dtype=torch.float64)
    elif name == "custom":
        model, x = seeded(WithCustom), torch.randn(N, 5, generator=g, dtype=torch.float64)
    elif name == "attention":
        model, x = seeded(TinyAttention), torch.randint(0, 7, (N, 5), generator=g)
    elif name == "conv":
        model, x = seeded(TinyConv), torch.randn(N, 2, 4, 4, generator=g, dtype=torch.float64)
    elif name == "tied":
        model, x = seeded(Tied), torch.randint(0, 6, (N, 3), generator=g)
    else:  # pragma: no cover
        raise KeyError(name)
    obj = Objective.build(model, loss)
    with torch.no_grad():
        out = obj.outputs(x)
    if loss == "mse":
        y = torch.randn(out.shape, generator=g, dtype=torch.float64)
    else:
        y = torch.randint(0, out.shape[-1], (N,), generator=g)
    return obj, Batch(x, y, 0)


def _rows(dg: DecomposedGradients, obj: Objective) -> torch.Tensor:
    """[N, C, P] per-example, per-column gradients assembled from the factors."""
    grads: dict[str, torch.Tensor] = {}
    for block in dg.blocks:
        grads.update(block.source.materialize(slice(0, dg.n)))
    space = obj.space
    return torch.stack(
        [
            torch.stack(
                [space.flatten({k: v[n, c] for k, v in grads.items()}) for c in range(dg.columns)]
            )
            for n in range(dg.n)
        ]
    )


CASES = ["mlp", "mlp_nobias", "tokens", "custom", "attention", "conv", "tied"]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_empirical_factors_match_vmap_grad(name, loss):
    obj, batch = _problem(name, loss)
    dg = capture(obj, batch)
    assert dg.columns == 1 and dg.n == N
    J = per_example_grads(obj, batch)
    torch.testing.assert_close(_rows(dg, obj)[:, 0], J, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "tokens", "conv", "attention"])
def test_exact_columns_give_output_jacobian_times_sqrt_lambda(name):
    """Exact-Fisher columns: g[n, c] = J_n^T s_c with Σ_c s_c s_c^T = Λ_n (softmax)."""
    obj, batch = _problem(name)
    dg = capture(obj, batch, fisher="exact")
    J = output_jacobians(obj, batch)  # [N, C, P]
    with torch.no_grad():
        p = obj.outputs(batch.inputs).softmax(-1)
    rows = _rows(dg, obj)  # [N, C, P]
    for n in range(N):
        lam = torch.diag(p[n]) - torch.outer(p[n], p[n])
        ggn_n = J[n].T @ lam @ J[n]
        torch.testing.assert_close(rows[n].T @ rows[n], ggn_n, rtol=1e-9, atol=1e-12)


def test_mc_columns_are_seeded_and_scaled():
    obj, batch = _problem("mlp")
    a = capture(obj, batch, fisher="mc", mc_samples=3, seed=5)
    b = capture(obj, batch, fisher="mc", mc_samples=3, seed=5)
    c = capture(obj, batch, fisher="mc", mc_samples=3, seed=6)
    ra, rb, rc = _rows(a, obj), _rows(b, obj), _rows(c, obj)
    assert ra.shape[1] == 3
    torch.testing.assert_close(ra, rb)
    assert not torch.allclose(ra, rc)


def test_plan_kinds_cover_every_parameter():
    model = seeded(TinyAttention)
    obj = Objective.build(model, "cross_entropy")
    plans = plan_capture(model, obj.params)
    covered = [p for plan in plans for p in plan.params]
    assert sorted(covered) == sorted(obj.params)
    kinds = {plan.name: plan.kind for plan in plans}
    assert kinds["tok"] == "embedding" and kinds["ln"] == "norm" and kinds["pos"] == "dense"
    assert kinds["q"] == "linear"
    tied_model = seeded(Tied)
    tied = plan_capture(tied_model, dict(tied_model.named_parameters()))
    assert {p.kind for p in tied} == {"tied", "linear"}


class SharedOutside(nn.Module):
    """fc.weight is also used through F.linear: the self-check must catch it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        h = h + nn.functional.linear(h, self.fc.weight)
        return self.head(h)


def test_self_check_falls_back_to_dense_for_weights_used_outside(recwarn):
    torch.manual_seed(0)
    obj = Objective.build(SharedOutside().double(), "cross_entropy")
    g = torch.Generator().manual_seed(0)
    batch = Batch(
        torch.randn(N, 4, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (N,), generator=g),
        0,
    )
    cap = Capturer(obj)
    dg = cap(batch)
    assert cap.fallbacks == ["fc"]
    assert any("outside its module" in str(w.message) for w in recwarn)
    torch.testing.assert_close(
        _rows(dg, obj)[:, 0], per_example_grads(obj, batch), rtol=1e-10, atol=1e-12
    )


def test_layers_glob_restricts_parameters():
    model = seeded(mlp)
    obj = Objective.build(model, "cross_entropy", layers="2,4.weight")
    assert list(obj.params) == ["2.weight", "2.bias", "4.weight"]
    g = torch.Generator().manual_seed(1)
    batch = Batch(
        torch.randn(N, 5, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (N,), generator=g),
        0,
    )
    dg = capture(obj, batch)
    torch.testing.assert_close(
        _rows(dg, obj)[:, 0], per_example_grads(obj, batch), rtol=1e-10, atol=1e-12
    )
    # the restriction is temporary: all parameters still require grad afterwards
    assert all(p.requires_grad for p in model.parameters())


def test_select_and_cat_roundtrip():
    obj, batch = _problem("attention")
    dg = capture(obj, batch)
    idx = torch.tensor([0, 2, 3])
    rest = torch.tensor([1, 4, 5, 6])
    joined = DecomposedGradients.cat([dg.select(idx), dg.select(rest)])
    order = torch.cat([idx, rest])
    torch.testing.assert_close(_rows(joined, obj), _rows(dg, obj)[order])


class PositionalLM(nn.Module):
    """Positions looked up without the batch dimension (nanoGPT) or with a leading 1 (HF)."""

    def __init__(self, hf_style: bool, misuse: bool = False):
        super().__init__()
        self.tok = nn.Embedding(6, 4)
        self.pos = nn.Embedding(5, 4)
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        self.hf_style, self.misuse = hf_style, misuse

    def forward(self, ids):
        positions = torch.arange(ids.shape[1])
        if self.hf_style:
            positions = positions.unsqueeze(0)
        p = self.pos(positions)
        if self.misuse:  # depends on the exact shape: expanding it would change the result
            p = p.reshape(-1, 4)[: ids.shape[1]]
        shared = self.proj(p)  # a Linear applied to the batch-less tensor too
        h = torch.tanh(self.tok(ids) + shared)
        return self.head(h.mean(1))


@pytest.mark.parametrize(("hf_style", "misuse"), [(False, False), (True, False), (False, True)])
def test_batchless_modules_are_expanded_or_fall_back(hf_style, misuse, recwarn):
    torch.manual_seed(0)
    obj = Objective.build(PositionalLM(hf_style, misuse).double(), "cross_entropy")
    g = torch.Generator().manual_seed(2)
    batch = Batch(
        torch.randint(0, 6, (N, 5), generator=g), torch.randint(0, 3, (N,), generator=g), 0
    )
    cap = Capturer(obj)
    dg = cap(batch)
    torch.testing.assert_close(
        _rows(dg, obj)[:, 0], per_example_grads(obj, batch), rtol=1e-10, atol=1e-12
    )
    kinds = {b.name: b.kind for b in dg.blocks}
    if misuse:
        assert kinds["pos"] == "dense" and "pos" in cap.fallbacks
        assert any("disagree with autograd" in str(w.message) for w in recwarn)
    else:
        assert kinds["pos"] == "embedding" and kinds["proj"] == "linear"
        assert not cap.fallbacks


def test_mc_noise_depends_only_on_the_example_not_the_batching():
    obj, batch = _problem("tokens")
    whole = capture(obj, batch, fisher="mc", mc_samples=2, seed=3)
    first = Capturer(obj, "mc", 2, seed=3)(Batch(batch.inputs[:3], batch.targets[:3], 0))
    rest = Capturer(obj, "mc", 2, seed=3)(Batch(batch.inputs[3:], batch.targets[3:], 3))
    torch.testing.assert_close(
        _rows(DecomposedGradients.cat([first, rest]), obj), _rows(whole, obj)
    )
