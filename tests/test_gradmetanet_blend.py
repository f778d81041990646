"""Head v1.2: the model-Fisher diagonal from decomposed gradients and the layer blend."""

from __future__ import annotations

import pytest
import torch

from gmcurv.batch import Batch
from gmcurv.capture import Capturer
from gmcurv.gradmetanet.blend import ROLES, LayerBlend, layer_role
from gmcurv.gradmetanet.features import (
    BIAS_MODEL_FISHER,
    EDGE_MODEL_FISHER,
    LOG_EPS,
    LOG_SCALE,
    check_supported,
    encode,
    gradient_set,
    plug_in,
)
from gmcurv.gradmetanet.model import GradMetaNet, HeadConfig
from gmcurv.gradmetanet.modelfisher import model_fisher_diagonal, output_probabilities
from gmcurv.gradmetanet.zoo import build_mlp
from gmcurv.objective import Objective
from tests.oracles import per_example_grads

SMALL = HeadConfig(
    entry_channels=6, n_interaction=2, neuron_channels=8, n_deepsets=2, prod_channels=3, hidden=8
)


def _mlp(widths, act, n_in=5, n_out=4, seed=0):
    model = build_mlp(n_in, widths, n_out, act).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.7)
    return model


def _batch(n=11, d=5, classes=4, seed=1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return Batch(x, torch.randint(0, classes, (n,), generator=g), 0)


def _gs(model, batch):
    obj = Objective.build(model, "cross_entropy")
    dg = Capturer(obj, "empirical")(batch)
    chain = check_supported(obj)
    return obj, chain, dg, gradient_set(dg, chain, obj.params)


@pytest.mark.parametrize(
    ("widths", "act"),
    [((6, 3), "relu"), ((6, 3), "tanh"), ((5,), "gelu"), ((4, 4, 3), "silu"), ((6,), "sigmoid"),
     ((5, 3), "elu"), ((4,), "softplus"), ((4, 3), "leaky_relu"), ((3,), "identity")],
)  # fmt: skip
def test_model_fisher_diagonal_matches_the_label_averaged_oracle(widths, act):
    """``mean_n Σ_c p_nc g_n(c)²`` with ``g_n(c)`` from vmap(grad) at label ``c``."""
    model = _mlp(widths, act)
    batch = _batch()
    obj, chain, _, gs = _gs(model, batch)
    with torch.no_grad():
        p = torch.softmax(model(batch.inputs), -1)
    torch.testing.assert_close(output_probabilities(gs), p, rtol=1e-10, atol=1e-12)
    oracle = sum(
        p[:, c, None] * per_example_grads(obj, Batch(batch.inputs, torch.full((11,), c), 0)) ** 2
        for c in range(p.shape[1])
    ).mean(0)
    mw, mb = model_fisher_diagonal(gs)
    got = {w: mw[l] for l, w in enumerate(chain.weights)}
    got.update({b: mb[l] for l, b in enumerate(chain.biases) if b is not None})
    torch.testing.assert_close(obj.space.flatten(got), oracle, rtol=1e-9, atol=1e-12)


def test_encode_carries_the_rescaled_model_fisher():
    model = _mlp((6, 3), "tanh", seed=2)
    _, chain, dg, gs = _gs(model, _batch(seed=3))
    pl = plug_in(dg, chain)
    inp = encode(gs, pl, torch.float64)
    mw, mb = model_fisher_diagonal(gs)
    for l in range(3):
        uw, ub = float(inp.unit_w[l]), float(inp.unit_b[l])
        m = mw[l] * float(pl.diag_w[l].sum()) / float(mw[l].sum())  # the plug-in's total
        want = LOG_SCALE * torch.log(m / uw + LOG_EPS)
        torch.testing.assert_close(inp.edges[l][..., EDGE_MODEL_FISHER], want)
        mbs = mb[l] * float(pl.diag_b[l].sum()) / float(mb[l].sum())
        want_b = LOG_SCALE * torch.log(mbs / ub + LOG_EPS)
        torch.testing.assert_close(inp.bias_edges[l][..., BIAS_MODEL_FISHER], want_b)


def _random_head(cfg, seed=3):
    net = GradMetaNet(cfg).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    return net


def test_layer_blend_identity_plug_in_and_roles():
    """Initial θ reproduces the head; θ = 0 the plug-in in the Fisher channel; the OBS
    channel and the scalars never change; the roles are first / hidden / output."""
    assert [layer_role(l, 4) for l in range(4)] == [0, 1, 1, 2] and layer_role(0, 1) == 2
    assert ROLES == ("first", "hidden", "output")
    model = _mlp((6, 4), "relu", seed=4)
    _, chain, dg, gs = _gs(model, _batch(seed=5))
    inp = encode(gs, plug_in(dg, chain), torch.float64)
    base = _random_head(SMALL)
    blended = GradMetaNet(HeadConfig(**{**SMALL.to_dict(), "blend": 1})).double()
    missing, unexpected = blended.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == ["blend.theta_b", "blend.theta_w"]
    assert isinstance(blended.blend, LayerBlend)
    o0, o1 = base(inp), blended(inp)
    for a, b in zip(o0.w + o0.b, o1.w + o1.b, strict=True):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        blended.blend.theta_w.zero_()
        blended.blend.theta_b.zero_()
        blended.blend.theta_w[2, 0] = 0.5  # output layer weights: a constant log-ratio
    o2 = blended(inp)
    for l in range(3):
        want = 0.5 if l == 2 else 0.0
        assert torch.allclose(o2.w[l][..., 0], torch.full_like(o2.w[l][..., 0], want))
        assert torch.allclose(o2.b[l][..., 0], torch.zeros_like(o2.b[l][..., 0]))
        torch.testing.assert_close(o2.w[l][..., 1], o0.w[l][..., 1])
    torch.testing.assert_close(o2.scalars, o0.scalars)


def test_layer_blend_is_equivariant_to_hidden_permutations():
    model = _mlp((6, 4), "tanh", seed=6)
    batch = _batch(seed=7)
    net = _random_head(HeadConfig(**{**SMALL.to_dict(), "blend": 1}), seed=8)
    p1 = torch.randperm(6, generator=torch.Generator().manual_seed(9))
    other = _mlp((6, 4), "tanh", seed=6)
    with torch.no_grad():
        other.fc0.weight.copy_(model.fc0.weight[p1])
        other.fc0.bias.copy_(model.fc0.bias[p1])
        other.fc1.weight.copy_(model.fc1.weight[:, p1])
    outs = []
    for m in (model, other):
        _, chain, dg, gs = _gs(m, batch)
        outs.append(net(encode(gs, plug_in(dg, chain), torch.float64)))
    torch.testing.assert_close(outs[1].w[0], outs[0].w[0][p1])
    torch.testing.assert_close(outs[1].w[1], outs[0].w[1][:, p1])
    torch.testing.assert_close(outs[1].b[0], outs[0].b[0][p1])
    assert outs[0].w[1][..., 0].abs().max() > 1e-3
