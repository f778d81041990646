"""Head v2's transformer zoo: tasks, the tiny causal LM, one resumable group with targets."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from gmcurv.gradmetanet import tzoo
from gmcurv.gradmetanet.tlm import TASKS, TinyLM, make_task


@pytest.mark.parametrize("task", TASKS)
def test_tasks_are_seeded_token_sequences(task):
    a, V = make_task(task, 5, 12, seed=3)
    b, _ = make_task(task, 5, 12, seed=3)
    assert a.shape == (5, 12) and a.dtype == torch.long and torch.equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) < V


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
    monkeypatch.setattr(tzoo, "MAX_HVPS", 30)
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
