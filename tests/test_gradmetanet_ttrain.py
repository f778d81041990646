"""Head v2's training: noise-aware trace loss, seeded ensembles (averaged outputs) that keep
the transformer symmetries."""

from __future__ import annotations

import pytest
import torch

from gmcurv.gradmetanet import ttrain, tzoo
from gmcurv.gradmetanet.tlayers import HeadV2, HeadV2Config
from gmcurv.gradmetanet.tlm import make_task
from tests.test_gradmetanet_tzoo import tiny_zoo
from tests.test_gradmetanet_v2 import B, T, V, _model, _perms, _permuted, _run


def _items():
    model = _model()
    ids, _ = make_task("count", B, T, seed=0)
    inp, _, _ = _run(model, ids % V, "mc")
    mk = lambda tr, se, top: ttrain.Item(  # noqa: E731
        "g", "train", "tiny", "count", 0, 0, 100, inp, tr, se, top
    )
    return inp, [mk(2.0 * inp.plug_trace, 0.0, 3.0 * inp.seq_top), mk(0.5, 50.0, inp.seq_top)]


def test_trace_scale_discounts_unpinned_truths():
    inp, (pinned, noisy) = _items()
    assert ttrain.trace_scale(pinned, 2.0) == pytest.approx(2.1 * inp.plug_trace)
    assert ttrain.trace_scale(noisy, 2.0) == pytest.approx(0.5 + 100.0 + 0.1 * inp.plug_trace)
    assert ttrain.trace_scale(noisy, 0.0) < ttrain.trace_scale(noisy, 2.0)


def test_ensemble_averages_members_and_is_invariant():
    heads = []
    for s in (3, 5):
        h = HeadV2(seed=s).double()
        g = torch.Generator().manual_seed(s)
        with torch.no_grad():
            for p in h.rho[-1].parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        heads.append(h)
    ens = ttrain.HeadV2Ensemble(heads)
    model = _model()
    ids, _ = make_task("count", B, T, seed=0)
    ids = ids % V
    inp, _, _ = _run(model, ids)
    with torch.no_grad():
        r = [h(inp).r_trace for h in heads]
        out = ens(inp)
    torch.testing.assert_close(out.r_trace, (r[0] + r[1]) / 2, rtol=1e-12, atol=0)
    p = _perms("composite", torch.Generator().manual_seed(7))
    inp2, _, _ = _run(_permuted(model, p), ids[p["seq"]])
    tr, top = ttrain.predict(ens, inp)
    tr2, top2 = ttrain.predict(ens, inp2)
    assert tr2 == pytest.approx(tr, rel=1e-8) and top2 == pytest.approx(top, rel=1e-8)


def test_train_ensemble_is_seeded_and_fits_the_pinned_item():
    _, items = _items()
    cfg = ttrain.TrainV2Config(epochs=25, lr=1e-2)
    hc = HeadV2Config(channels=4, layer_hidden=8, blocks=1, hidden=8)
    a = ttrain.train_ensemble(items, cfg, hc, members=2)
    b = ttrain.train_ensemble(items, cfg, hc, members=2)
    assert len(a.heads) == 2
    pa, pb = ttrain.predict(a, items[0].inp), ttrain.predict(b, items[0].inp)
    assert pa == pb
    fresh = ttrain.predict(HeadV2(hc), items[0].inp)  # a fresh head is the plug-in
    assert abs(pa[0] - items[0].trace) < abs(fresh[0] - items[0].trace)


class _Fixed(torch.nn.Module):
    """A stand-in head whose outputs are fixed ``r`` values."""

    def __init__(self, r_tr: float, r_top: float):
        super().__init__()
        self.r = (torch.tensor(r_tr), torch.tensor(r_top))

    def forward(self, inp):
        return type("Out", (), {"r_trace": self.r[0], "r_top": self.r[1]})()


def test_fit_shrink_keeps_corrections_that_carry_over_and_drops_those_that_do_not():
    import math

    _, (pinned, noisy) = _items()  # pinned: tr H = 2 plug, λ = 3 seq_top
    right = _Fixed(1.0, math.log(3.0))  # exactly the missing factors
    assert ttrain.fit_shrink([(right, [pinned])]) == (1.0, 1.0)
    assert ttrain.fit_shrink([(right, [pinned, noisy])])[0] == 1.0  # unpinned truth: not used
    wrong = _Fixed(-0.9, -1.0)  # pushes away from the truth
    assert ttrain.fit_shrink([(wrong, [pinned])]) == (0.0, 0.0)
    half = _Fixed(2.0, 2 * math.log(3.0))  # twice the needed correction
    assert ttrain.fit_shrink([(half, [pinned])]) == (0.5, 0.5)
    ens = ttrain.HeadV2Ensemble([HeadV2(seed=0)], shrink=(0.5, 0.0))
    assert ens.shrink.tolist() == [0.5, 0.0]


def test_zoo_sets_walk_the_held_out_sets_once(tmp_path, monkeypatch):
    """The shared walk of the benchmarks (`zoo_sets`): only the groups ``keep`` accepts,
    every (snapshot, draw) once, the stored draw's sequences, a loadable data file; the
    cached training items come from the same walk."""
    tiny_zoo(monkeypatch, n_truth=8)
    for gid, split in (("a", "train"), ("b", "test-arch")):
        spec = tzoo.LMGroupSpec(gid, "count", 1, 8, 2, 5, 1e-3, (0, 2), split, 2)
        tzoo.build_group(spec, tmp_path)
    sets = list(ttrain.zoo_sets(tmp_path, keep=ttrain.held_out))
    assert [(s.spec.gid, s.meta["step"], s.draw) for s in sets] == [
        ("b", 0, 0), ("b", 0, 1), ("b", 2, 0), ("b", 2, 1)
    ]  # fmt: skip
    _, _, tensors = ttrain.read_group(tmp_path / "groups" / "b.safetensors")
    ids = ttrain.truth_ids(sets[3].spec, sets[3].meta["n"])
    assert torch.equal(sets[3].batch.inputs, ids[tensors["s1.d1.index"]])
    assert len(list(ttrain.zoo_sets(tmp_path, draws=1))) == 4
    items = ttrain.load_items(tmp_path)
    assert [(it.gid, it.step, it.draw) for it in items if it.gid == "b"] == [
        (s.spec.gid, s.meta["step"], s.draw) for s in sets
    ]


def test_zoo_set_data_is_the_batch(tmp_path, monkeypatch):
    tiny_zoo(monkeypatch)
    spec = tzoo.LMGroupSpec("h", "markov", 1, 8, 2, 5, 1e-3, (0,), "test-hf", 1, "gpt2")
    tzoo.build_group(spec, tmp_path)
    sets = 0
    for zs in ttrain.zoo_sets(tmp_path):  # the scratch directory lives while iterating
        data = zs.data()
        (batch,) = data.batches(3)
        assert data.n == 3 and torch.equal(batch.inputs, zs.batch.inputs)
        sets += 1
    assert sets == 1
