"""Adapters written by ``peft`` itself load and land on the right base layers.

Optional: skipped unless ``peft`` is importable (``pip install --no-deps peft accelerate
psutil``); the GPT-2 cases also need ``transformers``. The reference is peft's own forward
pass (and ``merge_and_unload``); gmcurv's side is ``functional_call`` with ``W + dθ`` on the
model gmcurv loads from the base checkpoint.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call

from gmcurv.io.adapter import read_adapter
from gmcurv.io.checkpoint import load_model
from gmcurv.io.samples import sample_model
from gmcurv.lora.mapping import attach, update_direction
from gmcurv.objective import output_tensor

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::gmcurv.errors.GmcurvWarning")


def _randomise_lora(model, seed=0):
    """peft initialises B = 0 (a zero update); give every factor random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _merged_forward(base, adapter, x):
    ups = attach(adapter, base)
    params = dict(base.named_parameters())
    dtheta = update_direction(ups, torch.float64)
    merged = {k: params[k] + v.to(params[k].dtype) for k, v in dtheta.items()}
    with torch.no_grad():
        return output_tensor(functional_call(base, merged, (x,))), ups


def test_peft_adapter_on_the_digits_mlp(tmp_path):
    base = load_model(sample_model()).model
    config = peft.LoraConfig(
        r=3,
        lora_alpha=5,
        target_modules=["net.0", "net.4"],
        rank_pattern={"net.4": 2},
        alpha_pattern={"net.0": 7},
    )
    wrapped = peft.get_peft_model(copy.deepcopy(base), config)
    _randomise_lora(wrapped)
    wrapped.eval()
    wrapped.save_pretrained(str(tmp_path / "ad"))
    ad = read_adapter(tmp_path / "ad")
    assert sorted(ad.layers) == ["net.0", "net.4"]
    assert ad.layers["net.4"].rank == 2 and ad.layers["net.0"].scale == pytest.approx(7 / 3)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    ours, ups = _merged_forward(base, ad, x)
    assert {u.param for u in ups} == {"net.0.weight", "net.4.weight"}
    with torch.no_grad():
        theirs = wrapped(x)
        assert not torch.allclose(theirs, base(x), atol=1e-3)  # the adapter does something
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    merged = wrapped.merge_and_unload()
    d = update_direction(ups, torch.float64)
    for name, delta in d.items():
        ref = merged.state_dict()[name] - base.state_dict()[name]
        torch.testing.assert_close(delta.float(), ref, rtol=1e-5, atol=1e-6)


@pytest.fixture
def hf_gpt2(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=13, n_positions=8, n_embd=8, n_layer=2, n_head=2, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(str(tmp_path / "base"), safe_serialization=True)
    return model, tmp_path / "base"


def test_peft_adapter_on_hf_gpt2_conv1d_layers(tmp_path, hf_gpt2):
    """fan_in_fan_out adapters for HF's Conv1D land on its [in, out] weights."""
    model, base_dir = hf_gpt2
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
        use_rslora=True,
    )  # fmt: skip
    wrapped = peft.get_peft_model(copy.deepcopy(model), config)
    _randomise_lora(wrapped, seed=1)
    wrapped.eval()
    wrapped.save_pretrained(str(tmp_path / "ad"))
    ad = read_adapter(tmp_path / "ad")
    assert ad.config.fan_in_fan_out and len(ad.layers) == 2 * 3 + 2  # attn c_attn/c_proj, mlp
    base = load_model(base_dir).model
    ids = torch.randint(0, 13, (3, 7), generator=torch.Generator().manual_seed(2))
    ours, ups = _merged_forward(base, ad, ids)
    assert all(u.kind == "matrix" and u.param == f"{u.module}.weight" for u in ups)
    with torch.no_grad():
        theirs = wrapped(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_peft_embedding_adapter_on_tied_gpt2(tmp_path, hf_gpt2):
    """An embedding LoRA on a tied table: gmcurv applies dθ to the shared parameter, which
    is what peft's merge does."""
    model, base_dir = hf_gpt2
    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["wte", "c_fc"])
    wrapped = peft.get_peft_model(copy.deepcopy(model), config)
    _randomise_lora(wrapped, seed=3)
    wrapped.save_pretrained(str(tmp_path / "ad"))
    ad = read_adapter(tmp_path / "ad")
    assert ad.layers["transformer.wte"].kind == "embedding"
    base = load_model(base_dir).model
    ids = torch.randint(0, 13, (2, 6), generator=torch.Generator().manual_seed(4))
    ours, _ = _merged_forward(base, ad, ids)
    merged = wrapped.merge_and_unload().eval()
    with torch.no_grad():
        theirs = merged(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
