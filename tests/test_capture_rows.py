"""Capture for any ``nn.Linear`` input rank: ``[N, I]``, ``[N, T, I]`` and flattened
``[N*T, I]`` (OPT's fc1/fc2), mapped back to examples or densely computed — never a crash.
Oracle: ``vmap(grad)`` per-example gradients in float64.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from oracles import per_example_grads
from torch import nn

from gmcurv.batch import Batch
from gmcurv.capture import Capturer
from gmcurv.errors import GmcurvWarning
from gmcurv.objective import Objective

N, T, D = 5, 4, 6


class Flattening(nn.Module):
    """``fc1``/``fc2`` on ``[N*T, D]`` rows, as OPT's decoder layers call them."""

    def __init__(self, classes=3, order="example-major"):
        super().__init__()
        self.emb = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, 8)
        self.fc2 = nn.Linear(8, D)
        self.head = nn.Linear(D, classes)
        self.order = order

    def forward(self, x):  # [N, T, D]
        h = self.emb(x)
        n, t, d = h.shape
        if self.order == "example-major":
            rows = h.reshape(n * t, d)
        else:  # token-major rows: row r belongs to example r % n
            rows = h.transpose(0, 1).reshape(t * n, d)
        rows = self.fc2(torch.tanh(self.fc1(self.norm(rows))))
        if self.order == "example-major":
            h = h + rows.view(n, t, d)
        else:
            h = h + rows.view(t, n, d).transpose(0, 1)
        return self.head(h.mean(1))


class Queries(nn.Module):
    """A linear on rows that are not a multiple of the batch: learned queries ``[3, D]``."""

    def __init__(self):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(3, D))
        self.fc = nn.Linear(D, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x):  # [N, T, D]
        q = self.fc(self.queries)  # [3, D]: no example structure
        attn = torch.softmax(x @ q.T, dim=-1)  # [N, T, 3]
        return self.head((attn @ q).mean(1))


def _problem(model):
    torch.manual_seed(0)
    model = model.double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, T, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    return Objective.build(model, "cross_entropy"), Batch(x, y, 0)


def _check(obj, batch, dg):
    J = per_example_grads(obj, batch)
    grads = {}
    for block in dg.blocks:
        grads.update(block.source.materialize(slice(0, dg.n)))
    rows = torch.stack(
        [obj.space.flatten({k: v[n, 0] for k, v in grads.items()}) for n in range(N)]
    )
    torch.testing.assert_close(rows, J, rtol=1e-10, atol=1e-12)


def test_flattened_rows_are_mapped_back_to_examples():
    torch.manual_seed(0)
    obj, batch = _problem(Flattening())
    with warnings.catch_warnings():
        warnings.simplefilter("error", GmcurvWarning)
        cap = Capturer(obj)
        dg = cap(batch)
    kinds = {b.name: b.kind for b in dg.blocks}
    assert kinds["fc1"] == kinds["fc2"] == "linear" and kinds["norm"] == "norm"
    assert not cap.fallbacks
    _check(obj, batch, dg)


def test_token_major_rows_fall_back_to_dense_correctly():
    """Rows that are a multiple of N but not example-major: the self-check catches it."""
    obj, batch = _problem(Flattening(order="token-major"))
    cap = Capturer(obj)
    with pytest.warns(GmcurvWarning, match="disagree with autograd"):
        dg = cap(batch)
    assert {"fc1", "fc2"} <= set(cap.fallbacks)
    _check(obj, batch, dg)


def test_rows_without_example_structure_fall_back_to_dense():
    obj, batch = _problem(Queries())
    cap = Capturer(obj)
    with pytest.warns(GmcurvWarning, match=r"fc \(3 rows\).*not a multiple of the 5 examples"):
        dg = cap(batch)
    assert cap.fallbacks == ["fc"] and {b.name: b.kind for b in dg.blocks}["fc"] == "dense"
    _check(obj, batch, dg)
