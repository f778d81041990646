"""``--arch path/model.py:factory`` and ``--arch package.module:factory`` end to end.

A user model with a custom parameterised module runs through ``gmcurv trace`` with a
warning naming the dense-fallback module and its memory; broken factories exit 2 with a
message and no traceback; ``--arch hf:<Class>`` builds a transformers model.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from helpers import write_data
from safetensors.torch import save_file

from gmcurv.cli.app import app
from gmcurv.errors import ArchitectureError
from gmcurv.io.architecture import build_model
from gmcurv.io.checkpoint import load_model
from gmcurv.io.tensors import read_header
from gmcurv.results import report_schema

USER_MODEL = """
import torch
from torch import nn


class Gate(nn.Module):
    \"\"\"A custom parameterised module: no decomposed form, so dense per-example gradients.\"\"\"

    def __init__(self, d):
        super().__init__()
        self.alpha = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * torch.sigmoid(self.alpha * x)


class Net(nn.Module):
    def __init__(self, d_in=6, hidden=8, classes=3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.gate = Gate(hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc2(self.gate(self.fc1(x)))


def build():
    return Net()
"""


@pytest.fixture
def user_model(tmp_path):
    """A model file, its checkpoint (no gmcurv metadata) and data."""
    src = tmp_path / "user_model.py"
    src.write_text(USER_MODEL)
    namespace: dict = {}
    exec(compile(USER_MODEL, str(src), "exec"), namespace)
    torch.manual_seed(0)
    net = namespace["build"]()
    ckpt = tmp_path / "net.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(ckpt))
    data = write_data(tmp_path / "data.safetensors", n=24, d=6, classes=3)
    return src, ckpt, data


def _trace(runner, ckpt, data, arch, *extra):
    args = ["trace", str(ckpt), str(data), "--arch", arch, "--json", "--dtype", "float64"]
    return runner.invoke(app, [*args, "--k", "2", *extra])


def test_file_factory_runs_and_names_dense_fallback(runner, user_model):
    src, ckpt, data = user_model
    result = _trace(runner, ckpt, data, f"{src}:build", "--batch-size", "10")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    jsonschema.validate(doc, report_schema())
    fisher = doc["results"]["fisher"]
    assert fisher["per_layer"]["gate"]["kind"] == "dense"
    assert fisher["per_layer"]["fc1"]["kind"] == "linear"
    assert doc["model"]["arch_source"] == "--arch"
    # the warning names the module, its parameter count and the memory of a batch
    warning = next(w for w in doc["warnings"] if "no decomposed form" in w)
    assert "gate" in warning and "(8 in all)" in warning
    assert "per batch of 10" in warning and "--layers" in warning
    assert "no decomposed form" in result.stderr
    # the numbers equal the engine's on the same model (float64)
    per_layer = sum(v["trace"]["value"] for v in fisher["per_layer"].values())
    assert per_layer == pytest.approx(fisher["trace"]["value"], rel=1e-12)


def test_module_factory(runner, user_model, tmp_path, monkeypatch):
    _, ckpt, data = user_model
    pkg = tmp_path / "pkgroot" / "usernets"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path / "pkgroot"))
    result = _trace(runner, ckpt, data, "usernets.models:build")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["model"]["arch"] == "usernets.models:build"
    # a class is a factory too
    assert _trace(runner, ckpt, data, "usernets.models:Net").exit_code == 0


def test_layers_can_exclude_the_dense_module(runner, user_model):
    src, ckpt, data = user_model
    result = _trace(runner, ckpt, data, f"{src}:build", "--layers", "fc*")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert set(doc["results"]["fisher"]["per_layer"]) == {"fc1", "fc2"}
    assert not any("no decomposed form" in w for w in doc["warnings"])


BAD_FACTORIES = {
    "missing file": ("nowhere/model.py:build", None, "not found"),
    "syntax error": ("broken.py:build", "def build(:\n", "SyntaxError"),
    "factory raises": (
        "raises.py:build",
        "def build():\n    raise RuntimeError('no weights for you')\n",
        "no weights for you",
    ),
    "returns non-module": (
        "notmodule.py:build",
        "def build():\n    return 42\n",
        "not an nn.Module",
    ),
    "missing attribute": ("noattr.py:build", "x = 1\n", "no callable 'build'"),
    "needs arguments": ("args.py:build", "def build(width):\n    return width\n", "TypeError"),
    "import error inside": (
        "imports.py:build",
        "import not_a_module_anywhere\n",
        "ModuleNotFoundError",
    ),
    "missing package": ("no_such_pkg.models:build", None, "importing no_such_pkg.models failed"),
}


@pytest.mark.parametrize("case", sorted(BAD_FACTORIES))
def test_bad_factories_exit_2_with_a_message(runner, user_model, tmp_path, case):
    _, ckpt, data = user_model
    spec, body, message = BAD_FACTORIES[case]
    if body is not None:
        (tmp_path / spec.split(":")[0]).write_text(body)
        spec = f"{tmp_path / spec.split(':')[0]}:{spec.split(':')[1]}"
    result = _trace(runner, ckpt, data, spec)
    assert result.exit_code == 2, (case, result.output)
    assert "Traceback" not in result.output
    assert "error:" in result.stderr and message in result.stderr, (case, result.stderr)


def test_factory_that_does_not_fit_the_checkpoint(runner, user_model, tmp_path):
    _, ckpt, data = user_model
    other = tmp_path / "other.py"
    other.write_text("from torch import nn\n\ndef build():\n    return nn.Linear(6, 3)\n")
    result = _trace(runner, ckpt, data, f"{other}:build")
    assert result.exit_code == 2
    assert "does not fit the architecture" in result.stderr and "missing keys" in result.stderr


# ------------------------------------------------------------- a transformers GPT-2 (hf)
def _gpt2_dir(tmp_path):
    """A GPT-2 saved by save_pretrained (Conv1D weights [in, out], lm_head tied)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=11, n_positions=8, n_embd=8, n_layer=2, n_head=2, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(str(tmp_path / "gpt"))
    return tmp_path / "gpt", model


def test_hf_arch_spec_names_the_class(runner, tmp_path):
    path, ref = _gpt2_dir(tmp_path)
    header = read_header(path / "model.safetensors")
    ids = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(0))
    _, arch, source, loss = build_model(header, "hf:GPT2LMHeadModel")
    assert (arch, source, loss) == ("hf:GPT2LMHeadModel", "--arch", "next_token")
    loaded = load_model(path, arch="hf:GPT2LMHeadModel")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, ref(ids).logits)
    with pytest.raises(ArchitectureError, match="has no model class 'GPT2Nope'"):
        build_model(header, "hf:GPT2Nope")
    save_file({"input_ids": ids}, str(tmp_path / "tokens.safetensors"))
    args = ["trace", str(path), str(tmp_path / "tokens.safetensors"), "--json", "--k", "2"]
    ok = runner.invoke(app, args)
    assert ok.exit_code == 0, ok.output
    doc = json.loads(ok.stdout)
    assert doc["model"]["loss"] == "next_token" and doc["model"]["arch"] == "hf:GPT2LMHeadModel"
    per_layer = doc["results"]["fisher"]["per_layer"]
    assert per_layer["transformer.wte"]["kind"] == "tied"
    assert per_layer["transformer.h.0.attn.c_attn"]["kind"] == "conv1d"


GPT2_FACTORY = """
import transformers


def build():
    cfg = transformers.GPT2Config(
        vocab_size=11, n_positions=8, n_embd=8, n_layer=2, n_head=2, bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg)
"""


def test_file_factory_returning_a_hf_gpt2(runner, tmp_path):
    """A factory's transformers model: ModelOutput unwrapped, the library's key names."""
    path, _ = _gpt2_dir(tmp_path)
    (tmp_path / "factory.py").write_text(GPT2_FACTORY)
    ids = torch.randint(0, 11, (4, 8), generator=torch.Generator().manual_seed(3))
    save_file({"input_ids": ids}, str(tmp_path / "tokens.safetensors"))
    args = ["trace", str(path), str(tmp_path / "tokens.safetensors"), "--json", "--k", "1"]
    arch = ["--arch", f"{tmp_path / 'factory.py'}:build"]
    # a factory has no default loss (cross_entropy): it needs targets, which tokens lack
    result = runner.invoke(app, [*args, *arch])
    assert result.exit_code == 2 and "targets" in result.stderr, result.output
    result = runner.invoke(app, [*args, *arch, "--loss", "next_token"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"]["fisher"]["trace"]["value"] > 0
