"""Benchmark workloads shared by all benchmarks (synthetic data, fixed seeds).

W1 = 784-256-256-10 ReLU MLP, N=512; W2 = 64-128-128-128-10 tanh MLP, N=2048;
W3 = tiny transformer (token + position embeddings, vocab 32, d=64, sequence 16, one
pre-LayerNorm block with single-head attention built from Linear layers and a GELU MLP of
256, mean-pool, linear head to 10 classes), N=256.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


class TinyTransformer(nn.Module):
    def __init__(self, vocab=32, d=64, seq=16, hidden=256, classes=10):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.head = nn.Linear(d, classes)

    def forward(self, ids: Tensor) -> Tensor:
        # positions with the batch dimension (HF style), so per-example-gradient peers work
        positions = torch.arange(ids.shape[1], device=ids.device).repeat(ids.shape[0], 1)
        h = self.tok(ids) + self.pos(positions)
        x = self.ln1(h)
        att = (self.q(x) @ self.k(x).transpose(1, 2)) / math.sqrt(x.shape[-1])
        h = h + self.o(att.softmax(-1) @ self.v(x))
        h = h + self.fc2(nn.functional.gelu(self.fc1(self.ln2(h))))
        return self.head(h.mean(1))


def tiny_transformer() -> TinyTransformer:
    """``--arch bench/workloads.py:tiny_transformer`` for W3's checkpoint."""
    return TinyTransformer()


def mlp(sizes, act) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


@dataclass
class Workload:
    name: str
    model: nn.Module
    x: Tensor
    y: Tensor

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Workload:
    """W1, W2 or W3 with deterministic weights and data."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if name == "W1":
        model = mlp([784, 256, 256, 10], nn.ReLU)
        x = torch.randn(512, 784, generator=g)
        y = torch.randint(0, 10, (512,), generator=g)
    elif name == "W2":
        model = mlp([64, 128, 128, 128, 10], nn.Tanh)
        x = torch.randn(2048, 64, generator=g)
        y = torch.randint(0, 10, (2048,), generator=g)
    elif name == "W3":
        model = TinyTransformer()
        x = torch.randint(0, 32, (256, 16), generator=g)
        y = torch.randint(0, 10, (256,), generator=g)
    else:
        raise KeyError(name)
    model = model.to(dtype).eval()
    if x.is_floating_point():
        x = x.to(dtype)
    return Workload(name, model, x, y)


WORKLOADS = ("W1", "W2", "W3")
