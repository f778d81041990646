"""GPT-2 through `transformers`: curvature products against dense oracles, padding and
ignored labels, and the bundled ``tiny_gpt`` sample (a ``save_pretrained`` directory).

(Ported from the tests of gmcurv's former own GPT-2 implementation.)
"""

from __future__ import annotations

import json
import math

import jsonschema
import pytest
import torch
from oracles import dense_ggn, dense_hessian
from safetensors.torch import save_file

from gmcurv.batch import Batch
from gmcurv.cli.app import app
from gmcurv.io.checkpoint import load_model
from gmcurv.io.data import load_data
from gmcurv.io.samples import sample_data, sample_model
from gmcurv.io.tensors import read_header
from gmcurv.objective import Objective
from gmcurv.operator import CurvatureOperator
from gmcurv.products import batch_ggnvp, batch_hvp
from gmcurv.results import report_schema

transformers = pytest.importorskip("transformers")


def _ids(n=3, t=8, vocab=13, seed=0):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _hf_model(**kw):
    cfg = transformers.GPT2Config(
        n_embd=16, n_layer=2, n_head=4, n_positions=12, vocab_size=23, bos_token_id=0,
        eos_token_id=0, **kw,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


# ---------------------------------------------------------------------- curvature products
@pytest.fixture(scope="module")
def tiny_problem(tmp_path_factory):
    """A ~300-parameter GPT-2 loaded by gmcurv, a batch with an ignored label, and the dense
    Hessian / GGN (float64)."""
    cfg = transformers.GPT2Config(
        vocab_size=7, n_positions=6, n_embd=4, n_layer=1, n_head=2, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "gpt"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(path))
    lm = load_model(path, dtype=torch.float64)
    obj = Objective.build(lm.model, lm.loss)
    ids = _ids(n=3, t=5, vocab=7, seed=4)
    labels = ids.clone()
    labels[2, 3] = -100  # an ignored position
    batch = Batch(ids, labels, 0)
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


def test_curvature_operator_uses_forward_mode(tiny_problem, tmp_path):
    obj, batch, H, _ = tiny_problem
    save_file({"input_ids": batch.inputs, "labels": batch.targets}, str(tmp_path / "t.safetensors"))
    data = load_data(tmp_path / "t.safetensors")
    op = CurvatureOperator(obj, data, batch_size=2, kind="hessian")
    v = torch.randn(obj.space.size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), H @ v, rtol=1e-10, atol=1e-12)
    assert op.forward_mode and op.n_matvecs == 1


@pytest.mark.parametrize("activation", ["gelu_new", "relu"])
def test_logits_loss_and_padding_match_transformers(tmp_path, activation):
    hf = _hf_model(activation_function=activation)
    with torch.no_grad():  # make biases and norms non-trivial
        for name, p in hf.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")
    ids = _ids(n=4, t=12, vocab=23, seed=5)
    obj = Objective.build(loaded.model, loaded.loss)
    with torch.no_grad():
        ref = hf(ids, labels=ids)
        loss = obj.per_example_loss(Batch(ids, None, 0)).mean()
        torch.testing.assert_close(obj.outputs(ids), ref.logits, rtol=1e-5, atol=1e-5)
    assert abs(float(loss) - float(ref.loss)) <= 1e-6
    # padding: attention_mask reaches the model; padded labels are -100 (HF's collator)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, labels=labels)
        out = obj.outputs({"input_ids": ids, "attention_mask": mask})
        torch.testing.assert_close(out[mask.bool()], ref.logits[mask.bool()], rtol=1e-5, atol=1e-5)
        # per example: the mean over its valid tokens, as transformers computes it alone
        per = obj.per_example_loss(Batch({"input_ids": ids, "attention_mask": mask}, labels, 0))
        alone = hf(ids[:1, :8], labels=ids[:1, :8]).loss
        # without labels, padded positions are ignored by default (HF's LM collator)
        default = obj.per_example_loss(Batch({"input_ids": ids, "attention_mask": mask}, None, 0))
    assert abs(float(per[0]) - float(alone)) <= 1e-6
    torch.testing.assert_close(default, per, rtol=0, atol=0)


# ------------------------------------------------------------------------- bundled sample
def test_bundled_tiny_gpt_sample():
    path = sample_model("tiny_gpt")
    card = (path.parent / "MODEL_CARD.md").read_text()
    header = read_header(path)
    assert not any(k.startswith("gmcurv.") for k in header.metadata)  # config.json is used
    loaded = load_model(path.parent)
    assert (loaded.arch, loaded.arch_source, loaded.loss) == (
        "hf:GPT2LMHeadModel",
        "config.json",
        "next_token",
    )
    data = load_data(sample_data("tiny_gpt"))
    obj = Objective.build(loaded.model, loaded.loss)
    obj.check_data(data)
    batch = data.first(data.n, obj.device, obj.dtype)
    with torch.no_grad():
        loss = float(obj.per_example_loss(batch).mean())
        ref = float(loaded.model(batch.inputs, labels=batch.inputs).loss)
    assert abs(loss - ref) <= 1e-5  # equal-length windows: the library's own loss
    assert f"{loss:.4f}" in card  # the model card's training-window loss
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
    assert doc["model"]["arch"] == "hf:GPT2LMHeadModel" and doc["model"]["loss"] == "next_token"
    trace = runner.invoke(
        app,
        ["trace", str(model_dir), str(sample_data("tiny_gpt")), "--json", "--samples", "16"],
    )
    assert trace.exit_code == 0, trace.output
    doc = json.loads(trace.stdout)
    jsonschema.validate(doc, report_schema())
    fisher = doc["results"]["fisher"]
    assert fisher["per_layer"]["transformer.wte"]["kind"] == "tied"
    assert fisher["per_layer"]["transformer.h.0.attn.c_attn"]["kind"] == "conv1d"
    assert not any("no decomposed form" in w for w in doc["warnings"])


def test_saliency_prune_round_trip(runner, tmp_path):
    """``gmcurv saliency --prune`` on the sample: the pruned file reloads (without
    config.json: the config is in its metadata) with its masks' zeros in place."""
    model_dir, data = sample_model("tiny_gpt").parent, sample_data("tiny_gpt")
    out = tmp_path / "pruned.safetensors"
    args = ["saliency", str(model_dir), str(data), "--samples", "32", "--prune", "0.3"]
    result = runner.invoke(app, [*args, "--rounds", "2", "--save-pruned", str(out), "--json"])
    assert result.exit_code == 0, result.output
    pruned = load_model(out)
    assert pruned.arch == "hf:GPT2LMHeadModel" and pruned.arch_source == "metadata"
    params = dict(pruned.model.named_parameters())
    assert pruned.masks
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


def test_transformers_loads_the_bundled_sample():
    model_dir = sample_model("tiny_gpt").parent
    hf = transformers.GPT2LMHeadModel.from_pretrained(model_dir).eval()
    ids = load_data(sample_data("tiny_gpt")).first(4).inputs
    with torch.no_grad():
        torch.testing.assert_close(
            load_model(model_dir).model(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5
        )
