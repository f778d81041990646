"""Hugging Face checkpoints of every supported family, built by `transformers` itself.

Each family is a tiny random config saved by ``save_pretrained`` at test time. Oracles:
gmcurv's loss equals the model's own ``outputs.loss``; the decomposed capture equals
per-example gradients from a loop over examples (float64); Hessian-vector products equal
double backward; every command runs end to end from the CLI.
"""

from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch
from hf_models import CAUSAL, FAMILIES, build, data, hf_loss, save

from gmcurv.batch import Batch
from gmcurv.capture import Capturer
from gmcurv.cli.app import app
from gmcurv.errors import ArchitectureError
from gmcurv.io.checkpoint import load_model
from gmcurv.objective import Objective
from gmcurv.products import batch_hvp

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::gmcurv.errors.GmcurvWarning")


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """``{family: (model dir, data file)}``, saved once per session."""
    root = tmp_path_factory.mktemp("hf")
    return {f: save(f, root) for f in FAMILIES}


def _batch(family: str) -> Batch:
    b = data(family)
    inputs = {k: v for k, v in b.items() if k != "labels"}
    x = inputs if len(inputs) > 1 else next(iter(inputs.values()))
    return Batch(x, b.get("labels"), 0)


def _objective(hf_dirs, family: str, dtype=torch.float64) -> Objective:
    lm = load_model(hf_dirs[family][0], dtype=dtype)
    return Objective.build(lm.model, lm.loss)


# ------------------------------------------------------------------------------ building
@pytest.mark.parametrize("family", FAMILIES)
def test_loss_equals_outputs_loss(hf_dirs, family):
    """L = (1/N) Σ_n L_n equals the library's loss (equal-length unpadded sequences)."""
    lm = load_model(hf_dirs[family][0])
    assert lm.arch == f"hf:{type(lm.model).__name__}" and lm.arch_source == "config.json"
    assert lm.loss == ("next_token" if family in CAUSAL else "cross_entropy")
    obj = Objective.build(lm.model, lm.loss)
    with torch.no_grad():
        ours = obj.per_example_loss(_batch(family)).mean()
    ref = hf_loss(build(family), data(family), family)
    assert abs(float(ours) - float(ref)) <= 1e-6


def test_weights_are_the_saved_ones(hf_dirs):
    ref = build("gpt2").state_dict()
    got = load_model(hf_dirs["gpt2"][0]).model.state_dict()
    assert set(got) == set(ref)
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)
    lm = load_model(hf_dirs["gpt2"][0]).model  # lm_head tied as transformers ties it
    assert lm.lm_head.weight is lm.transformer.wte.weight


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt", "bert"])
def test_decomposed_capture_equals_per_example_gradients(hf_dirs, family):
    obj = _objective(hf_dirs, family)
    batch = _batch(family)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no dense fallback from the self-check
        cap = Capturer(obj, "empirical")
        dg = cap(batch)
    kinds = {b.name: b.kind for b in dg.blocks}
    assert not cap.fallbacks
    expected = {
        "gpt2": ("transformer.h.0.attn.c_attn", "conv1d"),
        "llama": ("model.layers.0.input_layernorm", "norm"),
        "opt": ("model.decoder.layers.0.fc1", "linear"),
        "bert": ("bert.embeddings.token_type_embeddings", "embedding"),
    }[family]
    assert kinds[expected[0]] == expected[1]
    params = obj.params
    n = dg.n
    for e in range(n):
        one = Batch(
            {k: v[e : e + 1] for k, v in batch.inputs.items()}
            if isinstance(batch.inputs, dict)
            else batch.inputs[e : e + 1],
            None if batch.targets is None else batch.targets[e : e + 1],
            0,
        )
        loss = obj.per_example_loss(one)[0]
        ref = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
        for block in dg.blocks:
            got = block.source.materialize(slice(e, e + 1))
            for name in block.params:
                torch.testing.assert_close(got[name][0, 0], ref[name], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "vit"])
def test_hvp_equals_double_backward(hf_dirs, family):
    obj = _objective(hf_dirs, family)
    batch = _batch(family)
    g = torch.Generator().manual_seed(3)
    v = {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in obj.params.items()}
    params = list(obj.params.values())
    total = obj.per_example_loss(batch).sum()
    grads = torch.autograd.grad(total, params, create_graph=True)
    dot = sum((gr * v[k]).sum() for gr, k in zip(grads, obj.params, strict=True))
    ref = dict(zip(obj.params, torch.autograd.grad(dot, params), strict=True))
    # Llama's RMSNorm and parts of ViT compute in float32 whatever the model's dtype:
    # there, agreement is to float32 round-off (relative, over the whole vector)
    rtol = {"llama": 1e-5, "vit": 1e-5}.get(family, 1e-10)
    ref_norm = torch.sqrt(sum(r.pow(2).sum() for r in ref.values()))
    for forward_mode in (True, False):
        got = batch_hvp(obj, batch, v, forward_mode=forward_mode)
        err = torch.sqrt(sum((got[k] - ref[k]).pow(2).sum() for k in ref))
        assert float(err) <= rtol * float(ref_norm), (forward_mode, float(err / ref_norm))


