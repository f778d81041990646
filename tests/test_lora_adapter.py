"""Reading PEFT adapters (layouts, config fields, malformed files), writing them back, and
mapping them onto base models (Linear, Conv2d, Embedding, HF-style Conv1D, tied weights)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from lora_fixtures import random_factors, write_peft_adapter
from models import TinyConv, seeded, tiny_gpt2
from models import mlp as mlp_model
from safetensors.torch import load_file, save_file
from torch import nn

from gmcurv.errors import GmcurvError, GmcurvWarning, UnsupportedError
from gmcurv.io.adapter import looks_like_adapter, read_adapter, write_adapter
from gmcurv.lora.adapter import AdapterError, make_adapter
from gmcurv.lora.features import adapter_features, canonical_adapter
from gmcurv.lora.mapping import attach, update_direction


@pytest.fixture
def model():
    return seeded(mlp_model)  # 0: Linear(5, 7), 2: Linear(7, 6), 4: Linear(6, 3)


def _write(tmp_path, model, modules=("0", "4"), r=2, alpha=4.0, name="ad", **kw):
    factors = random_factors(model, list(modules), r, dtype=torch.float64)
    return write_peft_adapter(tmp_path / name, factors, r, alpha, **kw), factors


def test_reads_peft_layout_scale_and_factors(tmp_path, model):
    path, factors = _write(tmp_path, model)
    ad = read_adapter(path)
    assert ad.name == "ad" and list(ad.layers) == ["0", "4"]
    for module, (B, A) in factors.items():
        layer = ad.layers[module]
        assert layer.kind == "linear" and layer.rank == 2 and layer.scale == 2.0
        assert torch.equal(layer.A, A) and torch.equal(layer.B, B)
    assert ad.n_params == sum(A.numel() + B.numel() for B, A in factors.values())
    assert looks_like_adapter(path) and not looks_like_adapter(tmp_path)


def test_default_infix_rslora_and_patterns(tmp_path, model):
    factors = {
        "0": random_factors(model, ["0"], 3)["0"],
        "2": random_factors(model, ["2"], 2)["2"],
    }
    path = write_peft_adapter(
        tmp_path / "p", factors, 2, 8, infix="default", use_rslora=True,
        rank_pattern={"^0$": 3}, alpha_pattern={"2": 5},
    )  # fmt: skip
    ad = read_adapter(path)
    assert ad.layers["0"].rank == 3 and ad.layers["0"].scale == pytest.approx(8 / math.sqrt(3))
    assert ad.layers["2"].alpha == 5 and ad.layers["2"].scale == pytest.approx(5 / math.sqrt(2))


def test_single_file_forms(tmp_path, model):
    path, _ = _write(tmp_path, model)
    # adapter_model.safetensors named directly, config beside it
    ad = read_adapter(path / "adapter_model.safetensors")
    assert list(ad.layers) == ["0", "4"] and ad.name == "adapter_model"
    # a gmcurv export: one file with the config in its header
    out = write_adapter(read_adapter(path), tmp_path / "one.safetensors")
    assert looks_like_adapter(out)
    again = read_adapter(out)
    assert again.config.r == 2 and again.config.lora_alpha == 4.0
    for m in ad.layers:
        assert torch.equal(again.layers[m].A, ad.layers[m].A)


def test_write_adapter_directory_is_peft_layout(tmp_path, model):
    path, _ = _write(tmp_path, model)
    ad = read_adapter(path)
    out = tmp_path / "canon"
    weights = write_adapter(canonical_adapter(ad), out)
    assert weights == out / "adapter_model.safetensors"
    keys = set(load_file(str(weights)))
    assert keys == {f"base_model.model.{m}.lora_{p}.weight" for m in ("0", "4") for p in "AB"}
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 4.0
    canon = read_adapter(out)
    for m, layer in ad.layers.items():
        B, A = layer.matrices()
        Bc, Ac = canon.layers[m].matrices()
        torch.testing.assert_close(Bc @ Ac, B @ A, rtol=0, atol=1e-12)
    before = adapter_features(ad).layers["0"].singular_values
    after = adapter_features(canon).layers["0"].singular_values
    assert [e.value for e in after] == pytest.approx([e.value for e in before], rel=1e-12)


def test_embedding_and_conv_layouts(tmp_path):
    conv = seeded(TinyConv)
    factors = random_factors(conv, ["c1", "c2"], 2, dtype=torch.float64)
    ad = read_adapter(write_peft_adapter(tmp_path / "conv", factors, 2, 2))
    assert {layer.kind for layer in ad.layers.values()} == {"conv2d"}
    ups = attach(ad, conv)
    d = update_direction(ups, torch.float64)
    B, A = factors["c1"]
    ref = (B.reshape(3, 2) @ A.reshape(2, -1)).reshape(conv.c1.weight.shape)
    torch.testing.assert_close(d["c1.weight"], ref, rtol=0, atol=1e-14)

    gpt = tiny_gpt2().double()
    factors = random_factors(gpt, ["transformer.wte"], 3, dtype=torch.float64)
    ad = read_adapter(
        write_peft_adapter(tmp_path / "emb", factors, 3, 3, embeddings=("transformer.wte",))
    )
    assert ad.layers["transformer.wte"].kind == "embedding"
    with pytest.warns(GmcurvWarning, match="shares its weight with lm_head"):
        ups = attach(ad, gpt)
    B, A = factors["transformer.wte"]
    d = update_direction(ups, torch.float64)
    torch.testing.assert_close(d["transformer.wte.weight"], (B @ A).T, rtol=0, atol=1e-14)


class HFConv1D(nn.Module):
    """Hugging Face's Conv1D: weight stored [in, out], y = x W + b."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out, dtype=torch.float64))
        self.bias = nn.Parameter(torch.zeros(n_out, dtype=torch.float64))

    def forward(self, x):
        return x @ self.weight + self.bias


