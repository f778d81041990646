"""Tiny models for oracle tests (float64, seeded)."""

from __future__ import annotations

import itertools

import torch
from torch import nn


def mlp(bias: bool = True, sizes=(5, 7, 6, 3), act=nn.Tanh) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class TokenMLP(nn.Module):
    """Linear layers on [N, T, D] sequences, with LayerNorm, then a mean-pooled head."""

    def __init__(self, d=4, h=6, classes=3):
        super().__init__()
        self.inp = nn.Linear(d, h)
        self.norm = nn.LayerNorm(h)
        self.mix = nn.Linear(h, h)
        self.head = nn.Linear(h, classes)

    def forward(self, x):
        h = torch.tanh(self.norm(self.inp(x)))
        h = torch.tanh(self.mix(h)).mean(1)
        return self.head(h)


class Scaled(nn.Module):
    """A custom module with its own parameter (covered by the dense fallback)."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.scale


class WithCustom(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.custom = Scaled(6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.custom(self.fc1(x))))


class TinyAttention(nn.Module):
    """Token + position embeddings, single-head attention from Linear layers, GELU MLP."""

    def __init__(self, vocab=7, d=6, t=5, classes=3):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(t, d) * 0.1)
        self.ln = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.fc = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        h = self.tok(ids) + self.pos[: ids.shape[1]]
        x = self.ln(h)
        att = (self.q(x) @ self.k(x).transpose(1, 2)) / x.shape[-1] ** 0.5
        h = h + self.o(att.softmax(-1) @ self.v(x))
        h = h + self.fc(h)
        return self.head(h.mean(1))


class TinyConv(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.c2 = nn.Conv2d(3, 4, 2, stride=2, bias=False)
        self.head = nn.Linear(4 * 2 * 2, classes)

    def forward(self, x):
        h = torch.tanh(self.bn(self.c1(x)))
        h = torch.tanh(self.c2(h))
        return self.head(h.flatten(1))


class Tied(nn.Module):
    """A tiny LM head tied to its embedding, predicting a class from the last token."""

    def __init__(self, vocab=6, d=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.mix(self.emb(ids))).mean(1))


def seeded(factory, seed=0, **kw):
    torch.manual_seed(seed)
    model = factory(**kw).double()
    # perturb BatchNorm running stats and affine params so eval mode is non-trivial
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model
