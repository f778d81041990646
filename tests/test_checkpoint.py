"""Checkpoints: architecture resolution, strict loading, tied weights, clear errors."""

from __future__ import annotations

import pytest
import torch
from helpers import write_mlp
from safetensors.torch import load_file, save_file
from torch import nn

from gmcurv.errors import ArchitectureError, CheckpointError
from gmcurv.io.checkpoint import load_model, save_checkpoint
from gmcurv.io.masks import masks_path
from gmcurv.io.tensors import read_header


def test_metadata_roundtrip(tmp_path):
    p = write_mlp(tmp_path / "m.safetensors", activation="gelu")
    lm = load_model(p)
    assert lm.arch == "mlp:gelu" and lm.arch_source == "metadata"
    assert lm.loss == "cross_entropy" and lm.n_params == 6 * 8 + 8 + 8 * 3 + 3
    x = torch.randn(2, 6)
    state = load_file(str(p))
    ref = nn.functional.linear(
        nn.functional.gelu(nn.functional.linear(x, state["net.0.weight"], state["net.0.bias"])),
        state["net.2.weight"],
        state["net.2.bias"],
    )
    torch.testing.assert_close(lm.model(x), ref)
    assert len(lm.sha256) == 64


@pytest.mark.parametrize("prefix", ["net", "layers", ""])
def test_arch_mlp_inferred_from_shapes(tmp_path, prefix):
    p = tmp_path / "m.safetensors"
    names = [f"{prefix}.{i}" if prefix else f"fc{i}" for i in (1, 2, 10)]
    sizes = [(7, 5), (6, 7), (2, 6)]
    state = {}
    for name, (o, i) in zip(names, sizes, strict=True):
        state[f"{name}.weight"] = torch.randn(o, i)
        state[f"{name}.bias"] = torch.randn(o)
    save_file(state, str(p))
    with pytest.raises(ArchitectureError, match="--arch"):
        load_model(p)
    lm = load_model(p, arch="mlp:relu")
    assert lm.arch_source == "--arch"
    assert lm.model(torch.randn(3, 5)).shape == (3, 2)
    # image-like inputs are flattened; token-like inputs keep their tokens
    assert lm.model(torch.randn(3, 5, 1)).shape == (3, 2)
    assert lm.model(torch.randn(3, 4, 5)).shape == (3, 4, 2)


def test_unchainable_shapes_error(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"a.weight": torch.randn(4, 3), "b.weight": torch.randn(2, 5)}, str(p))
    with pytest.raises(ArchitectureError, match="do not chain"):
        load_model(p, arch="mlp:relu")


def test_truncated_and_corrupt_files(tmp_path):
    p = write_mlp(tmp_path / "m.safetensors")
    data = p.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-50])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        read_header(junk)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="too short"):
        read_header(tiny)


def test_pickle_checkpoints_refused(tmp_path):
    p = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, p)
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(p)


def test_missing_unexpected_and_mismatched_keys(tmp_path):
    p = write_mlp(tmp_path / "m.safetensors")
    state = load_file(str(p))
    state["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad), metadata={"gmcurv.arch": "mlp:tanh"})
    with pytest.raises(Exception, match=r"extra\.weight"):
        load_model(bad)
    factory = tmp_path / "arch.py"
    factory.write_text(
        "from torch import nn\n"
        "class M(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.net = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3))\n"
        "def build():\n    return M()\n"
    )
    with pytest.raises(CheckpointError, match=r"shape mismatches.*\(8, 6\).*\(9, 6\)"):
        load_model(p, arch=f"{factory}:build")


def test_tied_weights_load_from_one_name(tmp_path):
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 5, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.emb(ids).mean(1))

    src = TiedLM()
    p = tmp_path / "tied.safetensors"
    save_checkpoint(p, src.state_dict(), {})
    assert set(load_file(str(p))) == {"emb.weight"}  # stored once
    arch = tmp_path / "tied_arch.py"
    arch.write_text(
        "import torch\nfrom torch import nn\n"
        "class TiedLM(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.emb = nn.Embedding(5, 3)\n"
        "        self.head = nn.Linear(3, 5, bias=False)\n"
        "        self.head.weight = self.emb.weight\n"
        "    def forward(self, ids):\n"
        "        return self.head(self.emb(ids).mean(1))\n"
    )
    lm = load_model(p, arch=f"{arch}:TiedLM")
    torch.testing.assert_close(lm.model.head.weight, src.emb.weight)
    assert lm.model.head.weight is lm.model.emb.weight


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nosuchfamily", "unknown architecture family"),
        ("missing_file.py:build", "not found"),
        ("json:loads", "raised"),
        ("os.path:sep", "no callable"),
        ("gmcurv.errors:GmcurvWarning", "not an nn.Module"),
    ],
)
def test_bad_arch_specs(tmp_path, spec, message):
    p = write_mlp(tmp_path / "m.safetensors")
    with pytest.raises(ArchitectureError, match=message):
        load_model(p, arch=spec)


def test_nan_weights_rejected(tmp_path):
    p = tmp_path / "nan.safetensors"
    save_file(
        {"fc.weight": torch.tensor([[float("nan")]])}, str(p), metadata={"gmcurv.arch": "mlp:relu"}
    )
    with pytest.raises(CheckpointError, match="NaN"):
        load_model(p)


def test_save_is_atomic_and_masks_are_separate(tmp_path):
    p = write_mlp(tmp_path / "m.safetensors")
    lm = load_model(p)
    masks = {"net.0.weight": torch.ones(8, 6, dtype=torch.bool)}
    out = tmp_path / "pruned.safetensors"
    save_checkpoint(out, lm.model.state_dict(), lm.metadata, masks)
    again = load_model(out)
    assert set(again.masks) == {"net.0.weight"}
    assert set(load_file(str(out))) == set(lm.model.state_dict())  # a plain state dict
    assert set(load_file(str(masks_path(out)))) == {"net.0.weight"}
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
