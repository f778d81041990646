"""Checkpoints and data as users have them: half-precision weights, ``pytorch_model.bin``
only, text instead of token ids. Each is either used and stated, or refused with a hint."""

from __future__ import annotations

import contextlib
import io
import json
import pickle

import pytest
import torch
from hf_models import build, data
from safetensors.torch import save_file

from gmcurv.cli.app import app

pytestmark = pytest.mark.filterwarnings("ignore::gmcurv.errors.GmcurvWarning")


class _Boom:
    """Unpickling this writes a file: the test fails if gmcurv ever unpickles."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_only_directory_is_refused_with_a_conversion_hint(runner, tmp_path):
    model_dir = tmp_path / "llama-bin"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    canary = tmp_path / "unpickled"
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(str(canary))))
    save_file({"input_ids": torch.zeros(2, 4, dtype=torch.long)}, str(tmp_path / "d.safetensors"))
    for args in (
        ["info", str(model_dir)],
        ["trace", str(model_dir), str(tmp_path / "d.safetensors")],
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 2, r.output
        assert "pytorch_model.bin" in r.output and "pickle" in r.output
        assert "save_pretrained" in r.output  # how to convert
    assert not canary.exists()


@pytest.mark.parametrize("name", ["text.jsonl", "corpus.txt", "ids.npy"])
def test_text_and_lone_npy_data_get_a_hint(runner, tmp_path, name):
    path = tmp_path / name
    path.write_text('{"text": "hello"}\n')
    save_file({"net.0.weight": torch.zeros(2, 3)}, str(tmp_path / "m.safetensors"))
    r = runner.invoke(
        app, ["trace", "--arch", "mlp:relu", str(tmp_path / "m.safetensors"), str(path)]
    )
    assert r.exit_code == 2, r.output
    assert name in r.output
    if name.endswith(".npy"):
        assert "inputs.npy" in r.output
    else:
        assert "token ids" in r.output and "input_ids" in r.output


def test_half_precision_weights_are_stated(runner, tmp_path):
    pytest.importorskip("transformers")
    model = build("llama").to(torch.bfloat16)
    with contextlib.redirect_stderr(io.StringIO()):
        model.save_pretrained(str(tmp_path / "m"))
    save_file({"input_ids": data("llama")["input_ids"]}, str(tmp_path / "d.safetensors"))
    args = ["trace", str(tmp_path / "m"), str(tmp_path / "d.safetensors"), "--k", "0"]
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    config = json.loads(r.stdout)["config"]
    assert config["weights_dtype"] == "bfloat16" and config["dtype"] == "float32"
    assert config["sources"]["weights_dtype"] == "the checkpoint's; upcast to float32 (--dtype)"
    r = runner.invoke(app, [*args, "--quiet"])
    footer = " ".join(r.stdout.split())
    assert "weights dtype bfloat16 (the checkpoint's; upcast to float32 (--dtype))" in footer


def test_data_where_model_belongs_is_named(runner, tmp_path):
    """DATA first (or an adapter with DATA but no base model): the file holds data, not
    weights; the adapter's base is named and gmcurv says it never downloads it."""
    from lora_fixtures import write_peft_adapter

    d = tmp_path / "d.safetensors"
    save_file({"input_ids": torch.zeros(2, 4, dtype=torch.long)}, str(d))
    save_file({"net.0.weight": torch.zeros(2, 4)}, str(tmp_path / "m.safetensors"))
    r = runner.invoke(app, ["trace", str(d), str(tmp_path / "m.safetensors")])
    assert r.exit_code == 2 and "holds data (input_ids)" in r.output
    assert "MODEL comes before DATA" in r.output

    adapter = write_peft_adapter(
        tmp_path / "ad",
        {"net.0": (torch.zeros(2, 1), torch.zeros(1, 4))},
        r=1,
        alpha=1,
        base_model_name_or_path="meta-llama/Llama-2-7b-hf",
    )
    r = runner.invoke(app, ["lora", str(adapter), str(d)])
    assert r.exit_code == 2, r.output
    assert "meta-llama/Llama-2-7b-hf" in r.output and "never downloads" in r.output
