"""A CNN users recognise: a ResNet-18-layout network (BatchNorm, residual adds) saved as
safetensors in plain PyTorch and loaded with ``--arch tests/resnet.py:resnet_tiny``.

``trace``, ``eigen`` and ``saliency --prune`` run on it; its Fisher trace and top
eigenvalues match ``vmap(grad)`` per-example gradients in float64; the pruned checkpoint
loads strictly into the same network in plain PyTorch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from resnet import resnet_tiny, trained_state
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call, grad, vmap

from gmcurv.cli.app import app

ARCH = f"{Path(__file__).parent / 'resnet.py'}:resnet_tiny"
N, CLASSES = 10, 5


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """Checkpoint, float64 data and the float64 oracle (per-example gradients)."""
    root = tmp_path_factory.mktemp("resnet")
    state = trained_state()
    ckpt = root / "resnet.safetensors"
    save_file(state, str(ckpt))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(N, 3, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (N,), generator=gen)
    data = root / "images.safetensors"
    save_file({"inputs": x, "targets": y}, str(data))
    model = resnet_tiny()
    model.load_state_dict(state)
    model = model.double().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss_one(p, xi, yi):
        out = functional_call(model, {**p, **buffers}, (xi[None],))
        return nn.functional.cross_entropy(out, yi[None])

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    G = torch.cat([v.reshape(N, -1) for v in g.values()], dim=1)  # [N, P]
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(model(x), y))
    return {
        "ckpt": ckpt,
        "data": data,
        "root": root,
        "loss": loss,
        "trace": float(G.pow(2).sum()) / N,
        "eigenvalues": torch.linalg.eigvalsh(G @ G.T / N).flip(0),
        "n_params": G.shape[1],
    }


def _run(runner, *args):
    res = runner.invoke(app, [*map(str, args), "--arch", ARCH, "--json", "--dtype", "float64"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_resnet_fisher_trace_matches_vmap_grad(runner, resnet):
    doc = _run(runner, "trace", resnet["ckpt"], resnet["data"], "--curvature", "fisher")
    res = doc["results"]
    assert doc["model"]["n_params"] == resnet["n_params"]
    assert res["loss"]["value"] == pytest.approx(resnet["loss"], rel=1e-12)
    assert res["fisher"]["trace"]["value"] == pytest.approx(resnet["trace"], rel=1e-10)
    kinds = {k: v["kind"] for k, v in res["fisher"]["per_layer"].items()}
    assert kinds["conv1"] == "conv2d" and kinds["bn1"] == "norm" and kinds["fc"] == "linear"
    assert kinds["layer2.0.downsample.1"] == "norm"  # BatchNorm: fixed affine map, no dense
    (warning,) = doc["warnings"]
    assert "BatchNorm 'bn1', 'layer1.0.bn1'" in warning and "in all" in warning


def test_resnet_eigen(runner, resnet):
    doc = _run(runner, "eigen", resnet["ckpt"], resnet["data"], "--curvature", "fisher", "-k", "3")
    got = [e["value"] for e in doc["results"]["fisher"]["eigenvalues"]]
    torch.testing.assert_close(
        torch.tensor(got, dtype=torch.float64), resnet["eigenvalues"][:3], rtol=1e-8, atol=1e-14
    )
    doc = _run(runner, "eigen", resnet["ckpt"], resnet["data"], "-k", "1", "--max-iters", "40")
    (top,) = doc["results"]["hessian"]["eigenvalues"]
    assert top["value"] > 0


def test_resnet_saliency_prune_loads_strictly_in_plain_pytorch(runner, resnet):
    out = resnet["root"] / "resnet.pruned.safetensors"
    doc = _run(
        runner, "saliency", resnet["ckpt"], resnet["data"], "--prune", "0.3", "--save-pruned", out
    )
    prune = doc["results"]["prune"]
    assert prune["n_removed"] == round(0.3 * prune["n_prunable"])
    model = resnet_tiny()
    model.load_state_dict(load_file(str(out)), strict=True)  # running stats included
    keep = load_file(str(out.with_name("resnet.pruned.masks.safetensors")))
    assert sum(int((~m).sum()) for m in keep.values()) == prune["n_removed"]
    assert all(k.endswith(".weight") and "bn" not in k for k in keep)  # convs and fc only
    again = _run(runner, "trace", out, resnet["data"], "--curvature", "fisher")
    assert again["results"]["fisher"]["trace"]["value"] > 0
    # without --arch: one error naming the fix (the factory is never recorded in the file)
    res = runner.invoke(app, ["trace", str(out), str(resnet["data"])])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "pruned by gmcurv" in res.stderr and "same --arch" in res.stderr
