"""Per-example losses, output-space curvature and Fisher columns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import hessian

from gmcurv.errors import DataError
from gmcurv.losses import get_loss

g = torch.Generator().manual_seed(0)


def test_means_match_pytorch_default_reduction():
    logits = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (6,), generator=g)
    ce = get_loss("cross_entropy")
    torch.testing.assert_close(ce.per_example(logits, y).mean(), F.cross_entropy(logits, y))
    out, tgt = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    torch.testing.assert_close(get_loss("mse").per_example(out, tgt).mean(), F.mse_loss(out, tgt))
    # sequences of equal length: mean over examples of token means = token mean
    seq = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    ys = torch.randint(0, 4, (3, 5), generator=g)
    torch.testing.assert_close(
        ce.per_example(seq, ys).mean(), F.cross_entropy(seq.reshape(-1, 4), ys.reshape(-1))
    )


def test_next_token_shifts_and_ignores():
    logits = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    ids[1, 4] = -100
    nt = get_loss("next_token")
    ref = torch.stack(
        [F.cross_entropy(logits[i, :-1], ids[i, 1:], ignore_index=-100) for i in range(2)]
    )
    torch.testing.assert_close(nt.per_example(logits, ids), ref)
    assert nt.default_targets(ids) is ids


@pytest.mark.parametrize("name", ["cross_entropy", "mse", "next_token"])
def test_output_hessian_vp_matches_autograd(name):
    loss = get_loss(name)
    shape = (2, 4, 3)
    out = torch.randn(*shape, generator=g, dtype=torch.float64)
    tgt = (
        torch.randint(0, 3, shape[:-1], generator=g)
        if name != "mse"
        else torch.randn(*shape, generator=g, dtype=torch.float64)
    )
    v = torch.randn(*shape, generator=g, dtype=torch.float64)
    H = hessian(lambda o: loss.per_example(o, tgt).sum())(out)
    ref = (H.reshape(out.numel(), -1) @ v.reshape(-1)).reshape(shape)
    torch.testing.assert_close(loss.output_hessian_vp(out, tgt, v), ref)


@pytest.mark.parametrize("name", ["cross_entropy", "mse"])
def test_exact_columns_square_to_lambda_and_mc_matches_in_expectation(name):
    loss = get_loss(name)
    out = torch.randn(3, 4, generator=g, dtype=torch.float64)
    tgt = (
        torch.randint(0, 4, (3,), generator=g)
        if name != "mse"
        else torch.randn(3, 4, dtype=torch.float64)
    )
    cols = loss.output_columns(out, tgt, "exact")  # [C, N, 4]
    lam = torch.einsum("cni,cnj->nij", cols, cols)
    for n in range(3):
        eye = torch.eye(4, dtype=torch.float64)
        ref = torch.stack(
            [loss.output_hessian_vp(out[n : n + 1], tgt[n : n + 1], e[None])[0] for e in eye]
        )
        torch.testing.assert_close(lam[n], ref)
    shape, kind = loss.noise_spec(out.shape, 20000)
    draw = torch.rand if kind == "uniform" else torch.randn
    noise = draw((3, *shape), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mc = loss.output_columns(out, tgt, "mc", mc_samples=20000, noise=noise)
    emp = torch.einsum("cni,cnj->nij", mc, mc)
    torch.testing.assert_close(emp, lam, atol=0.03, rtol=0.1)


def test_empirical_column_is_the_gradient():
    loss = get_loss("cross_entropy")
    out = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (3,), generator=g)
    (grad,) = torch.autograd.grad(loss.per_example(out, y).sum(), out)
    torch.testing.assert_close(loss.output_columns(out, y, "empirical")[0], grad)


def test_label_checks():
    ce = get_loss("cross_entropy")
    with pytest.raises(DataError, match=r"labels range over \[0, 5\].*3 classes"):
        ce.check(torch.Size((4, 3)), torch.tensor([0, 1, 2, 5]), "d.safetensors")
    with pytest.raises(DataError, match="integer"):
        ce.check(torch.Size((2, 3)), torch.tensor([0.5, 1.0]), "d")
    with pytest.raises(DataError, match="shape"):
        ce.check(torch.Size((2, 3)), torch.tensor([[0], [1]]), "d")
    with pytest.raises(DataError, match="shape"):
        get_loss("mse").check(torch.Size((2, 3)), torch.zeros(2, 2), "d")
