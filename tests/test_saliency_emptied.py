"""Global pruning may remove every weight of a tensor (OBD emptied q_proj and k_proj of a
tiny Llama at 50 %): the user is warned, in the report too, and pointed at --scope layer."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from gmcurv.cli.app import app


def test_an_emptied_tensor_is_warned(runner, tmp_path):
    g = torch.Generator().manual_seed(0)
    weights = {
        "net.0.weight": 1e-3 * torch.randn(3, 4, generator=g),  # 12 tiny weights
        "net.0.bias": torch.zeros(3),
        "net.2.weight": torch.randn(2, 3, generator=g) + 3.0,  # 6 large ones
        "net.2.bias": torch.zeros(2),
    }
    save_file(weights, str(tmp_path / "m.safetensors"))
    x = torch.randn(8, 4, generator=g)
    save_file({"inputs": x, "targets": torch.arange(8) % 2}, str(tmp_path / "d.safetensors"))
    base = ["saliency", str(tmp_path / "m.safetensors"), str(tmp_path / "d.safetensors")]
    base += ["--arch", "mlp:relu", "--criterion", "magnitude", "--prune", "0.7", "--json"]
    r = runner.invoke(app, [*base, "--save-pruned", str(tmp_path / "p.safetensors")])
    assert r.exit_code == 0, r.output
    warned = [w for w in json.loads(r.stdout)["warnings"] if "removed every weight" in w]
    assert len(warned) == 1 and "net.0.weight" in warned[0] and "--scope layer" in warned[0]
    r = runner.invoke(
        app, [*base, "--scope", "layer", "--save-pruned", str(tmp_path / "q.safetensors")]
    )
    assert r.exit_code == 0, r.output
    assert not [w for w in json.loads(r.stdout)["warnings"] if "removed every weight" in w]
