"""Several checkpoints in one run: argument resolution, order, shared data loading, the
JSON schema, the plot and the table at 80 columns."""

from __future__ import annotations

import json
from io import StringIO

import jsonschema
import matplotlib.image
import pytest
from helpers import write_data, write_mlp
from rich.console import Console

from gmcurv.cli.app import app
from gmcurv.errors import ConfigError
from gmcurv.io.checkpoint import gmcurv_metadata, save_checkpoint
from gmcurv.io.series import resolve_series
from gmcurv.results import DataInfo, Report, report_schema

F64 = ["--dtype", "float64", "--device", "cpu", "-k", "1"]


def _run(runner, *args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def ckpts(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for i, step in enumerate((1000, 20, 300)):  # lexicographic order is not step order
        write_mlp(folder / f"step_{step}.safetensors", sizes=(5, 6, 3), seed=i)
    data = write_data(tmp_path / "data.safetensors", n=16, d=5)
    return folder, data


def test_series_order_by_step_from_names_and_metadata(tmp_path, ckpts):
    folder, _ = ckpts
    s = resolve_series([folder])
    assert [c.step for c in s.checkpoints] == [20, 300, 1000] and s.x == "step"
    # an explicit (shell-glob) list is sorted by step too
    s = resolve_series(sorted(folder.glob("*.safetensors")))
    assert [c.path.name for c in s.checkpoints] == [
        "step_20.safetensors", "step_300.safetensors", "step_1000.safetensors"
    ]  # fmt: skip
    # metadata beats the name
    meta = {**gmcurv_metadata("mlp:tanh", "cross_entropy"), "gmcurv.step": "7"}
    import torch

    state = {"net.0.weight": torch.zeros(6, 5), "net.0.bias": torch.zeros(6),
             "net.2.weight": torch.zeros(3, 6), "net.2.bias": torch.zeros(3)}  # fmt: skip
    save_checkpoint(tmp_path / "late_99999.safetensors", state, meta)
    s = resolve_series([tmp_path / "late_99999.safetensors", folder / "step_20.safetensors"])
    assert [(c.step, c.step_source) for c in s.checkpoints] == [(7, "metadata"), (20, "name")]


def test_series_without_steps_keeps_the_given_order(tmp_path):
    a = write_mlp(tmp_path / "beta.safetensors", sizes=(5, 6, 3))
    b = write_mlp(tmp_path / "alpha.safetensors", sizes=(5, 6, 3))
    s = resolve_series([a, b])
    assert s.x == "index" and [c.path for c in s.checkpoints] == [a, b]


def test_trainer_directories(tmp_path):
    root = tmp_path / "run"
    for step in (500, 50):
        d = root / f"checkpoint-{step}"
        d.mkdir(parents=True)
        write_mlp(d / "model.safetensors", sizes=(5, 6, 3))
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    s = resolve_series([root])
    assert [c.step for c in s.checkpoints] == [50, 500]
    assert {c.step_source for c in s.checkpoints} == {"trainer_state.json"}
    # one model directory (model.safetensors inside) is one model, never a series
    assert len(resolve_series([root / "checkpoint-50"]).checkpoints) == 1


def test_ambiguous_and_misplaced_arguments(tmp_path, ckpts):
    folder, data = ckpts
    (folder / "checkpoint-1").mkdir()
    write_mlp(folder / "checkpoint-1" / "model.safetensors", sizes=(5, 6, 3))
    with pytest.raises(ConfigError, match="ambiguous"):
        resolve_series([folder])
    shards = write_data(tmp_path / "shards", n=16, d=5, shards=2)
    with pytest.raises(ConfigError, match="holds data shards"):
        resolve_series([shards])
    with pytest.raises(ConfigError, match="given twice"):
        resolve_series([data.parent / "ckpts" / "step_20.safetensors"] * 2)
    dup = tmp_path / "dup"
    dup.mkdir()
    write_mlp(dup / "a_5.safetensors", sizes=(5, 6, 3))
    write_mlp(dup / "b_5.safetensors", sizes=(5, 6, 3))
    with pytest.raises(ConfigError, match="step 5"):
        resolve_series([dup])


def test_checkpoint_in_the_data_position_is_refused(runner, ckpts):
    folder, _ = ckpts
    r = _run(runner, "trace", folder / "step_20.safetensors", folder / "step_300.safetensors")
    assert r.exit_code == 2 and "the last argument is DATA" in r.output, r.output


def test_series_run_matches_single_runs_and_loads_data_once(runner, ckpts, tmp_path,
                                                             monkeypatch):  # fmt: skip
    import gmcurv.io.data as data_mod

    folder, data = ckpts
    calls = []
    real = data_mod.load_data
    monkeypatch.setattr(data_mod, "load_data", lambda *a, **k: calls.append(a) or real(*a, **k))
    plot = tmp_path / "series.png"
    r = _run(runner, "trace", folder, data, *F64, "--curvature", "all", "--json",
             "--plot", plot)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert len(calls) == 1  # DATA read once for three checkpoints
    doc = json.loads(r.stdout)
    jsonschema.validate(doc, report_schema())
    block = doc["results"]["series"]
    assert block["x"] == "step" and [row["step"] for row in block["checkpoints"]] == [20, 300, 1000]
    assert doc["config"]["model"] == str(folder) and doc["model"] is None
    for row in block["checkpoints"]:
        single = _run(runner, "trace", row["model"]["path"], data, *F64, "--curvature", "all",
                      "--json")  # fmt: skip
        ref = json.loads(single.stdout)["results"]
        for kind in ("fisher", "ggn", "hessian"):
            assert row["results"][kind]["trace"]["value"] == pytest.approx(
                ref[kind]["trace"]["value"], rel=1e-12
            )
            assert row["results"][kind]["eigenvalues"][0]["value"] == pytest.approx(
                ref[kind]["eigenvalues"][0]["value"], rel=1e-9
            )
        assert row["results"]["loss"]["value"] == pytest.approx(ref["loss"]["value"], rel=1e-12)
    img = matplotlib.image.imread(plot)
    assert img.shape[0] > 300 and img.shape[1] > 1000


def test_series_refuses_single_checkpoint_options(runner, ckpts, tmp_path):
    folder, data = ckpts
    r = _run(runner, "trace", folder, data, "--save-diagonal", tmp_path / "d.safetensors")
    assert r.exit_code == 2 and "not a series" in r.output


SNAPSHOT = """\
gmcurv trace (series) · data d.safetensors (N=16)
Fisher (empirical): 3 checkpoints, by step (from name)
┏━━━━━━━━━━━━━━━━━━━━━━━━━━┳━━━━━━┳━━━━━━━━━┳━━━━━━━━┳━━━━━━━━━━━━━┓
┃ checkpoint               ┃ step ┃    loss ┃  λ_max ┃       trace ┃
┡━━━━━━━━━━━━━━━━━━━━━━━━━━╇━━━━━━╇━━━━━━━━━╇━━━━━━━━╇━━━━━━━━━━━━━┩
│ …long_run_name_step_20   │   20 │ 1.12345 │  1.135 │       5.315 │
│ …long_run_name_step_300  │  300 │ 1.12346 │ 0.7713 │ 4.3 ± 0.012 │
│ …long_run_name_step_1000 │ 1000 │    1.03 │ 0.6936 │       3.821 │
└──────────────────────────┴──────┴─────────┴────────┴─────────────┘
"""


def test_series_table_snapshot_at_80_columns():
    from gmcurv.cli.series import render_series

    def row(i, step, loss, lam, tr, se=None):
        t = {"value": tr, "stderr": se, "n_samples": 16, "method": "exact", "converged": True}
        return {
            "index": i,
            "step": step,
            "model": {"path": f"/runs/a_very_long_run_name_step_{step}.safetensors"},
            "results": {
                "loss": {"value": loss},
                "fisher": {"type": "empirical", "trace": t, "eigenvalues": [{"value": lam}]},
            },
        }

    rows = [row(0, 20, 1.123451, 1.135, 5.315), row(1, 300, 1.123459, 0.7713, 4.3, 0.012),
            row(2, 1000, 1.03, 0.6936, 3.821)]  # fmt: skip
    series = {"x": "step", "order": "by step (from name)", "checkpoints": rows}
    report = Report(
        "trace", {}, 0, "cpu", "float64", None, DataInfo("d.safetensors", 16), {"series": series}
    )
    buf = StringIO()
    render_series(report, Console(width=80, file=buf, color_system=None))
    text = "\n".join(line.rstrip() for line in buf.getvalue().splitlines()[:-1]) + "\n"
    assert text == SNAPSHOT, text


def test_fail_if_reaches_a_row_of_the_series(runner, ckpts):
    folder, data = ckpts
    rule = "series.checkpoints[2].results.fisher.trace > 0"
    r = _run(runner, "trace", folder, data, "-k", "1", "-q", "--fail-if", rule)
    assert r.exit_code == 1 and "FAIL" in r.output


def test_mask_sidecars_are_not_checkpoints(runner, ckpts, tmp_path):
    folder, data = ckpts
    out = tmp_path / "pruned.safetensors"
    r = _run(runner, "saliency", folder / "step_20.safetensors", data, "--prune", "0.5",
             "--save-pruned", folder / "step_40.safetensors", "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert (folder / "step_40.masks.safetensors").exists() and not out.exists()
    s = resolve_series([folder])
    assert [c.step for c in s.checkpoints] == [20, 40, 300, 1000]
    s = resolve_series(sorted(folder.glob("*.safetensors")))  # a shell glob catches it too
    assert len(s.checkpoints) == 4
