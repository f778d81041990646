"""gmcurv's GPT-2: the function it computes, Hugging Face checkpoints, curvature products.

Without `transformers`: a plain re-derivation of GPT-2 from the checkpoint tensors (HF
Conv1D layout, explicit causal softmax, the tanh GELU formula) is the oracle. With it
(optional dev dependency): ``save_pretrained`` checkpoints load with the same logits and
loss to 1e-5. Hessian and GGN products on a tiny GPT-2 equal dense float64 matrices.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest
import torch
from oracles import dense_ggn, dense_hessian
from safetensors.torch import save_file
from torch.nn.attention import SDPBackend, sdpa_kernel

from gmcurv.checkpoint import gmcurv_metadata, load_model, read_header, save_checkpoint
from gmcurv.cli.app import app
from gmcurv.data import Batch, load_data
from gmcurv.errors import ArchitectureError, DataError
from gmcurv.hessian import CurvatureOperator, batch_ggnvp, batch_hvp
from gmcurv.models.gpt2 import (
    GPT2BareLMHeadModel,
    GPT2Config,
    GPT2LMHeadModel,
    build_gpt2,
    from_hf_state_dict,
    to_hf_state_dict,
)
from gmcurv.objective import Objective
from gmcurv.results import report_schema
from gmcurv.samples import sample_data, sample_model

SMALL = GPT2Config(vocab_size=13, n_positions=10, n_embd=12, n_layer=2, n_head=3)


def _model(cfg=SMALL, seed=0, cls=GPT2LMHeadModel, dtype=torch.float64):
    torch.manual_seed(seed)
    model = cls(cfg).to(dtype)
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def _ids(n=3, t=8, vocab=13, seed=0):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def reference_logits(state: dict, cfg: GPT2Config, ids: torch.Tensor, mask=None) -> torch.Tensor:
    """GPT-2 written out from HF-layout tensors (``x @ W + b`` with ``W: [in, out]``)."""
    p = "transformer." if any(k.startswith("transformer.") for k in state) else ""
    n, t = ids.shape
    e, h = cfg.n_embd, cfg.n_head

    def ln(x, name):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + cfg.layer_norm_epsilon) * state[
            name + ".weight"
        ] + state[name + ".bias"]

    def conv1d(x, name):
        return x @ state[name + ".weight"] + state[name + ".bias"]

    def act(x):
        if cfg.activation_function == "relu":
            return x.clamp_min(0)
        if cfg.activation_function == "gelu":  # exact, erf-based
            return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
        assert cfg.activation_function == "gelu_new"
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    allowed = torch.tril(torch.ones(t, t, dtype=torch.bool))
    if mask is not None:
        allowed = allowed & mask.bool()[:, None, None, :]
    x = state[p + "wte.weight"][ids] + state[p + "wpe.weight"][torch.arange(t)]
    for layer in range(cfg.n_layer):
        b = f"{p}h.{layer}."
        q, k, v = conv1d(ln(x, b + "ln_1"), b + "attn.c_attn").split(e, dim=-1)
        q, k, v = (z.reshape(n, t, h, e // h).transpose(1, 2) for z in (q, k, v))
        scale = 1 / math.sqrt(e // h) if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= layer + 1
        scores = (q @ k.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, t, e)
        x = x + conv1d(att, b + "attn.c_proj")
        x = x + conv1d(act(conv1d(ln(x, b + "ln_2"), b + "mlp.c_fc")), b + "mlp.c_proj")
    return ln(x, p + "ln_f") @ state[p + "wte.weight"].T


# ------------------------------------------------------------------------------ the function
@pytest.mark.parametrize("cls", [GPT2LMHeadModel, GPT2BareLMHeadModel])
def test_logits_match_a_plain_reference_in_hf_layout(cls):
    model = _model(cls=cls)
    state = to_hf_state_dict(model)
    prefix = "transformer." if cls is GPT2LMHeadModel else ""
    # parameters in nn.Linear layout [out, in]; HF Conv1D layout [in, out]; tied head left out
    assert model.get_parameter(prefix + "h.0.attn.c_attn.weight").shape == (36, 12)
    assert state[prefix + "h.0.attn.c_attn.weight"].shape == (12, 36)
    assert state[prefix + "h.0.mlp.c_proj.weight"].shape == (48, 12)
    assert "lm_head.weight" not in state
    ids = _ids()
    torch.testing.assert_close(model(ids), reference_logits(state, SMALL, ids), rtol=1e-12, atol=0)


def test_attention_mask_hides_padding():
    model = _model()
    ids = _ids(n=2, t=8)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 5:] = 0  # right padding
    mask[1, :2] = 0  # left padding
    out = model(ids, attention_mask=mask)
    ref = reference_logits(to_hf_state_dict(model), SMALL, ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-12, atol=1e-12)
    assert torch.isfinite(out).all()  # fully masked rows stay finite
    # right padding changes nothing before it
    torch.testing.assert_close(out[0, :5], model(ids[:1, :5])[0], rtol=1e-12, atol=1e-12)


def test_tied_head_and_state_dict_round_trip():
    model = _model()
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names
    other = _model(seed=1)
    result = other.load_state_dict(from_hf_state_dict(other, to_hf_state_dict(model)), strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys  # tied
    ids = _ids()
    torch.testing.assert_close(other(ids), model(ids), rtol=0, atol=0)


@pytest.mark.parametrize(
    "change",
    [
        {"activation_function": "relu"},
        {"activation_function": "gelu"},
        {"scale_attn_by_inverse_layer_idx": True},
        {"scale_attn_weights": False},
        {"n_inner": 20},
        {"layer_norm_epsilon": 0.1},
    ],
)
def test_config_variants_match_the_reference(change):
    cfg = replace(SMALL, **change)
    model = _model(cfg)
    ids = _ids()
    torch.testing.assert_close(model(ids), reference_logits(to_hf_state_dict(model), cfg, ids))


def test_long_sequences_and_float_inputs_are_refused():
    model = _model()
    with pytest.raises(ValueError, match="n_positions"):
        model(_ids(t=11))
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.zeros(2, 4))


# ----------------------------------------------------------------------------- checkpoints
def _write_hf_dir(path: Path, model, config: dict | None = None, extra=None, drop=()):
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in to_hf_state_dict(model).items() if k not in drop}
    state.update(extra or {})
    save_checkpoint(path / "model.safetensors", state, {"format": "pt"})
    cfg = config if config is not None else model.config.to_dict()
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("cls", [GPT2LMHeadModel, GPT2BareLMHeadModel])
def test_directory_with_config_json_loads(tmp_path, cls):
    model = _model(cls=cls, dtype=torch.float32)
    path = _write_hf_dir(tmp_path / "m", model)
    keys = read_header(path / "model.safetensors").shapes
    assert "lm_head.weight" not in keys  # tied: stored once, as wte
    loaded = load_model(path)
    assert (loaded.arch_source, loaded.loss) == ("config.json", "next_token")
    assert loaded.arch == "gpt2:n_head=3"  # a family spec that rebuilds it without config.json
    assert type(loaded.model) is cls
    ids = _ids()
    torch.testing.assert_close(loaded.model(ids), model(ids), rtol=0, atol=0)
    assert loaded.n_params == sum(p.numel() for p in model.parameters())


def test_legacy_buffers_and_explicit_lm_head_are_accepted(tmp_path):
    model = _model(cls=GPT2BareLMHeadModel, dtype=torch.float32)
    t = SMALL.n_positions
    extra = {
        f"h.{i}.attn.bias": torch.tril(torch.ones(t, t)).view(1, 1, t, t) for i in range(2)
    } | {f"h.{i}.attn.masked_bias": torch.tensor(-1e4) for i in range(2)}
    path = tmp_path / "legacy"
    path.mkdir()
    state = to_hf_state_dict(model)
    state["lm_head.weight"] = state["wte.weight"].clone()  # both names present
    save_file({**state, **extra}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(model.config.to_dict()))
    ids = _ids()
    torch.testing.assert_close(load_model(path).model(ids), model(ids), rtol=0, atol=0)


def test_untied_head(tmp_path):
    cfg = replace(SMALL, tie_word_embeddings=False)
    model = _model(cfg, cls=GPT2LMHeadModel, dtype=torch.float32)
    assert model.lm_head.weight is not model.transformer.wte.weight
    path = _write_hf_dir(tmp_path / "untied", model)
    ids = _ids()
    torch.testing.assert_close(load_model(path).model(ids), model(ids), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"n_embd": 16}, "n_embd=16"),
        ({"n_layer": 3}, "n_layer=3"),
        ({"vocab_size": 50257}, "vocab_size=50257"),
        ({"activation_function": "swiglu"}, "not supported"),
        ({"add_cross_attention": True}, "cross-attention"),
        ({"n_head": 5}, "not divisible"),
    ],
)
def test_bad_configs_are_errors(tmp_path, config, message):
    model = _model(dtype=torch.float32)
    path = _write_hf_dir(tmp_path / "bad", model, {**model.config.to_dict(), **config})
    with pytest.raises(ArchitectureError, match=message):
        load_model(path)


def test_gmcurv_written_checkpoints_keep_parameter_layout(tmp_path):
    """What gmcurv writes (e.g. pruned models): parameters as they are + the family spec."""
    cfg = replace(SMALL, activation_function="relu", layer_norm_epsilon=1e-3)
    model = _model(cfg, dtype=torch.float32)
    spec = model.arch_spec
    assert spec == "gpt2:n_head=3,activation_function=relu,layer_norm_epsilon=0.001"
    path = tmp_path / "own.safetensors"  # no config.json beside it
    save_checkpoint(path, model.state_dict(), gmcurv_metadata(spec, "next_token"))
    loaded = load_model(path)
    assert (loaded.arch, loaded.arch_source, loaded.loss) == (spec, "metadata", "next_token")
    assert loaded.model.config == model.config
    ids = _ids()
    torch.testing.assert_close(loaded.model(ids), model(ids), rtol=0, atol=0)


def test_not_a_gpt2_checkpoint():
    with pytest.raises(ArchitectureError, match="not a GPT-2 checkpoint"):
        build_gpt2({"n_head": 2}, {"fc.weight": (3, 4)}, "x.safetensors")


def test_missing_config_fields_come_from_shapes(tmp_path):
    model = _model(dtype=torch.float32)
    path = _write_hf_dir(tmp_path / "m", model, {"model_type": "gpt2", "n_head": 3})
    loaded = load_model(path)
    assert loaded.model.config == model.config
    ids = _ids()
    torch.testing.assert_close(loaded.model(ids), model(ids), rtol=0, atol=0)


def test_too_long_token_data_is_a_data_error(tmp_path):
    model = _model(dtype=torch.float32)
    obj = Objective.build(model, "next_token")
    save_file({"input_ids": _ids(t=12)}, str(tmp_path / "long.safetensors"))
    with pytest.raises(DataError, match="n_positions"):
        obj.check_data(load_data(tmp_path / "long.safetensors"))


# ---------------------------------------------------------------------- curvature products
TINY = GPT2Config(vocab_size=7, n_positions=6, n_embd=4, n_layer=1, n_head=2)


@pytest.fixture(scope="module")
def tiny_problem():
    """A ~300-parameter GPT-2, its batch and the dense Hessian / GGN (float64)."""
    model = _model(TINY)
    obj = Objective.build(model, "next_token")
    ids = _ids(n=3, t=5, vocab=7, seed=4)
    ids[1, 0] = 3
    labels = ids.clone()
    labels[2, 3] = -100  # an ignored position
    batch = Batch(ids, labels, 0)
    # plain double backward needs the math kernel (and vmap is faster with it)
    with sdpa_kernel([SDPBackend.MATH]):
        return obj, batch, dense_hessian(obj, batch), dense_ggn(obj, batch)


def test_hvp_matches_dense_hessian(tiny_problem):
    obj, batch, H, _ = tiny_problem
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-12)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(obj.space.size, generator=g, dtype=torch.float64)
        want = H @ v
        for forward in (True, False):
            got = obj.space.flatten(batch_hvp(obj, batch, obj.space.unflatten(v), forward))
            torch.testing.assert_close(got / len(batch), want, rtol=1e-10, atol=1e-12)


def test_ggnvp_matches_dense_ggn(tiny_problem):
    obj, batch, _, G = tiny_problem
    v = torch.randn(obj.space.size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for forward in (True, False):
        got = obj.space.flatten(batch_ggnvp(obj, batch, obj.space.unflatten(v), forward))
        torch.testing.assert_close(got / len(batch), G @ v, rtol=1e-10, atol=1e-12)


def test_curvature_operator_on_gpt2_uses_forward_mode(tiny_problem, tmp_path):
    """The operator streams batches; SDPA runs on the math kernel so forward mode works."""
    obj, batch, H, _ = tiny_problem
    save_file({"input_ids": batch.inputs, "labels": batch.targets}, str(tmp_path / "t.safetensors"))
    data = load_data(tmp_path / "t.safetensors")
    op = CurvatureOperator(obj, data, batch_size=2, kind="hessian")
    v = torch.randn(obj.space.size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), H @ v, rtol=1e-10, atol=1e-12)
    assert op.forward_mode and op.n_matvecs == 1


# ------------------------------------------------------------------------- bundled sample
def test_bundled_tiny_gpt_sample():
    path = sample_model("tiny_gpt")
    card = (path.parent / "MODEL_CARD.md").read_text()
    header = read_header(path)
    assert header.metadata == {"format": "pt"}  # no gmcurv metadata: config.json is used
    loaded = load_model(path.parent)
    assert (loaded.arch_source, loaded.loss) == ("config.json", "next_token")
    data = load_data(sample_data("tiny_gpt"))
    obj = Objective.build(loaded.model, loaded.loss)
    obj.check_data(data)
    batch = data.first(data.n, obj.device, obj.dtype)
    with torch.no_grad():
        loss = float(obj.per_example_loss(batch).mean())
    # the model card's training-window loss, and far below a uniform guess
    assert f"{loss:.4f}" in card
    assert loss < 0.5 * math.log(loaded.model.config.vocab_size)
    vocab = json.loads((path.parent / "vocab.json").read_text())
    assert len(vocab) == loaded.model.config.vocab_size
    sizes = sum(f.stat().st_size for f in path.parent.rglob("*") if f.is_file())
    assert sizes < 5e6


def test_sample_through_the_cli(runner):
    model_dir = sample_model("tiny_gpt").parent
    info = runner.invoke(app, ["info", str(model_dir), "--json"])
    assert info.exit_code == 0, info.output
    doc = json.loads(info.stdout)
    jsonschema.validate(doc, report_schema())
    assert doc["model"]["arch"] == "gpt2:n_head=4" and doc["model"]["loss"] == "next_token"
    trace = runner.invoke(
        app,
        ["trace", str(model_dir), str(sample_data("tiny_gpt")), "--json", "--samples", "16"],
    )
    assert trace.exit_code == 0, trace.output
    doc = json.loads(trace.stdout)
    jsonschema.validate(doc, report_schema())
    fisher = doc["results"]["fisher"]
    assert fisher["per_layer"]["transformer.wte"]["kind"] == "tied"
    assert fisher["per_layer"]["transformer.h.0.attn.c_attn"]["kind"] == "linear"
    assert not any("no decomposed form" in w for w in doc["warnings"])


def test_saliency_prune_round_trip(runner, tmp_path):
    """``gmcurv saliency --prune`` on the sample: the pruned file reloads (without
    config.json) with its masks' zeros in place, including the Conv1D-stored weights."""
    from gmcurv.cli.app import _available  # commands load lazily: ask for the module

    if not _available("saliency"):
        pytest.skip("gmcurv saliency is not available in this build")
    model_dir, data = sample_model("tiny_gpt").parent, sample_data("tiny_gpt")
    out = tmp_path / "pruned.safetensors"
    args = ["saliency", str(model_dir), str(data), "--samples", "32", "--prune", "0.3"]
    result = runner.invoke(app, [*args, "--rounds", "2", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    pruned = load_model(out)
    assert pruned.arch == "gpt2:n_head=4" and pruned.arch_source == "metadata"
    params = dict(pruned.model.named_parameters())
    conv1d = [k for k in pruned.masks if "c_attn" in k or "c_fc" in k]
    assert conv1d, sorted(pruned.masks)
    removed = 0
    for name, keep in pruned.masks.items():
        assert keep.shape == params[name].shape
        assert bool((params[name][keep == 0] == 0).all()), name
        removed += int((keep == 0).sum())
    assert removed > 0.25 * sum(params[k].numel() for k in pruned.masks)
    trace = runner.invoke(app, ["trace", str(out), str(data), "--samples", "8", "--json"])
    assert trace.exit_code == 0, trace.output


def test_memory_preflight_names_the_fix(runner):
    model_dir = sample_model("tiny_gpt").parent
    args = ["trace", str(model_dir), str(sample_data("tiny_gpt"))]
    small = runner.invoke(app, [*args, "--max-memory", "20MB"])
    assert small.exit_code == 2 and "--batch-size" in small.stderr, small.output
    kept = runner.invoke(app, [*args, "--max-memory", "60MB", "--batch-size", "8"])
    assert kept.exit_code == 2 and "--samples" in kept.stderr, kept.output
    exact = runner.invoke(app, [*args, "--fisher", "exact", "--samples", "8"])
    assert exact.exit_code == 2 and "--fisher mc or empirical" in exact.stderr, exact.output
    assert "Traceback" not in small.output + kept.output + exact.output


# ---------------------------------------------------------------- Hugging Face transformers
def _transformers():
    return pytest.importorskip("transformers")


def _hf_model(tf, **kw):
    cfg = tf.GPT2Config(
        n_embd=16, n_layer=2, n_head=4, n_positions=12, vocab_size=23, bos_token_id=0,
        eos_token_id=0, **kw,
    )  # fmt: skip
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("activation", ["gelu_new", "gelu", "relu"])
def test_save_pretrained_loads_with_same_logits_and_loss(tmp_path, activation):
    tf = _transformers()
    hf = _hf_model(tf, activation_function=activation)
    with torch.no_grad():  # make biases and norms non-trivial
        for name, p in hf.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    loaded = load_model(tmp_path / "hf")
    assert loaded.loss == "next_token"
    ids = _ids(n=4, t=12, vocab=23, seed=5)
    with torch.no_grad():
        ref = hf(ids, labels=ids)
        out = loaded.model(ids)
        obj = Objective.build(loaded.model, loaded.loss)
        loss = obj.per_example_loss(Batch(ids, None, 0)).mean()
    torch.testing.assert_close(out, ref.logits, rtol=1e-5, atol=1e-5)
    assert float(loss) == pytest.approx(float(ref.loss), abs=1e-5)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    with torch.no_grad():
        ref_masked = hf(ids, attention_mask=mask).logits
        out_masked = loaded.model(ids, attention_mask=mask)
    torch.testing.assert_close(
        out_masked[mask.bool()], ref_masked[mask.bool()], rtol=1e-5, atol=1e-5
    )


def test_gpt2model_layout_without_prefix(tmp_path):
    tf = _transformers()
    hf = _hf_model(tf)
    hf.transformer.save_pretrained(tmp_path / "body")  # GPT2Model: keys without prefix
    keys = read_header(tmp_path / "body" / "model.safetensors").shapes
    assert "wte.weight" in keys and not any(k.startswith("transformer.") for k in keys)
    loaded = load_model(tmp_path / "body")
    assert isinstance(loaded.model, GPT2BareLMHeadModel)
    ids = _ids(n=2, t=12, vocab=23, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_transformers_loads_the_bundled_sample():
    tf = _transformers()
    model_dir = sample_model("tiny_gpt").parent
    hf = tf.GPT2LMHeadModel.from_pretrained(model_dir).eval()
    ids = load_data(sample_data("tiny_gpt")).first(4).inputs
    with torch.no_grad():
        torch.testing.assert_close(
            load_model(model_dir).model(ids), hf(ids).logits, rtol=1e-5, atol=1e-5
        )
