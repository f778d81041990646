"""``saliency --prune`` on a Hugging Face directory writes a directory ``from_pretrained`` loads.

A user's model is a ``save_pretrained`` directory; its pruned copy must be one too (the
default ``<dir>.pruned-<percent>`` beside it, or ``--save-pruned DIR``): the input's
``config.json`` (and tokenizer files), ``model.safetensors`` with the input's keys and
dtypes, tied weights still tied, and the masks sidecar. Oracles: ``transformers`` itself
loads the directory, its weights are the original times the keep-masks (magnitude, no
update), and its ``outputs.loss`` is the "after" loss gmcurv reports.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from hf_models import VOCAB, N, T
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gmcurv.cli.app import app

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::gmcurv.errors.GmcurvWarning")


def _dtypes(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        names = list(f.keys())
        return {k: f.get_slice(k).get_dtype() for k in names}


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A tiny Qwen2 with tied embeddings, stored in bfloat16, plus a tokenizer-ish file."""
    root = tmp_path_factory.mktemp("hfdir")
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=24, max_position_embeddings=16,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    with contextlib.redirect_stderr(io.StringIO()):
        model = transformers.Qwen2ForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(str(root / "qwen"))
    (root / "qwen" / "tokenizer_config.json").write_text('{"model_max_length": 16}')
    ids = torch.randint(2, VOCAB, (N, T), generator=torch.Generator().manual_seed(1))
    save_file({"input_ids": ids}, str(root / "data.safetensors"))
    return root / "qwen", root / "data.safetensors"


def test_default_output_is_a_loadable_directory(runner, qwen_dir):
    model_dir, data = qwen_dir
    args = ["saliency", str(model_dir), str(data), "--prune", "0.5", "--criterion", "magnitude"]
    r = runner.invoke(app, [*args, "--dtype", "float64", "--json"])
    assert r.exit_code == 0, r.output
    out = model_dir.parent / "qwen.pruned-50"
    doc = json.loads(r.stdout)
    assert doc["results"]["prune"]["checkpoint"]["path"] == str(out / "model.safetensors")
    assert {p.name for p in out.iterdir()} == {
        "config.json", "generation_config.json", "tokenizer_config.json",
        "model.safetensors", "model.masks.safetensors",
    }  # fmt: skip
    assert _dtypes(out / "model.safetensors") == _dtypes(model_dir / "model.safetensors")
    assert (out / "config.json").read_bytes() == (model_dir / "config.json").read_bytes()

    with contextlib.redirect_stderr(io.StringIO()):
        base = transformers.Qwen2ForCausalLM.from_pretrained(str(model_dir)).eval()
        pruned = transformers.Qwen2ForCausalLM.from_pretrained(str(out)).eval()
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight  # still tied
    assert pruned.dtype == torch.bfloat16
    keep = load_file(str(out / "model.masks.safetensors"))
    for name in _dtypes(out / "model.safetensors"):  # the file's entries (lm_head is tied)
        p, q = base.state_dict()[name], pruned.state_dict()[name]
        expected = p * keep[name] if name in keep else p  # magnitude: no update
        assert torch.equal(q, expected.to(q.dtype)), name
    assert 1 - sum(m.sum() for m in keep.values()) / sum(m.numel() for m in keep.values()) > 0.45

    # the "after" loss gmcurv reports is the library's own loss of the reloaded model
    ids = load_file(str(data))["input_ids"]
    with torch.no_grad():
        ref = pruned.double()(input_ids=ids, labels=ids).loss.item()
    assert doc["results"]["prune"]["after"]["loss"]["value"] == pytest.approx(
        ref, rel=1e-6
    )  # rotary tables in float32

    # gmcurv reloads the directory with its masks
    r = runner.invoke(app, ["info", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert "50" in json.dumps(json.loads(r.stdout)["results"].get("masks", {})) or (
        "sparsity" in r.stdout
    )


def test_save_pruned_directory_and_refusals(runner, qwen_dir, tmp_path):
    model_dir, data = qwen_dir
    base = ["saliency", str(model_dir), str(data), "--prune", "0.3", "--criterion", "magnitude"]
    out = tmp_path / "pruned30"
    r = runner.invoke(app, [*base, "--save-pruned", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries
    # again into the same directory: replaced in place
    r = runner.invoke(app, [*base, "--save-pruned", str(out), "--quiet"])
    assert r.exit_code == 0, r.output

    # inside the input directory: refused naming --save-pruned, before any compute
    inside = model_dir / "model.pruned.safetensors"
    r = runner.invoke(app, [*base, "--save-pruned", str(inside)])
    assert r.exit_code == 2 and "--save-pruned" in r.output
    assert "inside the input directory" in r.output and "-o/--output" not in r.output
    assert not inside.exists()
    # a directory holding another checkpoint
    other = tmp_path / "other"
    other.mkdir()
    (other / "model-00001-of-00002.safetensors").write_bytes(b"x")
    r = runner.invoke(app, [*base, "--save-pruned", str(other)])
    assert r.exit_code == 2 and "another checkpoint" in r.output
    # a suffix that is neither .safetensors nor a directory
    r = runner.invoke(app, [*base, "--save-pruned", str(tmp_path / "x.pt")])
    assert r.exit_code == 2 and "directory" in r.output
