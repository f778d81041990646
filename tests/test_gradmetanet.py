"""GradMetaNet head: features vs oracles, exact Hessian targets, equivariance, zoo + training."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from gmcurv.batch import Batch
from gmcurv.capture import Capturer
from gmcurv.errors import UnsupportedError
from gmcurv.gradmetanet.features import (
    check_supported,
    encode,
    gradient_set,
    mlp_chain,
    plug_in,
    stack_inputs,
)
from gmcurv.gradmetanet.model import GradMetaNet, HeadConfig, decode
from gmcurv.gradmetanet.targets import compute_targets, mlp_hessian_diagonal
from gmcurv.gradmetanet.zoo import build_mlp
from gmcurv.io.data import load_data
from gmcurv.objective import Objective
from gmcurv.woodbury import default_eps
from tests.models import TinyConv, mlp, seeded
from tests.oracles import dense_hessian, per_example_grads

SMALL = HeadConfig(
    entry_channels=6, n_interaction=2, neuron_channels=8, n_deepsets=2, prod_channels=3, hidden=8
)


def _mlp(widths=(6, 4), act="tanh", n_in=5, n_out=3, seed=0, bias=True):
    model = build_mlp(n_in, widths, n_out, act).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.7)
    if not bias:
        model.fc1.bias = None
    return model


def _batch(n=12, d=5, classes=3, seed=1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return Batch(x, torch.randint(0, classes, (n,), generator=g), 0)


def _encode(model, batch, dtype=torch.float64):
    obj = Objective.build(model, "cross_entropy")
    dg = Capturer(obj, "empirical")(batch)
    chain = check_supported(obj)
    return encode(gradient_set(dg, chain, obj.params), plug_in(dg, chain), dtype)


def _random_head(config=SMALL, seed=3) -> GradMetaNet:
    net = GradMetaNet(config).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero everywhere, final layers included
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    return net


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------------------------- features
def test_gradient_set_and_plug_in_match_oracles():
    model = _mlp(seed=2)
    batch = _batch(n=10)
    obj = Objective.build(model, "cross_entropy")
    dg = Capturer(obj, "empirical")(batch)
    chain = check_supported(obj)
    gs = gradient_set(dg, chain, obj.params)
    pl = plug_in(dg, chain)
    J = per_example_grads(obj, batch)  # [N, P]
    space = obj.space
    for l in range(gs.depth):  # g_n(W_l) = delta_l[n] x_l[n]^T, g_n(b_l) = delta_l[n]
        rows = space.unflatten(J)
        _close(torch.einsum("no,ni->noi", gs.delta[l], gs.x[l]), rows[chain.weights[l]])
        _close(gs.delta[l], rows[chain.biases[l]])
    F = J.T @ J / len(J)
    diag = space.unflatten(F.diagonal())
    eps = default_eps(dg)
    inv_flat = torch.empty(len(F), dtype=F.dtype)
    offsets = space.offsets()
    for w, b in zip(chain.weights, chain.biases, strict=True):  # block-diagonal F (per layer)
        idx = torch.cat([torch.arange(len(F))[offsets[w]], torch.arange(len(F))[offsets[b]]])
        block = F[idx][:, idx] + eps * torch.eye(len(idx), dtype=F.dtype)
        inv_flat[idx] = torch.linalg.inv(block).diagonal()
    inv = space.unflatten(inv_flat)
    for l in range(gs.depth):
        _close(pl.diag_w[l], diag[chain.weights[l]])
        _close(pl.diag_b[l], diag[chain.biases[l]])
        _close(pl.obs_w[l], 1.0 / inv[chain.weights[l]])
        _close(pl.obs_b[l], 1.0 / inv[chain.biases[l]])
    assert pl.trace == pytest.approx(float(F.trace()), rel=1e-10)
    assert pl.top == pytest.approx(float(torch.linalg.eigvalsh(F)[-1]), rel=1e-8)


def test_mlp_chain_of_sequential_and_refusals():
    seq = mlp(sizes=(5, 7, 6, 3), act=nn.GELU)
    chain = mlp_chain(seq)
    assert chain.paths == ("0", "2", "4") and chain.activation == "gelu"
    with pytest.raises(UnsupportedError, match="method exact"):
        mlp_chain(seeded(TinyConv))
    with pytest.raises(UnsupportedError):
        mlp_chain(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.Linear(3, 2)))
    model = _mlp()
    with pytest.raises(UnsupportedError, match="cross-entropy"):
        check_supported(Objective.build(model, "mse"))
    with pytest.raises(UnsupportedError, match="empirical"):
        check_supported(Objective.build(model, "cross_entropy"), fisher="mc")
    with pytest.raises(UnsupportedError, match="every layer"):
        check_supported(Objective.build(model, "cross_entropy", layers="fc0"))


# -------------------------------------------------------------------------------- targets
def _data_file(tmp_path, n=30, d=5, classes=3, seed=4):
    g = torch.Generator().manual_seed(seed)
    path = tmp_path / "d.safetensors"
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    save_file({"inputs": x, "targets": torch.randint(0, classes, (n,), generator=g)}, str(path))
    return load_data(path)


@pytest.mark.parametrize("act", ["tanh", "gelu", "relu", "silu", "sigmoid"])
def test_exact_hessian_diagonal_matches_dense(tmp_path, act):
    data = _data_file(tmp_path)
    model = _mlp(widths=(6, 4), act=act, seed=5, bias=act != "silu")  # one bias-less layer
    obj = Objective.build(model, "cross_entropy")
    diag = mlp_hessian_diagonal(obj, data, mlp_chain(model), batch_size=7)  # several batches
    H = dense_hessian(obj, next(data.batches(30, "cpu", torch.float64)))
    _close(obj.space.flatten(diag), H.diagonal())


def test_compute_targets_against_dense(tmp_path):
    data = _data_file(tmp_path)
    model = _mlp(widths=(5,), act="tanh", seed=6)
    obj = Objective.build(model, "cross_entropy")
    tg, dg = compute_targets(obj, data, batch_size=8, top_tol=1e-8)
    batch = next(data.batches(30, "cpu", torch.float64))
    H = dense_hessian(obj, batch)
    assert tg.hessian_trace == pytest.approx(float(H.trace()), rel=1e-10)
    assert tg.hessian_top == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-8)
    J = per_example_grads(obj, batch)
    F = J.T @ J / len(J)
    assert tg.fisher_trace == pytest.approx(float(F.trace()), rel=1e-10)
    _close(obj.space.flatten(tg.fisher_diag), F.diagonal())
    inv = torch.cat(  # block-diagonal over the two layers (weight + bias each)
        [
            torch.linalg.inv(F[sl, sl] + tg.eps * torch.eye(sl.stop - sl.start)).diagonal()
            for sl in (slice(0, 30), slice(30, 48))
        ]
    )
    # Woodbury's (1/eps)(1 - quad) cancels digits when eps is small: rtol 1e-6
    torch.testing.assert_close(obj.space.flatten(tg.obs_curv), 1.0 / inv, rtol=1e-6, atol=0)
    assert dg.n == 30


# ---------------------------------------------------------------------------- equivariance
def _permuted_mlp(model, p1, p2):
    """The same function with hidden layer 1 permuted by p1 and hidden layer 2 by p2."""
    other = build_mlp(5, (6, 4), 3, model.activation_name).double()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    new = {
        "fc0.weight": sd["fc0.weight"][p1],
        "fc0.bias": sd["fc0.bias"][p1],
        "fc1.weight": sd["fc1.weight"][p2][:, p1],
        "fc1.bias": sd["fc1.bias"][p2],
        "fc2.weight": sd["fc2.weight"][:, p2],
        "fc2.bias": sd["fc2.bias"],
    }
    other.load_state_dict(new)
    return other


@pytest.mark.parametrize(("index_freqs", "edge_extra"), [(0, 0), (3, 0), (0, 2)])
def test_hidden_neuron_permutations_are_equivariant(index_freqs, edge_extra):
    cfg = HeadConfig(**{**SMALL.to_dict(), "index_freqs": index_freqs, "edge_extra": edge_extra})
    net = _random_head(cfg)
    model = _mlp(seed=7)
    batch = _batch(n=12)
    g = torch.Generator().manual_seed(8)
    for _ in range(3):
        p1, p2 = torch.randperm(6, generator=g), torch.randperm(4, generator=g)
        inp = _encode(model, batch)
        inp2 = _encode(_permuted_mlp(model, p1, p2), batch)
        o1, o2 = net(inp), net(inp2)
        _close(o2.w[0], o1.w[0][p1])
        _close(o2.w[1], o1.w[1][p2][:, p1])
        _close(o2.w[2], o1.w[2][:, p2])
        _close(o2.b[0], o1.b[0][p1])
        _close(o2.b[1], o1.b[1][p2])
        _close(o2.b[2], o1.b[2])
        _close(o2.scalars, o1.scalars)
        d1, d2 = decode(inp, o1), decode(inp2, o2)
        _close(d2.param[1], d1.param[1][p2][:, p1])
        _close(d2.scalars, d1.scalars)
        assert o1.w[0].abs().max() > 1e-3 and o1.scalars.abs().max() > 1e-3  # not trivial


@pytest.mark.parametrize("edge_extra", [0, 2])
def test_gradient_set_order_does_not_matter(edge_extra):
    net = _random_head(HeadConfig(**{**SMALL.to_dict(), "edge_extra": edge_extra}))
    model = _mlp(seed=9)
    batch = _batch(n=12)
    inp = _encode(model, batch)
    o1 = net(inp)
    g = torch.Generator().manual_seed(10)
    for _ in range(3):
        perm = torch.randperm(12, generator=g)
        o2 = net(_encode(model, Batch(batch.inputs[perm], batch.targets[perm], 0)))
        for a, b in zip(o1.w + o1.b, o2.w + o2.b, strict=True):
            _close(a, b)
        _close(o1.scalars, o2.scalars)


def test_one_head_serves_any_widths_and_depths_and_stacks():
    net = _random_head()
    batch = _batch(n=9)
    for widths in [(3,), (6, 4), (2, 7, 3), (4, 4, 4, 4)]:
        out = net(_encode(_mlp(widths=widths, seed=11), batch))
        sizes = [5, *widths, 3]
        assert [tuple(w.shape[:2]) for w in out.w] == list(zip(sizes[1:], sizes[:-1], strict=True))
        assert out.scalars.shape == (3,)
    model = _mlp(seed=12)
    a = _encode(model, _batch(n=9, seed=1))
    b = _encode(model, _batch(n=9, seed=2))
    both = net(stack_inputs([a, b]))
    _close(both.w[1][1], net(b).w[1])
    _close(both.scalars[0], net(a).scalars)


def test_fresh_head_reproduces_the_plug_in():
    net = GradMetaNet(SMALL).double()
    inp = _encode(_mlp(seed=13), _batch(n=10))
    with torch.no_grad():
        pred = decode(inp, net(inp))
    obj = Objective.build(_mlp(seed=13), "cross_entropy")
    dg = Capturer(obj, "empirical")(_batch(n=10))
    pl = plug_in(dg, mlp_chain(obj.model))
    # zero log-ratios: plug-in plus the floor (1e-3 of the layer mean)
    for l in range(3):
        base = pl.diag_w[l] + 1e-3 * pl.diag_w[l].mean()
        _close(pred.param[l][..., 0], base)
    assert float(pred.scalars[0]) == pytest.approx(pl.trace, rel=1e-12)
    assert float(pred.scalars[2]) == pytest.approx(pl.top, rel=1e-12)
    assert math.isfinite(float(pred.scalars[1]))


# ------------------------------------------------------------------------- zoo + training
@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    from gmcurv.gradmetanet.zoo import build_zoo

    cache = tmp_path_factory.mktemp("zoo")
    build_zoo(cache, "tiny", seed=0)
    return cache


def test_tiny_zoo_records(tiny_zoo):
    from gmcurv.gradmetanet.zoo import iter_zoo, read_plan, zoo_model

    plan = read_plan(tiny_zoo)
    assert {g["split"] for g in plan["groups"]} == {"train", "val", "test-dataset", "test-arch"}
    models = list(iter_zoo(tiny_zoo, ("train",)))
    assert len(models) == 2 * len(plan["groups"][0]["steps"])
    zm = models[-1]
    assert zm.scalars["n"] == 112 and zm.scalars["b"] == 28  # iris: 75 % train, b = N/4
    assert zm.scalars["hessian_top_converged"] and zm.scalars["hessian_trace"] > 0
    # the stored draw is the captured gradients of those examples at the stored weights
    data = load_data(tiny_zoo / "data" / "iris.safetensors")
    x = next(data.batches(1000, "cpu", torch.float64))
    model = zoo_model(zm, 4, 3)
    d = zm.draws[0]
    batch = Batch(x.inputs[d.index], x.targets[d.index], 0)
    ref = _encode_gs(model, batch)
    for l in range(ref.depth):
        torch.testing.assert_close(d.gs.delta[l], ref.delta[l], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(d.gs.x[l], ref.x[l], rtol=1e-5, atol=1e-6)
    # targets: the Fisher trace is the sum of the stored diagonal
    total = sum(float(v.sum()) for k, v in zm.targets.items() if k.startswith("fisher_diag."))
    assert total == pytest.approx(zm.scalars["fisher_trace"], rel=1e-6)


def _encode_gs(model, batch):
    obj = Objective.build(model, "cross_entropy")
    dg = Capturer(obj, "empirical")(batch)
    return gradient_set(dg, check_supported(obj), obj.params)


def test_training_two_steps_is_seeded_and_resumable(tiny_zoo, tmp_path):
    from gmcurv.gradmetanet.train import TrainConfig, load_items, train_head

    train = load_items(tiny_zoo, ["train"])
    val = load_items(tiny_zoo, ["val"])
    cfg = TrainConfig(epochs=2, models_per_step=2, warmup_steps=1, checkpoint_every=1)
    events = []
    a = train_head(train, val, SMALL, cfg, progress=events.append, max_steps=2)
    b = train_head(train, val, SMALL, cfg, max_steps=2)
    assert a.steps == 2 and [e["step"] for e in events] == [1, 2]
    for (k, v), w in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    ck = tmp_path / "ck.safetensors"
    first = train_head(train, val, SMALL, cfg, checkpoint=ck, max_steps=2)
    assert ck.exists() and first.steps == 2
    full = train_head(train, val, SMALL, cfg, checkpoint=ck)  # resumes at step 2
    straight = train_head(train, val, SMALL, cfg)
    assert full.steps == straight.steps == 4
    for v, w in zip(
        full.model.state_dict().values(), straight.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-6)
    assert full.history and "head.fisher_diag.nmae" in full.history[0]


def test_saved_head_round_trip_and_evaluation(tiny_zoo, tmp_path):
    from gmcurv.gradmetanet.evaluate import evaluate_head
    from gmcurv.gradmetanet.head import head_metadata
    from gmcurv.gradmetanet.pretrained import load_head, save_head

    net = _random_head().float()
    meta = head_metadata(SMALL, {"commands": []}, {"activations": ["tanh"], "max_layers": 3})
    path = tmp_path / "h.safetensors"
    save_head(path, net, meta)
    head = load_head(path)
    for v, w in zip(head.model.state_dict().values(), net.state_dict().values(), strict=True):
        assert torch.equal(v, w)
    ev = evaluate_head(head, tiny_zoo)
    assert ev["n_models"] == 4
    s = ev["all"]["fisher_diag.nmae"]
    assert s["n_draws"] == 2 * 2 + 2 * 4 and math.isfinite(s["head"]) and math.isfinite(s["plug"])
    with pytest.raises(UnsupportedError, match="gelu"):
        head.check(mlp_chain(_mlp(act="gelu")))
    with pytest.raises(UnsupportedError, match="linear layers"):
        head.check(mlp_chain(_mlp(widths=(3, 3, 3), act="tanh")))


# ------------------------------------------------------------------------------ shipped head
def test_shipped_head_loads_and_matches_stored_outputs():
    """Regression guard: the shipped head (v1.2: v1 + the layer blend) on a fixed input
    (values stored at release; the OBS channel and the scalars are v1's)."""
    from gmcurv.gradmetanet.pretrained import CARD_FILE, HEAD_FILE, load_head

    head = load_head()
    assert head.path == HEAD_FILE and CARD_FILE.exists()
    meta = head.meta
    assert meta["supported"]["activations"] == ["gelu", "relu", "tanh"]
    assert meta["version"] == "1.2" and meta["config"]["blend"] == 1
    assert meta["targets"]["scalars"] == ["fisher_trace", "hessian_trace", "hessian_top"]
    assert meta["metrics"]["heldout"]["test-dataset"]["fisher_diag.nmae"]["n_draws"] > 0
    assert any(c.startswith("gmcurv head train") for c in meta["training"]["commands"])
    inp = _encode(_mlp(seed=21), _batch(n=64, seed=22), torch.float32)
    with torch.no_grad():
        out = head.model(inp)
        pred = decode(inp, out)
    close = {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(
        out.scalars,
        torch.tensor([-0.04005422070622444, 0.040878117084503174, -0.2650793194770813]),
        **close,
    )
    torch.testing.assert_close(
        out.w[0][:2, :3],
        torch.tensor(
            [
                [
                    [0.6152321696281433, 0.13096633553504944],
                    [0.38863009214401245, 0.21703936159610748],
                    [0.42655301094055176, 0.22040918469429016],
                ],
                [
                    [0.20202121138572693, 0.2940037250518799],
                    [0.19676341116428375, 0.36216235160827637],
                    [0.15545330941677094, 0.3392524719238281],
                ],
            ]
        ),
        **close,
    )
    torch.testing.assert_close(
        out.b[1],
        torch.tensor(
            [
                [0.0917927473783493, 0.2295491099357605],
                [-0.07372751086950302, 0.4871816039085388],
                [0.08735700696706772, 0.10457785427570343],
                [-0.29023677110671997, 0.16191677749156952],
            ]
        ),
        **close,
    )
    torch.testing.assert_close(
        pred.scalars,
        torch.tensor(
            [14.084173352160693, 15.27143435133876, 2.9629953304337016], dtype=torch.float64
        ),
        rtol=1e-4,
        atol=0,
    )
    assert float(pred.param[2][..., 0].sum()) == pytest.approx(2.021054176883032, rel=1e-4)


def test_predict_curvature_on_an_mlp(tmp_path):
    from gmcurv.gradmetanet.predict import predict_curvature
    from gmcurv.gradmetanet.pretrained import load_head

    head = load_head()
    data = _data_file(tmp_path, n=300, d=5)
    obj = Objective.build(_mlp(seed=23), "cross_entropy")
    lc = predict_curvature(obj, data, b=128, seed=0, head=head)
    assert lc.b == 128 and lc.n == 300 and len(lc.index) == 128
    assert lc.fisher_trace.n_samples == 128 and "learned" in lc.fisher_trace.method
    ft = lc.fisher_trace
    assert ft.stderr is None and (ft.interval is not None or ft.method.endswith("uncalibrated"))
    assert lc.hessian_top.value > 0
    assert set(lc.fisher_diag) == set(obj.params)
    for k, v in lc.fisher_diag.items():
        assert v.shape == obj.params[k].shape and bool((v > 0).all())
    again = predict_curvature(obj, data, b=128, seed=0, head=head)
    assert again.fisher_trace.value == lc.fisher_trace.value  # seeded
    other = predict_curvature(obj, data, b=128, seed=1, head=head)
    assert not torch.equal(other.index, lc.index)
    with pytest.raises(UnsupportedError, match="method exact"):
        predict_curvature(Objective.build(seeded(TinyConv), "cross_entropy"), data, head=head)
