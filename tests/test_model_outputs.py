"""Model outputs are unwrapped in one place (`gmcurv.objective.output_tensor`).

A tensor as is; a tuple/list -> first element; a dict or Hugging Face ``ModelOutput`` ->
``logits``; anything else a clear error (exit 2 from the CLI, never a traceback).
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import write_data
from safetensors.torch import save_file
from torch import nn

from gmcurv.batch import Batch
from gmcurv.cli.app import app
from gmcurv.errors import ArchitectureError
from gmcurv.objective import Objective, output_tensor


def test_output_tensor_forms():
    t = torch.randn(3, 2)
    assert output_tensor(t) is t
    assert output_tensor((t, torch.zeros(1))) is t
    assert output_tensor([t]) is t
    assert output_tensor({"logits": t, "hidden": None}) is t


def test_output_tensor_model_output():
    modeling_outputs = pytest.importorskip("transformers.modeling_outputs")
    t = torch.randn(3, 2)
    out = modeling_outputs.CausalLMOutputWithPast(logits=t)
    assert output_tensor(out) is t


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"hidden": torch.zeros(1)}, "dict without a 'logits' tensor (hidden)"),
        ((), "tuple whose first element is missing"),
        (("a", 1), "tuple whose first element is str"),
        (3.0, "float, not a tensor"),
    ],
)
def test_output_tensor_errors(value, message):
    with pytest.raises(ArchitectureError, match="the model returned") as info:
        output_tensor(value)
    assert message in info.value.message and info.value.hint


class DictNet(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.form = form

    def forward(self, x):
        y = self.fc(x)
        if self.form == "dict":
            return {"logits": y, "features": x}
        if self.form == "tuple":
            return y, x
        return {"features": y}


@pytest.mark.parametrize("form", ["dict", "tuple"])
def test_objective_unwraps_everywhere(form):
    torch.manual_seed(0)
    model = DictNet(form).double()
    obj = Objective.build(model, "cross_entropy")
    x = torch.randn(4, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    batch = Batch(x, y, 0)
    ref = nn.functional.cross_entropy(model.fc(x), y, reduction="none")
    assert torch.allclose(obj.per_example_loss(batch), ref)
    params = {k: v.detach() * 2 for k, v in obj.params.items()}
    assert obj.outputs(x, params).shape == (4, 3)


FACTORY = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.form = form

    def forward(self, x):
        y = self.fc(x)
        return {"logits": y} if self.form == "dict" else {"features": y}

def good():
    return Net("dict")

def bad():
    return Net("bad")
"""


def test_cli_dict_outputs(runner, tmp_path):
    src = tmp_path / "net.py"
    src.write_text(FACTORY)
    torch.manual_seed(0)
    save_file(
        {"fc.weight": torch.randn(3, 6), "fc.bias": torch.zeros(3)},
        str(tmp_path / "m.safetensors"),
    )
    data = write_data(tmp_path / "d.safetensors", n=12)
    args = ["trace", str(tmp_path / "m.safetensors"), str(data), "--json"]
    ok = runner.invoke(app, [*args, "--arch", f"{src}:good"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["results"]["fisher"]["trace"]["value"] > 0
    bad = runner.invoke(app, [*args, "--arch", f"{src}:bad"])
    assert bad.exit_code == 2, bad.output
    assert "without a 'logits' tensor (features)" in bad.stderr
    assert "Traceback" not in bad.output
