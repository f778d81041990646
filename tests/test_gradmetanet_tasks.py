"""Head v1.1: the ``tasks`` zoo (procedural task families, held-out tasks), the winsorised
shrinkage baseline, fine-tuning from a head, and the shrinkage rows of the evaluation."""

from __future__ import annotations

import math

import pytest
import torch

from gmcurv.batch import Batch
from gmcurv.capture import Capturer
from gmcurv.gradmetanet.baselines import winsorised_diagonal
from gmcurv.gradmetanet.features import check_supported, gradient_set, plug_in
from gmcurv.gradmetanet.model import GradMetaNet, HeadConfig
from gmcurv.gradmetanet.zoo import (
    HELD_OUT_ARCHS,
    HELD_OUT_TASKS,
    TASK_FAMILIES,
    GroupSpec,
    build_mlp,
    zoo_plan,
)
from gmcurv.objective import Objective
from tests.oracles import per_example_grads

SMALL = HeadConfig(
    entry_channels=6, n_interaction=2, neuron_channels=8, n_deepsets=2, prod_channels=3, hidden=8
)


def _set(n=40, seed=0):
    model = build_mlp(5, (6, 4), 3, "tanh").double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    batch = Batch(x, torch.randint(0, 3, (n,), generator=g), 0)
    obj = Objective.build(model, "cross_entropy")
    dg = Capturer(obj, "empirical")(batch)
    chain = check_supported(obj)
    return obj, batch, chain, gradient_set(dg, chain, obj.params), plug_in(dg, chain)


