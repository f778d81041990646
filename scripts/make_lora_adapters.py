"""Train small LoRA adapters for the bundled digits MLP and write them in PEFT format.

    python scripts/make_lora_adapters.py OUT_DIR        # then, e.g.:
    gmcurv lora OUT_DIR/mirror-r1 OUT_DIR/mirror-r4 OUT_DIR/mirror-r16 \\
        sample_models/digits_mlp/model.safetensors sample_models/digits_mlp/data

The task the adapters learn is the sample's training digits mirrored left-right (a
distribution shift the base model handles badly). Each adapter adapts net.0, net.2 and
net.4 with rank r (PEFT's initialisation: A Kaiming-uniform, B = 0; lora_alpha = 2 r) and
is trained full-batch with Adam; a "random" adapter of the same size (factors drawn at
random, scaled to the r=4 adapter's norm) is written for comparison. Deterministic (fixed
seeds, one thread); needs nothing beyond gmcurv. Runs in a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from gmcurv.io.adapter import write_adapter
from gmcurv.io.checkpoint import load_model
from gmcurv.io.data import load_data
from gmcurv.io.samples import sample_data, sample_model
from gmcurv.lora.adapter import make_adapter

MODULES = ("net.0", "net.2", "net.4")


def mirrored_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The sample's training digits, each 8x8 image flipped left-right."""
    batch = load_data(sample_data()).first(10_000)
    x = batch.inputs.reshape(-1, 8, 8).flip(-1).reshape(-1, 64)
    return x, batch.targets


def train(model: nn.Module, x, y, r: int, steps: int, seed: int) -> tuple[dict, float]:
    """LoRA factors {module: (B, A)} for `model` on (x, y); the base weights stay frozen."""
    g = torch.Generator().manual_seed(seed)
    weights = dict(model.named_parameters())
    factors = {}
    for m in MODULES:
        out_f, in_f = weights[f"{m}.weight"].shape
        bound = 1 / math.sqrt(in_f)  # PEFT's default: kaiming_uniform_(a=sqrt(5)) on A
        A = (torch.rand(r, in_f, generator=g) * 2 - 1) * bound
        factors[m] = (torch.zeros(out_f, r, requires_grad=True), A.requires_grad_())
    scale = 2.0  # lora_alpha / r with lora_alpha = 2 r
    opt = torch.optim.Adam([t for pair in factors.values() for t in pair], lr=1e-2)
    base = {k: v.detach() for k, v in weights.items()}
    for _ in range(steps):
        opt.zero_grad()
        merged = dict(base)
        for m, (B, A) in factors.items():
            merged[f"{m}.weight"] = base[f"{m}.weight"] + scale * B @ A
        loss = nn.functional.cross_entropy(functional_call(model, merged, (x,)), y)
        loss.backward()
        opt.step()
    return {m: (B.detach(), A.detach()) for m, (B, A) in factors.items()}, float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to write the adapters into")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    model = load_model(sample_model()).model
    x, y = mirrored_digits()
    trained = {}
    for r in (1, 4, 16):
        factors, loss = train(model, x, y, r, args.steps, seed=r)
        trained[r] = factors
        path = write_adapter(make_adapter(factors, r, 2 * r), args.out / f"mirror-r{r}")
        print(f"rank {r:2d}: mirrored-digits loss {loss:.4f} -> {path.parent}")
    g = torch.Generator().manual_seed(0)
    ref = trained[4]
    random = {}
    for m, (B, A) in ref.items():
        Br, Ar = torch.randn(B.shape, generator=g), torch.randn(A.shape, generator=g)
        random[m] = (Br * (B @ A).norm() / (Br @ Ar).norm(), Ar)
    path = write_adapter(make_adapter(random, 4, 8), args.out / "random-r4")
    print(f"random rank 4 (same norms as mirror-r4) -> {path.parent}")


if __name__ == "__main__":
    main()
