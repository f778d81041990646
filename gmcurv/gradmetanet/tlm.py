"""Small causal-LM transformers and offline tasks for head v2's model zoo.

`TinyLM` is a GPT-2-style decoder (pre-LayerNorm blocks; attention ``qkv = Linear(d, 3d)``,
``proj = Linear(d, d)``; MLP ``fc = Linear(d, 4d)``, GELU, ``proj = Linear(4d, d)``; tied-free
``head = Linear(d, V)``), built from ``nn.Linear`` so every weight's per-example gradient is
a sum of per-token rank-1 products ``Σ_t delta[n,t] a[n,t]^T`` (`gmcurv.factors`). Its
symmetries — the ones head v2 must respect — are: the hidden neurons of each MLP (rows of
``fc``, columns of ``proj``), the attention heads of each block (blocks of ``qkv`` rows and
``proj`` columns), the dimensions inside a head (shared by q and k; by v and ``proj``), and
the residual stream (every matrix touching it, LayerNorm parameters and the embeddings,
permuted together).

Tasks (token sequences of length ``T``, generated from a seed, nothing downloaded):
``markov`` (a random sparse bigram chain), ``copy`` (a random prefix, a separator, the prefix
again), ``count`` (arithmetic progressions modulo the vocabulary), ``chars`` (character
level, windows of the bundled ``tiny_gpt/corpus.txt``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gmcurv.io.samples import SAMPLE_ROOT

TASKS = ("markov", "copy", "count", "chars")


class Block(nn.Module):
    def __init__(self, d: int, heads: int, T: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.register_buffer("mask", torch.ones(T, T).tril().bool(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.ln1(x)).split(d, -1)  # [n, t, d] each
        q, k, v = (z.reshape(n, t, h, d // h).transpose(1, 2) for z in (q, k, v))  # [n,h,t,e]
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // h)  # [n, h, t, t]
        att = att.masked_fill(~self.mask[:t, :t], float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(n, t, d)
        x = x + self.proj(y)
        return x + self.out(nn.functional.gelu(self.fc(self.ln2(x))))


class TinyLM(nn.Module):
    """``ids [N, T] -> logits [N, T, V]`` (see module doc)."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, T: int):
        super().__init__()
        if d % heads:
            raise ValueError(f"width {d} is not a multiple of {heads} heads")
        self.config = {"vocab": vocab, "d": d, "layers": layers, "heads": heads, "T": T}
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.blocks = nn.ModuleList(Block(d, heads, T) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def init_lm(model: TinyLM, gen: torch.Generator) -> None:
    """GPT-2's init from a local generator: N(0, 0.02) weights, zero biases, unit norms."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                m.weight.normal_(0.0, 0.02, generator=gen)
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.zero_()


def _chars(n: int, T: int, gen: torch.Generator) -> tuple[Tensor, int]:
    text = (SAMPLE_ROOT / "tiny_gpt" / "corpus.txt").read_text(encoding="utf-8")
    alphabet = sorted(set(text))
    ids = torch.tensor([alphabet.index(c) for c in text])
    start = torch.randint(0, len(ids) - T, (n,), generator=gen)
    return torch.stack([ids[s : s + T] for s in start.tolist()]), len(alphabet)


def make_task(name: str, n: int, T: int, seed: int) -> tuple[Tensor, int]:
    """``(ids [n, T] int64, vocabulary size)`` of a task (deterministic in `seed`)."""
    gen = torch.Generator().manual_seed(seed)
    if name == "markov":
        V = 24
        logits = torch.randn(V, V, generator=gen) * 2.5
        P = logits.softmax(-1)
        ids = torch.empty(n, T, dtype=torch.long)
        ids[:, 0] = torch.randint(0, V, (n,), generator=gen)
        for t in range(1, T):
            ids[:, t] = torch.multinomial(P[ids[:, t - 1]], 1, generator=gen)[:, 0]
        return ids, V
    if name == "copy":
        V, half = 16, (T - 1) // 2
        prefix = torch.randint(1, V, (n, half), generator=gen)
        sep = torch.zeros(n, 1, dtype=torch.long)
        ids = torch.cat([prefix, sep, prefix], 1)
        pad = T - ids.shape[1]
        return torch.cat([ids, torch.zeros(n, pad, dtype=torch.long)], 1), V
    if name == "count":
        V = 20
        a = torch.randint(0, V, (n, 1), generator=gen)
        step = torch.randint(1, 5, (n, 1), generator=gen)
        return (a + step * torch.arange(T)) % V, V
    if name == "chars":
        return _chars(n, T, gen)
    raise ValueError(f"unknown task {name!r}; use one of {TASKS}")
