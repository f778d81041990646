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


# ----------------------------------------------------------- more capture cases (issue 6)
class ConvZoo(nn.Module):
    """Conv2d variants: stride, dilation, 'same' padding with an even kernel (asymmetric),
    reflect/circular padding, no bias, a non-square kernel, a layer applied twice, and a
    grouped conv (dense fallback)."""

    def __init__(self, classes=3):
        super().__init__()
        self.strided = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.dilated = nn.Conv2d(3, 3, 2, dilation=2, padding="same")  # pads 1 left, 1 right
        self.even = nn.Conv2d(3, 2, (2, 3), padding="same", bias=False)  # asymmetric
        self.reflect = nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect")
        self.circular = nn.Conv2d(4, 4, (3, 1), padding=(1, 0), padding_mode="circular")
        self.twice = nn.Conv2d(4, 4, 1)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.head = nn.Linear(4 * 3 * 3, classes)

    def forward(self, x):
        h = torch.tanh(self.strided(x))  # [N, 3, 3, 3]
        h = torch.tanh(self.dilated(h))
        h = torch.tanh(self.reflect(self.even(h)))
        h = torch.tanh(self.circular(h))
        h = torch.tanh(self.twice(torch.tanh(self.twice(h))))
        h = torch.tanh(self.grouped(h))
        return self.head(h.flatten(1))


class EmbedZoo(nn.Module):
    """Embeddings: a large vocabulary (token-pair route), a small one used twice
    (materialised route), padding_idx, and a per-token Linear head (sequence outputs)."""

    def __init__(self, vocab=40, small=4, d=5, classes=3):
        super().__init__()
        self.big = nn.Embedding(vocab, d, padding_idx=0)
        self.small = nn.Embedding(small, d)
        self.norm = nn.RMSNorm(d) if hasattr(nn, "RMSNorm") else nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)
        self.small_vocab = small

    def forward(self, ids):
        h = self.big(ids) + self.small(ids % self.small_vocab)
        h = h + self.small((ids + 1) % self.small_vocab)
        return self.head(torch.tanh(self.norm(h)))  # [N, T, classes]


class TiedPair(nn.Module):
    """Weights shared between two Linear layers, and an embedding tied to a biased head."""

    def __init__(self, vocab=6, d=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d, bias=False)
        self.b.weight = self.a.weight
        self.gn = nn.GroupNorm(2, d)
        self.out = nn.Linear(d, vocab)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        h = torch.tanh(self.a(self.emb(ids)))  # [N, T, d]
        h = torch.tanh(self.b(h)) + h
        h = self.gn(h.transpose(1, 2)).transpose(1, 2)
        return self.out(h.mean(1))


def tiny_gpt2(vocab=9, t=6, d=8, layers=2, heads=2):
    """`transformers`' GPT-2 at toy size (next-token loss; eager attention, no dropout)."""
    import transformers

    cfg = transformers.GPT2Config(
        vocab_size=vocab, n_positions=t, n_embd=d, n_layer=layers, n_head=heads,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        use_cache=False,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation="eager")
