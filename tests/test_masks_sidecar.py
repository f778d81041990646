"""Pruned checkpoints are plain state dicts; their masks live in ``<name>.masks.safetensors``.

A strict ``model.load_state_dict(load_file(path))`` in plain PyTorch accepts the pruned file;
gmcurv finds the sidecar by itself; older files with ``gmcurv_mask.*`` tensors still load;
``info`` reports sparsity from either; no output (sidecar included) overwrites an input.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import write_data, write_mlp
from safetensors.torch import load_file, save_file
from torch import nn

from gmcurv.cli.app import app
from gmcurv.errors import GmcurvWarning
from gmcurv.io.checkpoint import load_model, resolve_weights_path, save_checkpoint
from gmcurv.io.masks import META_MASKS, masks_path
from gmcurv.io.tensors import MASK_PREFIX


@pytest.fixture
def problem(tmp_path):
    return write_mlp(tmp_path / "m.safetensors", sizes=(6, 8, 3)), write_data(
        tmp_path / "d.safetensors"
    )


def _prune(runner, model, data, out, *extra):
    args = [
        "saliency",
        str(model),
        str(data),
        "--prune",
        "0.5",
        "--save-pruned",
        str(out),
        "--json",
        "-q",
    ]
    return runner.invoke(app, [*args, *extra])


def test_pruned_checkpoint_loads_strictly_in_plain_pytorch(runner, problem, tmp_path):
    model, data = problem
    out = tmp_path / "pruned.safetensors"
    res = _prune(runner, model, data, out)
    assert res.exit_code == 0, res.output
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    plain = {k.removeprefix("net."): v for k, v in load_file(str(out)).items()}
    net.load_state_dict(plain, strict=True)  # raised "Unexpected key(s) gmcurv_mask.0.weight"
    side = masks_path(out)
    assert side == tmp_path / "pruned.masks.safetensors" and side.is_file()
    keep = load_file(str(side))
    assert set(keep) == {"net.0.weight", "net.2.weight"}
    raw = load_file(str(out))
    for k, m in keep.items():
        assert m.dtype == torch.bool and bool((raw[k][~m] == 0).all())
    lm = load_model(out)  # found by itself
    assert set(lm.masks) == set(keep) and lm.metadata[META_MASKS] == side.name
    info = json.loads(runner.invoke(app, ["info", str(out), "--json"]).stdout)
    removed = sum(int((~m).sum()) for m in keep.values())
    total = sum(m.numel() for m in keep.values())
    sparsity = info["results"]["masks"]
    assert info["results"]["masks_file"] == "pruned.masks.safetensors"
    assert sum(sparsity[k] * keep[k].numel() for k in keep) == pytest.approx(removed)
    assert removed == round(0.5 * total)
    # a directory holding only the pruned file and its sidecar resolves to the checkpoint
    folder = tmp_path / "shipped"
    folder.mkdir()
    for f in (out, side):
        (folder / f.name).write_bytes(f.read_bytes())
    assert resolve_weights_path(folder) == folder / out.name
    assert set(load_model(folder).masks) == set(keep)


def test_legacy_masks_inside_the_checkpoint_still_load(runner, problem, tmp_path):
    model, _ = problem
    state = load_file(str(model))
    keep = torch.ones(8, 6, dtype=torch.bool)
    keep[:, :3] = False
    state["net.0.weight"][~keep] = 0
    state[MASK_PREFIX + "net.0.weight"] = keep
    from safetensors import safe_open

    with safe_open(str(model), framework="pt") as f:
        meta = f.metadata()
    legacy = tmp_path / "legacy.safetensors"
    save_file(state, str(legacy), metadata=meta)
    lm = load_model(legacy)
    assert set(lm.masks) == {"net.0.weight"} and torch.equal(lm.masks["net.0.weight"], keep)
    info = json.loads(runner.invoke(app, ["info", str(legacy), "--json"]).stdout)
    assert info["results"]["masks"] == {"net.0.weight": pytest.approx(0.5)}
    assert info["results"]["masks_file"] == "legacy.safetensors (gmcurv_mask.* tensors)"


def test_foreign_or_missing_sidecar_is_not_applied(problem, tmp_path):
    model, _ = problem
    lm = load_model(model)
    masks = {"net.0.weight": torch.ones(8, 6, dtype=torch.bool)}
    a = save_checkpoint(tmp_path / "a.safetensors", lm.model.state_dict(), lm.metadata, masks)
    assert set(load_model(a).masks) == {"net.0.weight"}
    # the checkpoint is replaced by another file: its old sidecar is ignored, with a warning
    save_file(load_file(str(model)), str(a), metadata={**lm.metadata, "x": "1"})
    with pytest.warns(GmcurvWarning, match="another version"):
        assert load_model(a).masks == {}
    # the checkpoint names a sidecar that is gone: loads, with a warning
    b = save_checkpoint(tmp_path / "b.safetensors", lm.model.state_dict(), lm.metadata, masks)
    masks_path(b).unlink()
    with pytest.warns(GmcurvWarning, match="missing"):
        assert load_model(b).masks == {}
    # rewriting a checkpoint without masks removes its stale sidecar
    c = save_checkpoint(tmp_path / "c.safetensors", lm.model.state_dict(), lm.metadata, masks)
    save_checkpoint(c, lm.model.state_dict(), lm.metadata)
    assert not masks_path(c).exists() and META_MASKS not in load_model(c).metadata


def test_sidecar_never_overwrites_an_input(runner, problem, tmp_path):
    model, _ = problem
    data = write_data(tmp_path / "x.masks.safetensors")  # the sidecar name of x.safetensors
    digest = data.read_bytes()
    out = tmp_path / "x.safetensors"
    res = _prune(runner, model, data, out)
    assert res.exit_code == 2, res.output
    assert "x.masks.safetensors" in res.stderr and "overwrite" in res.stderr
    assert not out.exists() and data.read_bytes() == digest
