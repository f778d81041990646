"""Dense per-example gradients for a model whose forward branches on the data.

Hugging Face encoders test ``attention_mask.all()`` while building the mask, which ``vmap``
over examples cannot trace; the dense capture then takes the examples one at a time.
Oracle (float64): autograd on each example alone.
"""

from __future__ import annotations

import pytest
import torch
from hf_models import build, data
from torch import nn

from gmcurv.batch import Batch
from gmcurv.capture import Capturer
from gmcurv.capture.plan import plan_capture
from gmcurv.errors import UnsupportedError
from gmcurv.objective import Objective

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::gmcurv.errors.GmcurvWarning")


class CustomNorm(nn.LayerNorm):
    """A user's own norm (its forward is not LayerNorm's): no decomposed form."""

    def forward(self, x):
        return super().forward(x) * 1.0


def _bert_with_custom_norm(mode: str = "eval") -> Objective:
    model = build("bert").double()
    old = model.bert.embeddings.LayerNorm
    new = CustomNorm(old.normalized_shape, eps=old.eps).double()
    new.load_state_dict(old.state_dict())
    model.bert.embeddings.LayerNorm = new
    return Objective.build(model, "cross_entropy", mode=mode)


def _batch() -> Batch:
    b = data("bert")
    labels = b.pop("labels")
    return Batch(b, labels, 0)


def test_dense_block_of_an_encoder_with_attention_mask():
    obj = _bert_with_custom_norm()
    kinds = {p.name: p.kind for p in plan_capture(obj.model, obj.params)}
    assert kinds["bert.embeddings.LayerNorm"] == "dense"
    batch = _batch()
    dg = Capturer(obj, "empirical")(batch)
    (block,) = [b for b in dg.blocks if b.name == "bert.embeddings.LayerNorm"]
    assert block.kind == "dense"
    params = obj.params
    for e in range(dg.n):
        one = Batch({k: v[e : e + 1] for k, v in batch.inputs.items()}, batch.targets[e : e + 1], 0)
        loss = obj.per_example_loss(one)[0]
        ref = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
        got = block.source.materialize(slice(e, e + 1))
        for name in block.params:
            torch.testing.assert_close(got[name][0, 0], ref[name], rtol=1e-8, atol=1e-10)


def test_train_mode_still_refuses_with_a_hint():
    """Train mode: a loop would draw other dropout masks than the batch, so no fallback."""
    obj = _bert_with_custom_norm(mode="train")
    with pytest.raises(UnsupportedError) as err:
        Capturer(obj, "empirical")(_batch())
    assert "--mode eval" in err.value.hint