def test_winsorised_diagonal_against_per_example_oracle():
    obj, batch, chain, gs, pl = _set()
    J = per_example_grads(obj, batch)  # [N, P]
    # quantile 1: nothing is capped, the plug-in diagonal
    dw, db = winsorised_diagonal(gs, 1.0)
    for l in range(gs.depth):
        torch.testing.assert_close(dw[l], pl.diag_w[l], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(db[l], pl.diag_b[l], rtol=1e-10, atol=1e-12)
    # quantile q: weights min(1, c / ||g_n||^2) with c the q-quantile of ||g_n||^2
    sq = J.pow(2).sum(1)
    c = torch.quantile(sq, 0.8)
    w = torch.clamp(c / sq, max=1.0)
    ref = obj.space.unflatten((w[:, None] * J.pow(2)).mean(0))
    dw, db = winsorised_diagonal(gs, 0.8)
    for l in range(gs.depth):
        torch.testing.assert_close(dw[l], ref[chain.weights[l]], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(db[l], ref[chain.biases[l]], rtol=1e-10, atol=1e-12)
    assert all(bool((a <= b + 1e-15).all()) for a, b in zip(dw, pl.diag_w, strict=True))


def test_task_families_are_seeded_and_distinct():
    pytest.importorskip("sklearn")
    from gmcurv.gradmetanet.zoo import make_dataset

    for fam in TASK_FAMILIES:
        a = make_dataset(f"{fam}-3")
        b = make_dataset(f"{fam}-3")
        c = make_dataset(f"{fam}-4")
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
        assert a[0].shape[0] == 1024 and a[2].shape[0] == 512 and a[1].dtype == torch.long
        assert int(a[1].min()) >= 0 and int(a[1].max()) >= 1
        assert a[0].shape != c[0].shape or not torch.equal(a[0], c[0])
    for name in HELD_OUT_TASKS:
        x, y, _, _ = make_dataset(name)
        assert x.shape == (1024, 10) and int(y.max()) + 1 in (2, 3)
    from gmcurv.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown zoo dataset"):
        make_dataset("gmm-x")


def test_tasks_plan_keeps_held_out_tasks_out_of_training():
    plan = zoo_plan("tasks", 0)
    by = {s: [g for g in plan if g.split == s] for s in ("train", "val", "calib", "test-task")}
    assert {g.dataset for g in by["test-task"]} == set(HELD_OUT_TASKS)
    used = {g.dataset for s in ("train", "val", "calib") for g in by[s]}
    assert not used & set(HELD_OUT_TASKS) and "digits" not in used
    # calib and val are task instances never trained on; half of calib on unseen architectures
    train_sets = {g.dataset for g in by["train"]}
    assert not ({g.dataset for g in by["calib"] + by["val"]} & train_sets)
    assert sum(g.widths in HELD_OUT_ARCHS for g in by["calib"]) == len(by["calib"]) // 2
    assert all(g.fused for g in plan) and len({g.gid for g in plan}) == len(plan)
    old = plan[0].to_dict()
    del old["fused"]  # plans written before the field existed still load
    assert GroupSpec.from_dict(old).fused is False


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    from gmcurv.gradmetanet.zoo import build_zoo

    cache = tmp_path_factory.mktemp("zoo")
    build_zoo(cache, "tiny", seed=0)
    return cache


def test_fine_tuning_starts_from_the_given_head_and_never_ends_worse(tiny_zoo):
    from gmcurv.gradmetanet.train import TrainConfig, load_items, train_head

    train = load_items(tiny_zoo, ["train"])
    val = load_items(tiny_zoo, ["val"])
    start = GradMetaNet(SMALL, seed=5)
    with torch.no_grad():
        for p in start.parameters():
            p.add_(0.05)
    init = {k: v.clone() for k, v in start.state_dict().items()}
    cfg = TrainConfig(epochs=1, models_per_step=2, warmup_steps=1, lr=0.0)
    res = train_head(train, val, SMALL, cfg, init_state=init)
    assert res.history[0]["epoch"] == -1
    for k, v in res.model.state_dict().items():  # lr 0: the starting weights come back
        torch.testing.assert_close(v, init[k])
    cfg = TrainConfig(epochs=1, models_per_step=2, warmup_steps=1, lr=5e-2)
    res = train_head(train, val, SMALL, cfg, init_state=init)
    chosen = next(h for h in res.history if h["epoch"] == res.best_epoch)
    assert chosen["head.fisher_diag.nmae"] <= res.history[0]["head.fisher_diag.nmae"]


def test_evaluation_rows_carry_the_shrinkage_baseline(tiny_zoo):
    from gmcurv.gradmetanet.evaluate import evaluate_models, summarise
    from gmcurv.gradmetanet.head import LoadedHead
    from gmcurv.gradmetanet.zoo import iter_zoo

    head = LoadedHead(GradMetaNet(SMALL).eval(), {}, tiny_zoo / "none")
    rows = evaluate_models(head, list(iter_zoo(tiny_zoo, ("val",))))
    assert rows and all(
        len(r.shrink["fisher_diag.nmae"]) == len(r.head["fisher_diag.nmae"]) for r in rows
    )
    s = summarise(rows)["fisher_diag.nmae"]
    assert math.isfinite(s["shrink"]) and 0.0 <= s["head_beats_shrink_share"] <= 1.0
    # a fresh head is the plug-in: no change against it
    assert s["change"] == pytest.approx(0.0, abs=1e-6)


def test_entry_shrinkage_features_against_oracle():
    from gmcurv.gradmetanet.features import LOG_EPS, LOG_SCALE, encode, entry_shrinkage

    obj, batch, chain, gs, pl = _set(n=30, seed=3)
    J = per_example_grads(obj, batch)
    rows = obj.space.unflatten(J.pow(2))  # g_n^2 per parameter, [N, ...]
    l = 1
    g2 = rows[chain.weights[l]]  # [N, O, I]
    p = g2.mean(0)
    var = (g2.pow(2).mean(0) - p.pow(2)) / (len(J) - 1)
    kfac = gs.delta[l].pow(2).mean(0)[:, None] * gs.x[l].pow(2).mean(0)[None, :]
    rel, shrunk = entry_shrinkage(p, gs.delta[l].pow(2), gs.x[l].pow(2), kfac)
    torch.testing.assert_close(rel, 0.5 * LOG_SCALE * torch.log(var / p.pow(2) + LOG_EPS))
    lam = ((p - kfac).pow(2) - var).clamp_min(0) / ((p - kfac).pow(2) - var).clamp_min(0).add(var)
    torch.testing.assert_close(shrunk, kfac + lam * (p - kfac))
    inp = encode(gs, pl, torch.float64)
    assert inp.edges[l].shape[-1] == 7 and inp.bias_edges[l].shape[-1] == 5  # + model Fisher


def test_widened_head_computes_what_the_v1_head_does():
    from gmcurv.gradmetanet.features import encode
    from gmcurv.gradmetanet.model import widen_edges

    _, _, _, gs, pl = _set(n=24, seed=4)
    inp = encode(gs, pl, torch.float64)
    v1 = GradMetaNet(SMALL).double()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in v1.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    wide_cfg = HeadConfig(**{**SMALL.to_dict(), "edge_extra": 2})
    wide = GradMetaNet(wide_cfg).double()
    wide.load_state_dict(widen_edges(v1.state_dict(), 2))
    a, b = v1(inp), wide(inp)
    for x, y in zip((*a.w, a.scalars), (*b.w, b.scalars), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    assert widen_edges(wide.state_dict(), 2)["prod.edge.weight"].shape[1] == 6  # idempotent


def _row(name, group, logratio, n_params=100):
    from gmcurv.gradmetanet.evaluate import DrawErrors

    return DrawErrors(
        name, "test-task", group, (4,), "tanh", 0, 1.0, {}, {},
        {"fisher_trace": [logratio]}, n_params,
    )  # fmt: skip


def test_leave_one_group_out_coverage_uses_only_other_groups():
    from gmcurv.gradmetanet.evaluate import leave_one_group_out

    # group "wide" errs 10x more than the others: intervals fitted without it miss it
    rows = [_row(f"a{i}", "a", (i - 50) / 500) for i in range(101)]
    rows += [_row(f"b{i}", "b", (i - 50) / 500) for i in range(101)]
    rows += [_row(f"w{i}", "wide", (i - 50) / 50) for i in range(101)]
    c = leave_one_group_out(rows, lambda r: r.dataset, "src")
    cov = {g: c.coverage[g]["fisher_trace"]["coverage"] for g in ("a", "b", "wide")}
    assert cov["wide"] < 0.2  # fitted on a, b only: far too narrow for "wide"
    assert cov["a"] > 0.95 and cov["b"] > 0.95  # fitted with "wide" inside: too wide
    pooled = c.coverage["all"]["fisher_trace"]
    assert pooled["n"] == 303
    assert pooled["coverage"] == pytest.approx(sum(cov.values()) / 3, abs=1e-12)
    # the shipped fit uses every row: 10-90 % quantiles of all log-ratios
    from gmcurv.gradmetanet.calibration import quantile

    values = [r.logratio["fisher_trace"][0] for r in rows]
    expected = (quantile(values, 0.1), quantile(values, 0.9))
    assert c.pooled["fisher_trace"] == pytest.approx(expected, abs=1e-12)
    assert c.source == "src"


def test_card_states_the_mlp_target_per_unseen_task():
    from gmcurv.gradmetanet.card import measured_section, mlp_target

    def task(change, n=40):
        f = {"head": 0.2, "plug": 0.3, "change": change, "head_better_share": 0.9,
             "n_draws": n, "shrink": 0.28, "shrink_change": -0.05,
             "head_beats_shrink_share": 0.8}  # fmt: skip
        return {"fisher_diag": f, "obs_curv": {}, "n_models": n // 4}

    tasks = {"tasks": {"spiral10": task(-0.196), "digits": task(-0.314)}, "date": "d"}
    name, met, text = mlp_target(tasks)
    assert not met and "spiral10 19.6 %" in text and "digits 31.4 %" in text
    assert mlp_target({"tasks": {"digits": task(-0.3), "hastie10": task(-0.26)}})[1]
    assert mlp_target(None) == (name, False, "not measured")
    md = measured_section({"metrics": {"tasks": tasks}})
    assert "**missed**" in md and "| -19.6 % |" in md and "| -5.0 % |" in md
