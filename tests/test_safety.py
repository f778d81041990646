"""No code from a checkpoint; code named by the user is announced; outputs are checked
before any compute (issue 17). The broad sweep of bad inputs is tests/test_corpus.py."""

from __future__ import annotations

import json

import pytest
from helpers import write_data, write_mlp
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gmcurv.cli.app import app
from gmcurv.io.checkpoint import gmcurv_metadata
from gmcurv.io.metadata import copyable, looks_like_code

LOSS = """
import pathlib
import torch.nn.functional as F
pathlib.Path(__file__).with_name("RAN").write_text("imported")

def ce(outputs, targets):
    return F.cross_entropy(outputs, targets.long(), reduction="none")
"""


@pytest.fixture
def problem(tmp_path):
    model = write_mlp(tmp_path / "m.safetensors", sizes=(6, 8, 3))
    data = write_data(tmp_path / "d.safetensors", n=24)
    (tmp_path / "user_loss.py").write_text(LOSS)
    return tmp_path, model, data


@pytest.mark.parametrize("key", ["gmcurv.loss", "gmcurv.arch"])
@pytest.mark.parametrize("spec", ["{dir}/user_loss.py:ce", "user_loss.py:ce", "json:loads"])
def test_checkpoint_metadata_never_imports_code(runner, problem, key, spec):
    root, model, data = problem
    meta = gmcurv_metadata("mlp:tanh", "cross_entropy")
    meta[key] = spec.format(dir=root)
    bad = root / "bad.safetensors"
    save_file(load_file(str(model)), str(bad), metadata=meta)
    for cmd in (["info", str(bad)], ["trace", str(bad), str(data), "-q"]):
        result = runner.invoke(app, cmd)
        assert result.exit_code == 2, result.output
        assert key in result.output and "hint" in result.output
    assert not (root / "RAN").exists()


def test_prune_never_writes_a_code_path(runner, problem):
    """--loss file.py:fn runs (the user named it) but is not written into the pruned file."""
    root, model, data = problem
    out = root / "pruned.safetensors"
    args = ["saliency", str(model), str(data), "--loss", f"{root}/user_loss.py:ce", "-q"]
    result = runner.invoke(
        app, [*args, "--prune", "0.5", "--criterion", "magnitude", "--save-pruned", str(out)]
    )
    assert result.exit_code == 0, result.output
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert not any(looks_like_code(v) for k, v in meta.items() if k != "gmcurv.pruning")
    assert meta.get("gmcurv.loss", "cross_entropy") in ("cross_entropy", "mse", "next_token")
    again = runner.invoke(app, ["info", str(out)])  # the pruned file loads on its own
    assert again.exit_code == 0, again.output


def test_copyable_drops_code_keeps_facts():
    meta = {
        "gmcurv.arch": "mlp:tanh",
        "gmcurv.loss": "evil.py:fn",
        "gmcurv.hook": "pkg.mod:fn",
        "gmcurv.metrics": json.dumps({"accuracy": 0.9}),
        "format": "pt",
    }
    assert copyable(meta) == {
        "gmcurv.arch": "mlp:tanh",
        "gmcurv.metrics": meta["gmcurv.metrics"],
        "format": "pt",
    }


def test_config_file_code_is_announced(runner, problem, monkeypatch):
    """A gmcurv.toml in the working directory may name a loss file (the user's project),
    but the run says so on stderr, even with -q, and records it under config.code."""
    root, model, data = problem
    (root / "gmcurv.toml").write_text(f'loss = "{root}/user_loss.py:ce"\n')
    monkeypatch.chdir(root)
    monkeypatch.setenv("GMCURV_NO_CONFIG", "")
    result = runner.invoke(app, ["trace", str(model), str(data), "--json", "-q"])
    assert result.exit_code == 0, result.output
    assert "user_loss.py:ce" in result.stderr and "gmcurv.toml" in result.stderr
    code = json.loads(result.stdout)["config"]["code"]
    assert code == [
        {
            "option": "--loss",
            "spec": f"{root}/user_loss.py:ce",
            "named_in": str(root / "gmcurv.toml"),
        }
    ]


def test_outputs_checked_before_compute(runner, problem):
    """A bad --plot refuses the run before -o, the grid or the pruned file is written."""
    root, model, data = problem
    (root / "config.json").write_text("{}")
    for args in (
        ["trace", str(model), str(data), "-o", str(root / "r.json"), "--plot", str(data)],
        ["saliency", str(model), str(data), "--prune", "0.5",
         "--save-pruned", str(root / "p.safetensors"), "--plot", str(root / "config.json")],
        ["info", str(model), "-o", str(root / "config.json")],
    ):  # fmt: skip
        before = {p.name for p in root.iterdir()}
        result = runner.invoke(app, [*args, "-q"])
        assert result.exit_code == 2, result.output
        assert {p.name for p in root.iterdir()} == before
    assert (root / "config.json").read_text() == "{}"
