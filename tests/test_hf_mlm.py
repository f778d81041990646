"""BERT masked LM as users save it: the decoder tied to the word embeddings, its bias
registered on the head (``cls.predictions.bias``), labels ``-100`` except masked tokens.

Oracles (float64): per-example gradients by autograd, one example at a time; the model's own
``outputs.loss``; and the mean of per-example token means when examples score different
numbers of tokens (then a warning says the two losses differ).
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from gmcurv.batch import Batch
from gmcurv.capture import Capturer
from gmcurv.capture.plan import plan_capture
from gmcurv.cli.app import app
from gmcurv.io.checkpoint import load_model
from gmcurv.losses.cross_entropy import CrossEntropy
from gmcurv.objective import Objective

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::gmcurv.errors.GmcurvWarning")
V, T, N = 29, 8, 6


def _model():
    cfg = transformers.BertConfig(
        vocab_size=V,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    with contextlib.redirect_stderr(io.StringIO()):
        model = transformers.BertForMaskedLM(cfg)
    model.config._attn_implementation = "eager"
    return model.eval()


def _batch(equal: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, V, (N, T), generator=g)
    labels = torch.full_like(ids, -100)
    for n in range(N):
        k = 2 if equal else 1 + n % 3  # masked tokens of example n
        pos = torch.randperm(T, generator=g)[:k]
        labels[n, pos] = ids[n, pos]
        ids[n, pos] = 3  # the [MASK] id
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.fixture(scope="module")
def mlm(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlm")
    with contextlib.redirect_stderr(io.StringIO()):
        _model().save_pretrained(str(root / "model"))
    for equal in (True, False):
        save_file(_batch(equal), str(root / f"data-{'equal' if equal else 'uneven'}.safetensors"))
    return root


def test_tied_decoder_is_captured_decomposed(mlm):
    """The head's re-registered bias does not turn the tied embedding/decoder into a dense
    block; per-example gradients equal autograd's, one example at a time."""
    lm = load_model(mlm / "model", dtype=torch.float64)
    obj = Objective.build(lm.model, lm.loss)
    kinds = {p.name: p.kind for p in plan_capture(obj.model, obj.params)}
    assert kinds["bert.embeddings.word_embeddings"] == "tied"
    assert "dense" not in kinds.values()
    b = _batch(equal=False)
    labels = b.pop("labels")
    batch = Batch(b, labels, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no dense fallback from the self-check
        cap = Capturer(obj, "empirical")
        dg = cap(batch)
    assert not cap.fallbacks
    params = obj.params
    for e in range(N):
        one = Batch({k: v[e : e + 1] for k, v in b.items()}, labels[e : e + 1], 0)
        loss = obj.per_example_loss(one)[0]
        ref = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
        for block in dg.blocks:
            got = block.source.materialize(slice(e, e + 1))
            for name in block.params:
                torch.testing.assert_close(got[name][0, 0], ref[name], rtol=1e-8, atol=1e-10)


def _trace(runner, mlm, data: str):
    args = ["trace", str(mlm / "model"), str(mlm / data), "--dtype", "float64", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _own_losses(equal: bool) -> tuple[float, float]:
    """(``outputs.loss``, the mean over examples of each example's mean token loss)."""
    model = _model().double()
    b = _batch(equal)
    with torch.no_grad():
        out = model(**b)
    ce = torch.nn.functional.cross_entropy(
        out.logits.transpose(1, 2), b["labels"], reduction="none", ignore_index=-100
    )
    valid = (b["labels"] != -100).double()
    per_example = (ce * valid).sum(1) / valid.sum(1)
    return float(out.loss), float(per_example.mean())


def test_cli_loss_equals_outputs_loss_when_token_counts_agree(runner, mlm):
    doc = _trace(runner, mlm, "data-equal.safetensors")
    own, _ = _own_losses(equal=True)
    assert doc["results"]["loss"]["value"] == pytest.approx(own, rel=1e-10)
    assert doc["config"]["loss"] == "cross_entropy" and doc["config"]["label_shift"] is False
    assert not any("tokens" in w or "densely" in w for w in doc["warnings"])
    assert doc["results"]["fisher"]["self_check"]["dense_fallbacks"] == []


def test_cli_says_when_examples_score_different_token_counts(runner, mlm):
    doc = _trace(runner, mlm, "data-uneven.safetensors")
    own, per_example = _own_losses(equal=False)
    assert doc["results"]["loss"]["value"] == pytest.approx(per_example, rel=1e-10)
    assert abs(own - per_example) > 1e-6  # the two definitions really differ here
    (w,) = [w for w in doc["warnings"] if "tokens" in w]
    assert "between 1 and 3 tokens" in w and "outputs.loss" in w


def test_valid_tokens_counts_after_the_shift():
    t = torch.tensor([[5, 6, 7, -100], [5, -100, -100, -100]])
    assert CrossEntropy().valid_tokens(t).tolist() == [3, 1]
    assert CrossEntropy(shift=True).valid_tokens(t).tolist() == [2, 0]
    assert CrossEntropy().valid_tokens(torch.tensor([1, 2])) is None


def test_transformers_import_is_start_up_with_a_spinner(runner, mlm):
    """A Hugging Face checkpoint's model code is imported during start-up, under a
    spinner that says so; the load that follows only builds and reads."""
    from gmcurv.cli import progress

    with progress.recording() as rec:
        _trace(runner, mlm, "data-equal.safetensors")
    labels = [p.label for p in rec.phases]
    assert labels[:2] == ["starting up (importing transformers)", "loading the model and data"]