def test_fan_in_fan_out_transposes_onto_conv1d_storage(tmp_path):
    base = nn.Sequential(HFConv1D(4, 6))
    factors = {"0": (torch.randn(6, 2, dtype=torch.float64), torch.randn(2, 4).double())}
    ad = read_adapter(write_peft_adapter(tmp_path / "f", factors, 2, 2, fan_in_fan_out=True))
    d = update_direction(attach(ad, base), torch.float64)
    B, A = factors["0"]
    torch.testing.assert_close(d["0.weight"], (B @ A).T, rtol=0, atol=1e-14)
    # transformers' GPT-2 Conv1D ([in, out]): transposed, as peft applies it
    gpt = tiny_gpt2().double()
    mod = "transformer.h.0.attn.c_attn"
    factors = random_factors(gpt, [mod], 2, dtype=torch.float64)
    for fan_in_fan_out in (True, False):  # peft forces True on Conv1D
        path = tmp_path / f"g{fan_in_fan_out}"
        ad = read_adapter(write_peft_adapter(path, factors, 2, 2, fan_in_fan_out=fan_in_fan_out))
        d = update_direction(attach(ad, gpt), torch.float64)
        B, A = factors[mod]
        torch.testing.assert_close(d[f"{mod}.weight"], (B @ A).T, rtol=0, atol=1e-14)


def test_prefix_tolerant_mapping(tmp_path):
    """An adapter saved from GPT2LMHeadModel (transformer.h...) fits a bare GPT-2 body."""
    gpt = tiny_gpt2().double()
    bare = gpt.transformer  # GPT2Model: keys without the prefix
    factors = random_factors(gpt, ["transformer.h.1.mlp.c_fc"], 2, dtype=torch.float64)
    ad = read_adapter(write_peft_adapter(tmp_path / "a", factors, 2, 2))
    (u,) = attach(ad, bare)
    assert u.target == "h.1.mlp.c_fc" and u.param == "h.1.mlp.c_fc.weight"


# ------------------------------------------------------------------------------- malformed
def _expect(exc, match, fn, *args):
    with pytest.raises(exc, match=match) as info:
        fn(*args)
    assert isinstance(info.value, GmcurvError) and info.value.hint
    return info.value


def test_missing_config(tmp_path, model):
    path, _ = _write(tmp_path, model, config=False)
    _expect(AdapterError, "missing adapter_config.json", read_adapter, path)


def test_missing_weights_and_pickle(tmp_path, model):
    path, _ = _write(tmp_path, model)
    (path / "adapter_model.safetensors").unlink()
    _expect(AdapterError, "no adapter_model.safetensors", read_adapter, path)
    (path / "adapter_model.bin").write_bytes(b"\x80")
    _expect(AdapterError, "pickle", read_adapter, path)


def test_rank_mismatch_between_factors(tmp_path, model):
    factors = random_factors(model, ["0"], 2)
    B, A = factors["0"]
    path = write_peft_adapter(tmp_path / "x", {"0": (B, torch.randn(3, A.shape[1]))}, 2, 2)
    _expect(AdapterError, r"rank mismatch, lora_A has 3 rows but lora_B has 2", read_adapter, path)


def test_rank_mismatch_with_config(tmp_path, model):
    path, _ = _write(tmp_path, model, r=2)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["r"] = 4
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    _expect(AdapterError, "rank 2 but the config says r = 4", read_adapter, path)


def test_missing_factor(tmp_path, model):
    path, _ = _write(tmp_path, model)
    weights = path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    del tensors["base_model.model.4.lora_B.weight"]
    save_file(tensors, str(weights))
    _expect(AdapterError, "module 4 has .*lora_A.weight but no lora_B", read_adapter, path)


