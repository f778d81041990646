"""``gmcurv lora``: positional parsing, report schema, several adapters, curvature on the
bundled samples (digits MLP and tiny GPT-2), --export, --plot, exit codes."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from lora_fixtures import random_factors, write_peft_adapter

from gmcurv.cli.app import app
from gmcurv.io.adapter import read_adapter
from gmcurv.io.checkpoint import load_model
from gmcurv.io.fileio import sha256_file
from gmcurv.io.samples import sample_data, sample_model
from gmcurv.results import report_schema

MODEL, DATA = sample_model(), sample_data()
GPT = sample_model("tiny_gpt").parent


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    jsonschema.validate(doc, report_schema())
    return doc


def _error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    assert message in result.stderr, result.stderr


@pytest.fixture(scope="module")
def digits_model():
    return load_model(MODEL).model


@pytest.fixture
def adapters(tmp_path, digits_model):
    """Three adapters for the digits MLP (net.0 64->128, net.2 128->64, net.4 64->10)."""
    a = write_peft_adapter(
        tmp_path / "a", random_factors(digits_model, ["net.0", "net.2"], 4, seed=1), 4, 8
    )
    b = write_peft_adapter(
        tmp_path / "b", random_factors(digits_model, ["net.4"], 2, seed=2, scale=0.05), 2, 2
    )
    c = write_peft_adapter(
        tmp_path / "c",
        random_factors(digits_model, ["net.0", "net.4"], 3, seed=3, scale=0.02),
        3,
        6,
        use_rslora=True,
    )
    return a, b, c


def test_features_only_report(runner, adapters):
    a, *_ = adapters
    doc = _json(runner.invoke(app, ["lora", str(a), "--json"]))
    assert doc["command"] == "lora" and doc["model"] is None and doc["data"] is None
    res = doc["results"]
    assert list(res["adapters"]) == ["a"] and "fisher" not in res
    info = res["adapters"]["a"]
    assert info["r"] == 4 and info["lora_alpha"] == 8 and info["n_layers"] == 2
    assert info["sha256"] == sha256_file(a / "adapter_model.safetensors")
    ad = read_adapter(a)
    for module, f in info["layers"].items():
        layer = ad.layers[module]
        dense = layer.scale * (layer.B.double() @ layer.A.double())
        ref = torch.linalg.svdvals(dense)[: layer.rank].tolist()
        assert [e["value"] for e in f["singular_values"]] == pytest.approx(ref, rel=1e-6)
        assert f["frobenius"]["stderr"] is None and f["param"] is None and "curvature" not in info
        assert f["shape"] == list(dense.shape) and f["scale"] == 2.0


def test_several_adapters_table_and_json(runner, adapters, tmp_path):
    twin = write_peft_adapter(
        tmp_path / "other" / "a", {"net.4": (torch.ones(10, 1), torch.ones(1, 64))}, 1, 1
    )
    paths = [str(p) for p in (*adapters, twin)]
    doc = _json(runner.invoke(app, ["lora", *paths, "--json"]))
    assert list(doc["results"]["adapters"]) == ["a", "b", "c", "a-2"]
    c = doc["results"]["adapters"]["c"]
    assert c["use_rslora"] and c["layers"]["net.0"]["scale"] == pytest.approx(6 / 3**0.5)
    human = runner.invoke(app, ["lora", *paths])
    assert human.exit_code == 0, human.output
    for name in ("a", "b", "c", "a-2", "net.0", "net.4", "eff.", "stable"):
        assert name in human.stdout


def test_curvature_on_the_digits_sample(runner, adapters, tmp_path):
    a, b, _ = adapters
    out = tmp_path / "report.json"
    args = ["lora", str(a), str(b), str(MODEL), str(DATA), "-n", "64", "--scales", "0.5,1"]
    doc = _json(runner.invoke(app, [*args, "--json", "-o", str(out)]))
    assert json.loads(out.read_text()) == doc
    assert doc["model"]["arch"] == "mlp:relu" and doc["data"]["n"] == 64
    res = doc["results"]
    assert res["fisher"] == "empirical" and res["scales"] == [0.5, 1.0]
    for name in ("a", "b"):
        c = res["adapters"][name]["curvature"]
        assert [p["scale"] for p in c["points"]] == [0.5, 1.0]
        assert c["hessian_qf"]["n_matvecs"] == 1 and c["fisher_qf"]["n_samples"] == 64
        assert c["fisher_qf"]["value"] > 0
        layers = res["adapters"][name]["layers"]
        assert all(f["param"] == f"{m}.weight" for m, f in layers.items())
        assert set(c["per_param"]) == {f"{m}.weight" for m in layers}
    rule = "adapters.a.curvature.hessian_qf > 0"
    gated = runner.invoke(app, [*args, "--json", "--fail-if", rule])
    breached = res["adapters"]["a"]["curvature"]["hessian_qf"]["value"] > 0
    assert gated.exit_code == (1 if breached else 0)
    assert runner.invoke(app, [*args, "--json", "--fail-if", "adapters.a.nope > 0"]).exit_code == 2
    human = runner.invoke(app, [*args, "-q"])
    assert human.exit_code == 0, human.output
    assert "predicted (H)" in human.stdout and "dθᵀH dθ" in human.stdout


def test_mapping_only_with_a_model(runner, adapters):
    a, *_ = adapters
    doc = _json(runner.invoke(app, ["lora", str(a), str(MODEL), "--json"]))
    assert doc["data"] is None and doc["model"]["n_params"] == 17226
    layers = doc["results"]["adapters"]["a"]["layers"]
    assert layers["net.0"]["target"] == "net.0" and layers["net.2"]["param"] == "net.2.weight"
    assert "curvature" not in doc["results"]["adapters"]["a"]


def test_tiny_gpt_sample_conv1d_style_layers(runner, tmp_path):
    gpt = load_model(GPT).model
    modules = [
        "transformer.h.0.attn.c_attn",
        "transformer.h.1.mlp.c_fc",
        "transformer.h.1.attn.c_proj",
    ]
    ad = write_peft_adapter(
        tmp_path / "gpt_lora",
        random_factors(gpt, modules, 4, scale=0.05),
        4,
        8,
        fan_in_fan_out=True,  # what peft writes for HF GPT-2's Conv1D layers
        target_modules=["c_attn", "c_fc", "c_proj"],
    )
    args = ["lora", str(ad), str(GPT), str(GPT / "data"), "-n", "6", "-b", "3", "--json"]
    doc = _json(runner.invoke(app, args))
    res = doc["results"]["adapters"]["gpt_lora"]
    assert doc["model"]["arch"] == "hf:GPT2LMHeadModel"
    assert {f["param"] for f in res["layers"].values()} == {f"{m}.weight" for m in modules}
    c = res["curvature"]
    assert c["fisher_qf"]["value"] > 0 and len(c["points"]) == 4
    assert all(p["measured"]["value"] is not None for p in c["points"])


def test_plot(runner, adapters, tmp_path):
    a, *_ = adapters
    png = tmp_path / "lora.png"
    args = ["lora", str(a), str(MODEL), str(DATA), "-n", "32", "--plot", str(png), "--json"]
    _json(runner.invoke(app, args))
    assert png.read_bytes()[:4] == b"\x89PNG"
    svg = tmp_path / "features.svg"
    _json(runner.invoke(app, ["lora", str(a), "--plot", str(svg), "--json"]))
    assert b"<svg" in svg.read_bytes()[:400]
    _error(runner.invoke(app, ["lora", str(a), "--plot", str(tmp_path / "x.gif")]), ".gif")


def test_export_canonical(runner, adapters, tmp_path):
    a, b, _ = adapters
    digest = sha256_file(a / "adapter_model.safetensors")
    out = tmp_path / "canonical.safetensors"
    doc = _json(runner.invoke(app, ["lora", str(a), "--export", str(out), "--json"]))
    assert doc["results"]["export"] == {"a": str(out)}
    assert sha256_file(a / "adapter_model.safetensors") == digest
    again = _json(runner.invoke(app, ["lora", str(out), "--json"]))  # the export reads back
    before = doc["results"]["adapters"]["a"]["layers"]
    after = again["results"]["adapters"]["canonical"]["layers"]
    for m in before:
        sv0 = [e["value"] for e in before[m]["singular_values"]]
        sv1 = [e["value"] for e in after[m]["singular_values"]]
        assert sv1 == pytest.approx(sv0, rel=1e-5)
    # several adapters: one directory each, loadable like peft's
    folder = tmp_path / "canon"
    doc = _json(runner.invoke(app, ["lora", str(a), str(b), "--export", str(folder), "--json"]))
    assert set(doc["results"]["export"]) == {"a", "b"}
    assert (folder / "b" / "adapter_config.json").is_file()
    assert read_adapter(folder / "b").config.r == 2
    _error(
        runner.invoke(app, ["lora", str(a), str(b), "--export", str(tmp_path / "x.safetensors")]),
        "need a directory",
    )
    _error(
        runner.invoke(app, ["lora", str(a), "--export", str(a / "inside.safetensors")]),
        "inside the input directory",
    )


def test_malformed_adapters_exit_2(runner, adapters, tmp_path, digits_model):
    a, *_ = adapters
    (a / "adapter_config.json").unlink()
    _error(runner.invoke(app, ["lora", str(a)]), "missing adapter_config.json")

    B, A = random_factors(digits_model, ["net.0"], 2)["net.0"]
    bad = write_peft_adapter(tmp_path / "bad", {"net.0": (B, torch.zeros(3, 64))}, 2, 2)
    _error(runner.invoke(app, ["lora", str(bad)]), "rank mismatch")

    wrong_r = write_peft_adapter(tmp_path / "wrong_r", {"net.0": (B, A)}, 8, 2)
    _error(runner.invoke(app, ["lora", str(wrong_r)]), "the config says r = 8")

    other = write_peft_adapter(
        tmp_path / "other",
        {"transformer.h.0.attn.c_attn": (torch.zeros(192, 2), torch.zeros(2, 64))},
        2,
        2,
    )
    _error(runner.invoke(app, ["lora", str(other), str(MODEL)]), "unknown target module")
    misfit = write_peft_adapter(tmp_path / "misfit", {"net.0": (torch.zeros(5, 2), A)}, 2, 2)
    _error(runner.invoke(app, ["lora", str(misfit), str(MODEL)]), "does not fit net.0.weight")


def test_positional_parsing_errors(runner, adapters, tmp_path):
    a, b, _ = adapters
    _error(runner.invoke(app, ["lora", str(MODEL)]), "is not a LoRA adapter")
    _error(runner.invoke(app, ["lora", str(MODEL), str(a)]), "comes after MODEL")
    _error(runner.invoke(app, ["lora", str(a), str(MODEL), str(b)]), "comes after MODEL")
    _error(runner.invoke(app, ["lora", str(a), str(MODEL), str(DATA), str(DATA)]), "too many paths")
    _error(runner.invoke(app, ["lora", str(tmp_path / "nope")]), "no such file")
    _error(runner.invoke(app, ["lora", str(a), "--scales", "1,x"]), "--scales")
    _error(runner.invoke(app, ["lora", str(a), "--scales", "1,1"]), "repeated")
    assert runner.invoke(app, ["lora"]).exit_code == 2  # ADAPTER is required


def test_help_documents_the_arguments(runner):
    result = runner.invoke(app, ["lora", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    for phrase in ("Adapters come first", "adapter_config.json", "MODEL", "DATA", "--export"):
        assert phrase in text


def test_demo_adapter_script(runner, tmp_path, monkeypatch):
    """scripts/make_lora_adapters.py writes adapters gmcurv lora reads (few steps here)."""
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "make_lora_adapters.py"
    monkeypatch.setattr(sys, "argv", [str(script), str(tmp_path / "demo"), "--steps", "3"])
    runpy.run_path(str(script), run_name="__main__")
    names = ["mirror-r1", "mirror-r4", "mirror-r16", "random-r4"]
    paths = [str(tmp_path / "demo" / n) for n in names]
    doc = _json(runner.invoke(app, ["lora", *paths, "--json"]))
    assert list(doc["results"]["adapters"]) == names
    r16 = doc["results"]["adapters"]["mirror-r16"]["layers"]["net.4"]
    assert len(r16["singular_values"]) == 10  # min(r, out, in)


def test_untrained_adapter_warns_and_reports_zeros(runner, tmp_path):
    """peft initialises B = 0: the update is zero; ranks are 0 and ratios null."""
    zero = write_peft_adapter(
        tmp_path / "zero", {"net.4": (torch.zeros(10, 2), torch.randn(2, 64))}, 2, 4
    )
    args = ["lora", str(zero), str(MODEL), str(DATA), "-n", "16", "--json"]
    doc = _json(runner.invoke(app, args))
    assert any("update is zero" in w for w in doc["warnings"])
    res = doc["results"]["adapters"]["zero"]
    assert res["layers"]["net.4"]["effective_rank"]["value"] == 0.0
    c = res["curvature"]
    assert c["hessian_qf"]["value"] == 0.0 and c["hessian_rayleigh"]["value"] is None
    assert all(p["measured"]["value"] == 0.0 for p in c["points"])
