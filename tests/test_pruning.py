"""Pruning mechanics: prunable sets, exact-count masks, evaluation, pruned checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import write_data, write_mlp
from models import Tied, TinyAttention, TokenMLP, seeded
from safetensors.torch import load_file, save_file

from gmcurv.errors import ConfigError
from gmcurv.io.checkpoint import load_model
from gmcurv.io.data import load_data
from gmcurv.io.fileio import sha256_file
from gmcurv.io.masks import masks_path
from gmcurv.io.pruned import META_PRUNING, default_output_path, save_pruned
from gmcurv.io.samples import sample_model
from gmcurv.io.tensors import MASK_PREFIX
from gmcurv.objective import Objective
from gmcurv.pruning import (
    apply_masks,
    check_fraction,
    evaluate,
    layer_quotas,
    prunable_params,
    round_target,
    select_masks,
    target_counts,
)


def test_prunable_params_exclude_bias_and_norm():
    obj = Objective.build(seeded(TinyAttention), "cross_entropy")
    names = prunable_params(obj)
    assert "tok.weight" in names and "pos" in names and "q.weight" in names
    assert not any(n.endswith(".bias") for n in names)
    assert "ln.weight" not in names
    assert prunable_params(obj, include_bias=True) == list(obj.params)
    tok = Objective.build(seeded(TokenMLP), "cross_entropy")
    assert prunable_params(tok) == ["inp.weight", "mix.weight", "head.weight"]


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_check_fraction_rejects(bad):
    with pytest.raises(ConfigError):
        check_fraction(bad)


def test_layer_quotas_sum_exactly():
    sizes = {"a": 7, "b": 5, "c": 3, "d": 1}
    for f in (0.0, 0.1, 0.25, 0.5, 0.77, 0.99):
        q = layer_quotas(sizes, f)
        assert sum(q.values()) == round(f * 16)
        for k, n in sizes.items():
            assert math.floor(f * n) <= q[k] <= math.ceil(f * n)
    assert target_counts(sizes, 0.5, "global") == 8
    with pytest.raises(ConfigError):
        target_counts(sizes, 0.5, "neuron")


def test_select_masks_global_layer_and_ties():
    sal = {"a": torch.tensor([[3.0, 1.0], [2.0, 1.0]]), "b": torch.tensor([0.5, 9.0, 1.0])}
    m = select_masks(sal, 3)
    # 0.5 (b0), then the two tied 1.0 entries in position order: a[0,1], a[1,1]
    assert m["b"].tolist() == [True, False, False]
    assert m["a"].tolist() == [[False, True], [False, True]]
    m = select_masks(sal, {"a": 1, "b": 2})
    assert int(m["a"].sum()) == 1 and m["b"].tolist() == [True, False, True]
    old = {"a": torch.tensor([[True, False], [False, False]])}  # a 3.0 already removed
    m = select_masks(sal, 2, old)
    assert bool(m["a"][0, 0]) and int(m["a"].sum() + m["b"].sum()) == 2
    with pytest.raises(ConfigError, match="already pruned"):
        select_masks(sal, 0, old)


def test_round_targets_are_monotone_and_exact():
    removed = {"a": torch.tensor([True, True, False, False, False, False])}
    seq = [round_target(5, removed, r, 4) for r in range(1, 5)]
    assert seq == sorted(seq) and seq[0] >= 2 and seq[-1] == 5
    per = [round_target({"a": 6}, removed, r, 3)["a"] for r in range(1, 4)]
    assert per == [3, 4, 6]


def test_apply_masks_zeroes_exactly():
    w = {"a": torch.ones(2, 2), "b": torch.ones(3)}
    out = apply_masks(w, {"a": torch.tensor([[True, False], [False, True]])})
    assert out["a"].tolist() == [[0.0, 1.0], [1.0, 0.0]] and out["b"] is w["b"]


def test_evaluate_streams_and_matches_direct(tmp_path):
    model_path = write_mlp(tmp_path / "m.safetensors", sizes=(6, 8, 3))
    data = load_data(write_data(tmp_path / "d", n=37, shards=3))
    loaded = load_model(model_path, dtype=torch.float64)
    obj = Objective.build(loaded.model, loaded.loss)
    ev = evaluate(obj, data, batch_size=5)
    batch = next(data.batches(100, "cpu", torch.float64))
    with torch.no_grad():
        out = loaded.model(batch.inputs)
    losses = torch.nn.functional.cross_entropy(out, batch.targets, reduction="none")
    assert math.isclose(ev.loss.value, float(losses.mean()), rel_tol=1e-12)
    assert math.isclose(ev.loss.data_stderr, float(losses.std()) / math.sqrt(37), rel_tol=1e-9)
    acc = float((out.argmax(1) == batch.targets).double().mean())
    assert ev.accuracy.value == acc and ev.accuracy.n_samples == 37 and ev.loss.stderr is None
    zero = {k: torch.zeros_like(v) for k, v in obj.params.items()}
    assert math.isclose(evaluate(obj, data, params=zero).loss.value, math.log(3), rel_tol=1e-12)


def test_default_output_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "model.safetensors"
    assert default_output_path(p, 0.5) == tmp_path / "model.pruned-50.safetensors"
    assert default_output_path(p, 0.125).name == "model.pruned-12.5.safetensors"
    # the bundled sample is never written into
    assert default_output_path(sample_model(), 0.7) == tmp_path / "digits_mlp.pruned-70.safetensors"


def test_save_pruned_roundtrip_keeps_input_and_dtypes(tmp_path):
    src = write_mlp(tmp_path / "m.safetensors", sizes=(6, 8, 3))
    digest = sha256_file(src)
    loaded = load_model(src, dtype=torch.float64)
    weights = {k: v.detach().clone() for k, v in loaded.model.named_parameters()}
    masks = {"net.0.weight": torch.zeros(8, 6, dtype=torch.bool)}
    masks["net.0.weight"][:, :2] = True
    weights = apply_masks(weights, masks)
    out = save_pruned(loaded, weights, masks, tmp_path / "p.safetensors", {"fraction": 0.1})
    assert sha256_file(src) == digest
    raw = load_file(str(out))
    assert raw["net.0.weight"].dtype == torch.float32  # the input's dtype, not the compute one
    assert not [k for k in raw if k.startswith(MASK_PREFIX)]
    keep = load_file(str(masks_path(out)))["net.0.weight"]
    assert keep.dtype == torch.bool and int((~keep).sum()) == 16
    assert bool((raw["net.0.weight"][~keep] == 0).all())
    again = load_model(out)
    assert again.arch == "mlp:tanh" and set(again.masks) == {"net.0.weight"}
    assert '"fraction": 0.1' in again.metadata[META_PRUNING]
    with pytest.raises(ConfigError, match="overwrite"):
        save_pruned(loaded, weights, masks, src, {})


def test_save_pruned_tied_weights_use_the_file_key(tmp_path):
    model = seeded(Tied).float()
    state = {k: v for k, v in model.state_dict().items() if k != "out.weight"}
    src = tmp_path / "tied.safetensors"
    save_file(state, str(src))

    class Loaded:  # what load_model would return for a factory architecture
        pass

    loaded = Loaded()
    loaded.path, loaded.model, loaded.metadata = src, model, {}
    loaded.arch, loaded.loss = "tests/models.py:Tied", "cross_entropy"
    masks = {"emb.weight": torch.zeros(6, 4, dtype=torch.bool)}
    masks["emb.weight"][0] = True
    weights = apply_masks({k: v.detach() for k, v in model.named_parameters()}, masks)
    out = save_pruned(loaded, weights, masks, tmp_path / "p.safetensors", {})
    raw = load_file(str(out))
    assert "out.weight" not in raw and bool((raw["emb.weight"][0] == 0).all())
    assert set(load_file(str(masks_path(out)))) == {"emb.weight"}


def test_save_pruned_records_an_explicit_family(tmp_path):
    src = write_mlp(tmp_path / "bare.safetensors", sizes=(6, 8, 3), metadata=False)
    loaded = load_model(src, arch="mlp:tanh")
    weights = {k: v.detach() for k, v in loaded.model.named_parameters()}
    out = save_pruned(loaded, weights, {}, tmp_path / "p.safetensors", {"fraction": 0.0})
    again = load_model(out)  # no --arch needed any more
    assert again.arch == "mlp:tanh" and again.arch_source == "metadata"