@pytest.mark.parametrize(
    ("change", "match", "exc"),
    [
        ({"r": 0}, "r must be a positive integer", AdapterError),
        ({"r": None}, "r must be a positive integer", AdapterError),
        ({"lora_alpha": "x"}, "lora_alpha must be a number", AdapterError),
        ({"peft_type": "IA3"}, "not a LoRA adapter", UnsupportedError),
        ({"use_dora": True}, "DoRA", UnsupportedError),
        ({"rank_pattern": [1]}, "rank_pattern must be an object", AdapterError),
    ],
)
def test_bad_config_fields(tmp_path, model, change, match, exc):
    path, _ = _write(tmp_path, model)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(change)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    _expect(exc, match, read_adapter, path)


def test_unparsable_config_and_missing_r(tmp_path, model):
    path, _ = _write(tmp_path, model)
    (path / "adapter_config.json").write_text("{not json")
    _expect(AdapterError, "cannot parse", read_adapter, path)
    (path / "adapter_config.json").write_text(json.dumps({"lora_alpha": 2}))
    _expect(AdapterError, "has no 'r'", read_adapter, path)


def test_bad_weights(tmp_path, model):
    path, _ = _write(tmp_path, model)
    weights = path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["base_model.model.0.lora_A.weight"][0, 0] = float("nan")
    save_file(tensors, str(weights))
    _expect(AdapterError, "NaN or Inf", read_adapter, path)
    save_file({"net.0.weight": torch.zeros(2, 2)}, str(weights))
    _expect(AdapterError, "no LoRA factors", read_adapter, path)
    save_file(
        {
            "base_model.model.0.lora_A.default.weight": torch.zeros(2, 5),
            "base_model.model.0.lora_B.default.weight": torch.zeros(7, 2),
            "base_model.model.0.lora_A.other.weight": torch.zeros(2, 5),
            "base_model.model.0.lora_B.other.weight": torch.zeros(7, 2),
        },
        str(weights),
    )
    _expect(AdapterError, "several adapters", read_adapter, path)
    save_file(
        {
            "base_model.model.0.lora_A.weight": torch.zeros(2, 5),
            "base_model.model.0.lora_B.weight": torch.zeros(7, 2),
            "base_model.model.0.lora_magnitude_vector": torch.zeros(7),
        },
        str(weights),
    )
    _expect(UnsupportedError, "DoRA", read_adapter, path)
    (path / "adapter_model.safetensors").write_bytes(b"garbage!garbage!")
    with pytest.raises(GmcurvError):
        read_adapter(path)


def test_extra_entries_are_ignored_with_a_warning(tmp_path, model):
    path, _ = _write(tmp_path, model)
    weights = path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["base_model.model.classifier.modules_to_save.weight"] = torch.zeros(3)
    save_file(tensors, str(weights))
    with pytest.warns(GmcurvWarning, match="not LoRA factors"):
        ad = read_adapter(path)
    assert ad.ignored == ("base_model.model.classifier.modules_to_save.weight",)


def test_unknown_target_module_and_shape_mismatch(tmp_path, model):
    path, _ = _write(tmp_path, model, modules=("0",))
    ad = read_adapter(path)
    other = seeded(mlp_model, sizes=(5, 7, 3))  # 0 fits, 4 is missing
    attach(ad, other)
    path2, _ = _write(tmp_path, model, modules=("4",), name="b")
    err = _expect(AdapterError, "unknown target module 4", attach, read_adapter(path2), other)
    assert "0, 2" in err.hint  # names the modules the model has
    bigger = seeded(mlp_model, sizes=(6, 7, 6, 3))
    _expect(AdapterError, r"does not fit 0.weight of shape \(7, 6\)", attach, ad, bigger)


def test_target_modules_not_naming_a_layer_warns(tmp_path, model):
    path, _ = _write(tmp_path, model, modules=("0",), target_modules=["2"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_adapter(path)
    with pytest.warns(GmcurvWarning, match="does not name 0"):
        attach(read_adapter(path), model)


def test_make_adapter_round_trip(tmp_path, model):
    factors = random_factors(model, ["0", "2"], 3, dtype=torch.float64)
    ad = make_adapter(factors, 3, 6, name="mine", use_rslora=True)
    assert ad.layers["2"].scale == pytest.approx(6 / math.sqrt(3))
    back = read_adapter(write_adapter(ad, tmp_path / "mine").parent)
    assert back.config.use_rslora and back.config.target_modules == ["0", "2"]
    for m, (B, A) in factors.items():
        assert torch.equal(back.layers[m].B, B) and torch.equal(back.layers[m].A, A)
    B, A = factors["0"]
    with pytest.raises(AdapterError, match="rank mismatch"):
        make_adapter({"0": (B, A[:2])}, 3, 6)
    with pytest.raises(AdapterError, match="no factors"):
        make_adapter({}, 3, 6)
