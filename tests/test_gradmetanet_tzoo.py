"""Head v2's transformer zoo: tasks, the tiny causal LM, one resumable group with targets."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from gmcurv.gradmetanet import tzoo
from gmcurv.gradmetanet.tlm import TASKS, TinyLM, make_task


@pytest.mark.parametrize("task", tzoo.ZOO_TASKS)
def test_tasks_are_seeded_token_sequences(task):
    a, V = tzoo.zoo_task(task, 5, 12, seed=3)
    b, _ = tzoo.zoo_task(task, 5, 12, seed=3)
    assert a.shape == (5, 12) and a.dtype == torch.long and torch.equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) < V
    if task in TASKS:
        assert torch.equal(a, make_task(task, 5, 12, seed=3)[0])


def test_zoo_tasks_have_their_structure():
    ids, _ = tzoo.zoo_task("reverse", 3, 9, seed=0)  # 4 digits, separator, reversed
    assert torch.equal(ids[:, 5:9], ids[:, :4].flip(1)) and bool((ids[:, 4] == 0).all())
    ids, _ = tzoo.zoo_task("sort", 3, 9, seed=0)
    assert torch.equal(ids[:, 5:9], ids[:, :4].sort(1).values)
    ids, V = tzoo.zoo_task("modsum", 2, 8, seed=0)
    a, s = ids[:, 0::2], ids[:, 1::2]
    assert torch.equal(s, a.cumsum(1) % V)
    ids, _ = tzoo.zoo_task("dyck", 20, 16, seed=0)
    for row in ids.tolist():  # brackets nest: every closer matches the last open kind
        stack = []
        for tok in row:
            if tok in (1, 3):
                stack.append(tok)
            elif tok in (2, 4):
                assert stack and stack.pop() == tok - 1
    with pytest.raises(ValueError, match="unknown task"):
        tzoo.zoo_task("nope", 1, 4, seed=0)


def test_plan_keeps_the_built_groups_and_shards_cover_it():
    plan = tzoo.tzoo_plan()
    assert plan[0].gid == "train-markov-tiny-L1d32h1-0000" and plan[0].seed == 1654615998
    assert len({s.gid for s in plan}) == len(plan)
    train_tasks = {s.task for s in plan if s.split == "train"}
    assert tzoo.HELD_OUT_TASK not in train_tasks and len(train_tasks) >= 6
    train_widths = {s.width for s in plan if s.split == "train"}
    arch = [s for s in plan if s.split == "test-arch"]
    assert all(s.width not in train_widths or s.layers == 3 for s in arch)
    assert all(s.width % s.heads == 0 for s in plan)


def test_tiny_lm_is_causal():
    torch.manual_seed(0)
    m = TinyLM(11, 8, 2, 2, 6).double()
    ids = torch.randint(0, 11, (2, 6))
    out = m(ids)
    ids2 = ids.clone()
    ids2[:, 4:] = (ids2[:, 4:] + 1) % 11  # change the future
    torch.testing.assert_close(m(ids2)[:, :4], out[:, :4])


def test_one_group_resumes_and_has_exact_targets(tmp_path, monkeypatch):
    monkeypatch.setattr(tzoo, "N_TRUTH", 12)
    monkeypatch.setattr(tzoo, "SET_SIZE", 4)
    monkeypatch.setattr(tzoo, "HUTCHPP_HVPS", 30)
    monkeypatch.setattr(tzoo, "T", 6)
    spec = tzoo.LMGroupSpec("g", "count", 1, 8, 2, 5, 1e-3, (0, 3), "train", 1)
    monkeypatch.setattr(tzoo, "tzoo_plan", lambda seed=0: [spec])
    tzoo.build_tzoo(tmp_path)
    path = tmp_path / "groups" / "g.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["snapshots"])
        diag = {k: f.get_tensor(k) for k in f.keys() if k.startswith("s1.t.fisher_diag.")}  # noqa: SIM118
        keys = list(f.keys())
    assert [m["step"] for m in meta] == [0, 3]
    s = meta[1]
    assert s["fisher_trace"] == pytest.approx(float(sum(v.sum() for v in diag.values())), rel=1e-9)
    assert s["hessian_trace"]["hvps"] <= 30 and set(s["seconds"]) >= {"fisher", "hessian_top"}
    assert any(k.startswith("s1.d0.delta.blocks.0.fc") for k in keys)
    mtime = path.stat().st_mtime_ns
    tzoo.build_tzoo(tmp_path)  # resumes: nothing left to do
    assert path.stat().st_mtime_ns == mtime
    cost = json.loads((tmp_path / "cost.jsonl").read_text().splitlines()[0])
    assert cost["gid"] == "g" and cost["cpu_s"] > 0


def test_shards_split_the_plan(tmp_path, monkeypatch):
    specs = [
        tzoo.LMGroupSpec(f"g{i}", "count", 1, 8, 2, i, 1e-3, (0,), "train", 1) for i in range(5)
    ]
    monkeypatch.setattr(tzoo, "tzoo_plan", lambda seed=0: specs)
    built = []
    monkeypatch.setattr(tzoo, "build_group", lambda s, d: built.append(s.gid))
    tzoo.build_tzoo(tmp_path, shard=(1, 2))
    assert built == ["g1", "g3"]


def test_zoo_targets_match_a_dense_double_backward_hessian(tmp_path, monkeypatch):
    """The zoo's Hutch++ trace (budget >= 3P: exact) and Lanczos λ_max against ``eigh`` of
    the dense Hessian of the mean next-token loss by double backward (float64)."""
    from safetensors.torch import save_file
    from torch.func import functional_call

    from gmcurv.gradmetanet.targets import top_hessian_eigenvalue
    from gmcurv.gradmetanet.tlm import init_lm
    from gmcurv.io.data import load_data
    from gmcurv.objective import Objective
    from gmcurv.operator import CurvatureOperator

    m = TinyLM(5, 4, 1, 2, 5).double()
    init_lm(m, torch.Generator().manual_seed(0))
    with torch.no_grad():  # away from init: a Hessian with a clear top eigenvalue
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    ids, _ = make_task("count", 6, 5, seed=2)
    ids = ids % 5
    save_file({"inputs": ids}, str(tmp_path / "d.safetensors"))
    obj = Objective.build(m, "next_token")
    names = list(obj.params)
    shapes = [obj.params[k].shape for k in names]
    flat = torch.cat([obj.params[k].detach().reshape(-1) for k in names])

    def loss(v):
        parts = dict(zip(names, torch.split(v, [s.numel() for s in shapes]), strict=True))
        ps = {k: t.reshape(s) for (k, t), s in zip(parts.items(), shapes, strict=True)}
        lg = functional_call(m, ps, (ids,))
        ce = torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, 5), ids[:, 1:].reshape(-1))
        return ce  # mean over tokens of every sequence = mean over sequences of their means

    x = flat.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(x), x, create_graph=True)
    H = torch.stack([torch.autograd.grad(g[i], x, retain_graph=True)[0] for i in range(len(x))])
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-10)  # (jacfwd(jacrev) is not, here)
    op = CurvatureOperator(obj, load_data(tmp_path / "d.safetensors"), 4, kind="hessian")
    assert op.size == flat.numel()
    monkeypatch.setattr(tzoo, "HUTCHPP_HVPS", 3 * op.size)
    tr = tzoo.hessian_trace_to(op)
    assert tr["value"] == pytest.approx(float(H.trace()), rel=1e-8, abs=1e-10)
    top = top_hessian_eigenvalue(obj, load_data(tmp_path / "d.safetensors"), 4, tol=1e-8)
    assert float(top.values[0]) == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-6)


def test_plan_covers_every_split_early():
    plan = tzoo.tzoo_plan()
    first = {s.split for s in plan[:10]}
    assert first == set(tzoo.SPLITS)
    assert {s.family for s in plan} == {"tiny", "gpt2", "llama"}
    assert all(s.task == tzoo.HELD_OUT_TASK for s in plan if s.split == "test-task")


def tiny_zoo(monkeypatch, n_truth: int = 6) -> None:
    """Zoo constants small enough for a test (a group builds in seconds)."""
    for k, v in {
        "N_TRUTH": n_truth,
        "SET_SIZE": 3,
        "HUTCHPP_HVPS": 8,
        "T": 6,
        "LANCZOS_ITERS": 4,
    }.items():
        monkeypatch.setattr(tzoo, k, v)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_transformers_groups_go_through_save_pretrained(tmp_path, monkeypatch, family):
    tiny_zoo(monkeypatch)
    spec = tzoo.LMGroupSpec("h", "markov", 1, 8, 2, 5, 1e-3, (0, 2), "test-hf", 1, family)
    path = tzoo.build_group(spec, tmp_path)
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["snapshots"])
        keys = list(f.keys())
    assert len(meta) == 2 and meta[1]["fisher_trace"] > 0
    layer = "c_attn" if family == "gpt2" else "q_proj"
    assert any(k.startswith("s1.d0.delta.") and layer in k for k in keys)
    assert (tmp_path / "cost.jsonl").read_text().count('"gid": "h"') == 1
