"""``--arch`` factories may return any ``nn.Module`` whose forward returns a tensor, a tuple
(its first element), a dict or a Hugging Face ``ModelOutput`` (their ``logits``); every
form gives the same numbers, equal to the float64 oracle, and ``--help`` says so.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.func import functional_call, grad, vmap

from gmcurv.cli.app import app

FACTORIES = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)
        self.form = form

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        y = self.fc2(h)
        if self.form == "tuple":
            return y, h
        if self.form == "dict":
            return {"hidden": h, "logits": y}
        if self.form == "model_output":
            from transformers.modeling_outputs import SequenceClassifierOutput

            return SequenceClassifierOutput(logits=y, hidden_states=(h,))
        return y


def as_tensor():
    return Net("tensor")


def as_tuple():
    return Net("tuple")


def as_dict():
    return Net("dict")


def as_model_output():
    return Net("model_output")
"""

N = 16


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    root = tmp_path_factory.mktemp("factories")
    src = root / "nets.py"
    src.write_text(FACTORIES)
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    state = {"fc1.weight": ref[0].weight, "fc1.bias": ref[0].bias}
    state |= {"fc2.weight": ref[2].weight, "fc2.bias": ref[2].bias}
    ckpt = root / "m.safetensors"
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(ckpt))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(N, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=gen)
    data = root / "d.safetensors"
    save_file({"inputs": x, "targets": y}, str(data))
    params = {k: v.detach() for k, v in ref.named_parameters()}

    def loss_one(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(ref, p, (xi[None],)), yi[None])

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(ref(x), y))
    trace = sum(float(v.pow(2).sum()) for v in g.values()) / N
    return src, ckpt, data, loss, trace


@pytest.mark.parametrize("factory", ["as_tensor", "as_tuple", "as_dict", "as_model_output"])
def test_every_output_form_gives_the_oracle_numbers(runner, problem, factory):
    if factory == "as_model_output":
        pytest.importorskip("transformers.modeling_outputs")
    src, ckpt, data, loss, trace = problem
    args = ["trace", str(ckpt), str(data), "--arch", f"{src}:{factory}", "--curvature", "all"]
    res = runner.invoke(app, [*args, "--dtype", "float64", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)["results"]
    assert out["loss"]["value"] == pytest.approx(loss, rel=1e-12)
    assert out["fisher"]["trace"]["value"] == pytest.approx(trace, rel=1e-10)
    assert out["ggn"]["trace"]["value"] > 0 and out["hessian"]["trace"]["value"] is not None


def test_arch_help_names_the_output_forms(runner):
    res = runner.invoke(app, ["trace", "--help"], env={"COLUMNS": "200"})
    text = " ".join(res.stdout.split())
    for word in ("mlp:relu|tanh|gelu", "tuple", "dict", "ModelOutput", "logits"):
        assert word in text, word