# ----------------------------------------------------------------------------------- CLI
COMMANDS = {
    "info": ["info"],
    "trace": ["trace", "--curvature", "all", "--method", "hutchinson", "--probes", "2"],
    "eigen": ["eigen", "--curvature", "hessian", "--k", "1", "--max-iters", "6"],
    "spectrum": ["spectrum", "--probes", "1", "--steps", "6"],
    "saliency": ["saliency", "--prune", "0.5", "--criterion", "obd"],
    "landscape": ["landscape", "--1d", "--steps", "3"],
}


def run_command(runner, hf_dirs, family: str, command: str, tmp_path):
    model, data_path = hf_dirs[family]
    args = [*COMMANDS[command], str(model)]
    if command != "info":
        args += [str(data_path), "--samples", "4"]
    if command == "saliency":
        args += ["--save-pruned", str(tmp_path / "pruned.safetensors")]
    if command in ("spectrum", "landscape"):
        args += ["--plot", str(tmp_path / "plot.png")]
    return runner.invoke(app, [*args, "--json"])


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("family", FAMILIES)
def test_cli_commands(runner, hf_dirs, family, command, tmp_path):
    result = run_command(runner, hf_dirs, family, command, tmp_path)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    if command == "saliency":  # the pruned checkpoint reloads by itself (config in metadata)
        pruned = load_model(tmp_path / "pruned.safetensors")
        assert pruned.arch == doc["model"]["arch"] and pruned.arch_source == "metadata"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cli_lora_with_peft_adapter(runner, hf_dirs, family, tmp_path):
    peft = pytest.importorskip("peft")
    model_dir, data_path = hf_dirs[family]
    targets = ["c_attn", "c_fc"] if family == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets)
    wrapped = peft.get_peft_model(build(family), config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    wrapped.save_pretrained(str(tmp_path / "ad"))
    args = ["lora", str(tmp_path / "ad"), str(model_dir), str(data_path), "--json"]
    result = runner.invoke(app, [*args, "--samples", "4"])
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------------------ checkpoints
def test_sharded_checkpoint(tmp_path):
    model_dir, _ = save("llama", tmp_path, max_shard_size="8KB")
    assert (model_dir / "model.safetensors.index.json").is_file()
    assert len(list(model_dir.glob("model-*.safetensors"))) > 1
    lm = load_model(model_dir)
    ref = build("llama").state_dict()
    for k, v in lm.model.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=0)
    assert lm.path.name == "model.safetensors.index.json" and len(lm.sha256) == 64
    # a missing shard is a clear error
    next(model_dir.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(Exception, match="listed in the index are missing"):
        load_model(model_dir)


def test_bare_model_layout_gets_the_prefix(tmp_path):
    """The original hub gpt2 files hold GPT2Model keys (no ``transformer.`` prefix)."""
    model = build("gpt2")
    model.transformer.save_pretrained(str(tmp_path / "body"))
    cfg = json.loads((tmp_path / "body" / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "body" / "config.json").write_text(json.dumps(cfg))
    lm = load_model(tmp_path / "body")
    ids = data("gpt2")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, model(ids).logits)


def test_no_architectures_picks_the_class_that_fits(tmp_path):
    model_dir, _ = save("bert", tmp_path)
    cfg = json.loads((model_dir / "config.json").read_text())
    del cfg["architectures"]
    (model_dir / "config.json").write_text(json.dumps(cfg))
    assert load_model(model_dir).arch == "hf:BertForSequenceClassification"
    lm = load_model(model_dir, arch="hf:BertForSequenceClassification")
    assert lm.arch_source == "--arch"


def test_auto_map_is_refused(runner, tmp_path):
    model_dir, data_path = save("gpt2", tmp_path)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    result = runner.invoke(app, ["trace", str(model_dir), str(data_path)])
    assert result.exit_code == 2
    assert "auto_map" in result.stderr and "--arch" in result.stderr
    assert "Traceback" not in result.output


def test_without_transformers_one_line_error(runner, tmp_path, monkeypatch):
    model_dir, data_path = save("gpt2", tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    result = runner.invoke(app, ["trace", str(model_dir), str(data_path)])
    assert result.exit_code == 2
    assert 'pip install "gmcurv[hf]"' in result.stderr
    assert "Traceback" not in result.output


def test_unknown_head_is_refused(tmp_path):
    model = build("gpt2").transformer  # GPT2Model: hidden states, no logits
    model.save_pretrained(str(tmp_path / "bare"))
    with pytest.raises(ArchitectureError, match="no head whose loss gmcurv knows"):
        load_model(tmp_path / "bare")
