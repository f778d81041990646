"""Head v2's input: per-token decomposed gradients of a causal-LM transformer, by neuron.

For every Linear / Conv1D layer ``y = W x + b`` the per-sequence gradient is
``g_n(W) = Σ_t delta[n,t] x[n,t]^T`` (`gmcurv.factors.LinearFactors`). Each layer has two
*sides*: its inputs ``x[n,t,i]`` and its output gradients ``delta[n,t,o]``, whose neurons
are of one of four kinds, shared across layers as the transformer's symmetries require:

============ ================================================================ ==========
kind         neurons                                                          symmetry
============ ================================================================ ==========
``res``      the residual stream (inputs of q/k/v, MLP-in and the LM head;    one
             outputs of the attention and MLP output projections)            permutation
                                                                              for all
``hidden``   MLP hidden neurons of one block (fc / up / gate out, MLP-out in)  per block
``headdim``  q, k, v dimensions (outputs of the attention input projections;  heads, and
             inputs of the attention output projection), grouped by head      dims in a head
``vocab``    the LM head's outputs                                            none (pooled)
============ ================================================================ ==========

Layers are recognised by their leaf names (TinyLM ``qkv/proj/fc/out/head``, GPT-2
``c_attn/attn.c_proj/c_fc/mlp.c_proj/lm_head``, Llama ``q/k/v/o_proj``,
``gate/up/down_proj``, ``lm_head``; a head tied to the embedding, as in GPT-2, is the
Linear part of the tied block); other captured blocks (embeddings, norms) enter only
through their per-sequence squared gradient norms (a tied block's norm is the whole
block's, counted on its head layer).

`moments` turns a side into token-pooled per-(sequence, neuron) features: with
``u = v / rms(v)`` (rms over the whole side) and the position ``p_t = t/(T-1)``, the means
over tokens of ``u, u², |u|, u p_t, u² p_t``. Tokens are ordered (causal), so they are
pooled with positional weights, never permuted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from gmcurv.batch import Batch
from gmcurv.capture import Capturer, DecomposedGradients
from gmcurv.errors import ConfigError
from gmcurv.factors import LinearFactors, SumOfSources
from gmcurv.factors.source import rows_gram
from gmcurv.objective import Objective

ROLES = ("attn_in", "attn_out", "mlp_in", "mlp_out", "head")
KINDS = ("res", "hidden", "headdim", "vocab")
SIDE_KINDS = {  # role -> (input-side kind, output-side kind)
    "attn_in": ("res", "headdim"),
    "attn_out": ("headdim", "res"),
    "mlp_in": ("res", "hidden"),
    "mlp_out": ("hidden", "res"),
    "head": ("res", "vocab"),
}
N_MOMENTS = 5
N_GLOBALS = 10


def layer_role(name: str) -> str | None:
    """The role of a Linear/Conv1D module path, or None (not a transformer projection)."""
    parts = name.split(".")
    leaf, parent = parts[-1], (parts[-2] if len(parts) > 1 else "")
    if leaf in ("qkv", "c_attn", "q_proj", "k_proj", "v_proj"):
        return "attn_in"
    if leaf == "o_proj" or (leaf == "c_proj" and parent == "attn"):
        return "attn_out"
    if leaf == "proj" and parent != "mlp":
        return "attn_out"
    if leaf in ("fc", "c_fc", "up_proj", "gate_proj"):
        return "mlp_in"
    if leaf in ("out", "down_proj") or (leaf == "c_proj" and parent == "mlp"):
        return "mlp_out"
    if leaf in ("head", "lm_head"):
        return "head"
    return None


def is_transformer(model: torch.nn.Module) -> bool:
    """Whether `model` has attention projections (TinyLM, GPT-2, Llama names)."""
    return any(layer_role(name) == "attn_in" for name, _ in model.named_modules())


def model_family(model: torch.nn.Module) -> str | None:
    """The transformer family of ``model`` from its own structure (and, for a
    ``transformers`` model, its config): ``"gpt2"`` (Conv1D projections ``c_attn`` /
    ``c_fc``, LayerNorm; ``config.model_type == "gpt2"``), ``"llama"`` (Linear ``q/k/v/o``
    projections, a gated MLP ``gate/up/down_proj``, RMSNorm; ``model_type == "llama"``),
    ``"tiny"`` (gmcurv's TinyLM: Linear ``qkv / proj / fc / out``, LayerNorm, no config).
    None for anything else, including a structure and a config that disagree (e.g. a
    Llama-shaped Qwen2 or Mistral): the caller treats it as an unknown family."""
    leaves: dict[str, set[str]] = {}
    for name, m in model.named_modules():
        leaves.setdefault(name.rsplit(".", 1)[-1], set()).add(type(m).__name__)
    kinds = {type(m).__name__ for m in model.modules()}
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    has = lambda leaf, cls: cls in leaves.get(leaf, set())  # noqa: E731
    if has("c_attn", "Conv1D") and has("c_fc", "Conv1D") and "LayerNorm" in kinds:
        return "gpt2" if mtype == "gpt2" else None
    gated = all(has(x, "Linear") for x in ("gate_proj", "up_proj", "down_proj", "q_proj", "o_proj"))
    if gated and any(k.endswith("RMSNorm") for k in kinds):
        return "llama" if mtype == "llama" else None
    tiny = all(has(x, "Linear") for x in ("qkv", "proj", "fc", "out", "head"))
    if tiny and "LayerNorm" in kinds and mtype is None:
        return "tiny"
    return None


def block_index(name: str) -> int:
    """The transformer block of a module path (its first integer; -1 for the LM head)."""
    m = re.search(r"\.(\d+)\.", f".{name}.")
    return int(m.group(1)) if m else -1


@dataclass
class TSide:
    """One side of a layer: ``values [b, T, J]``, the neurons' kind and head ids."""

    values: Tensor
    kind: str
    heads: Tensor | None = None  # [J] head id (headdim sides), else None


@dataclass
class TLayer:
    name: str
    role: str
    block: int
    x: TSide
    d: TSide
    sq_norms: Tensor  # [b] per-sequence squared gradient norm of this layer (weight + bias)


@dataclass
class TSet:
    """A set of ``b`` sequences' decomposed gradients of one transformer (see module doc)."""

    layers: list[TLayer]
    losses: Tensor  # [b]
    other_sq: Tensor  # [b] squared gradient norms of every other captured block
    gram: Tensor  # [b C, b C] Gram matrix of the whole per-sequence gradients (float64)
    tok_gram: Tensor  # [b C T, b C T] Gram matrix of the per-token gradients of Linear layers
    n_params: int
    d_model: int
    n_blocks: int
    tokens: float = 1.0  # predicted tokens per sequence (the loss is their mean)

    @property
    def b(self) -> int:
        return int(self.losses.shape[0])

    @property
    def seq_trace(self) -> float:
        """``T_eff tr F_S = (T_eff/b) Σ_n ||g_n||²`` over all parameters (per sequence)."""
        return self.tokens * float(self.gram.diagonal().sum()) / self.b

    @property
    def seq_top(self) -> float:
        """``T_eff λ_max(F_S)`` (top eigenvalue of the per-sequence Gram matrix)."""
        return self.tokens * float(torch.linalg.eigvalsh(self.gram)[-1]) / self.b

    @property
    def plug_trace(self) -> float:
        """The GGN trace estimated from these gradients, token by token.

        The per-sequence loss is a mean over ``T_eff`` tokens and the captured per-token
        gradients ``g_nt = delta_nt x_nt^T`` carry its ``1/T_eff``; with Monte Carlo labels
        ``Ĝ = (T_eff/b) Σ_{n,t} g_nt g_nt^T`` (Linear layers) estimates the GGN without the
        per-sequence estimator's cross-token noise. It is unbiased for the LM head; for a
        layer under attention, whose position ``t`` receives gradient from later loss
        positions, it drops cross-position terms (a bias of about 1 % on a tiny TinyLM, see
        the tests). Blocks with per-sequence gradients only (embeddings, norms) enter as
        ``(T_eff/b) Σ_n ||g_n||²``; of a head tied to the embedding only the head's
        per-token part is counted."""
        return (
            self.tokens
            * (float(self.tok_gram.diagonal().sum()) + float(self.other_sq.sum()))
            / self.b
        )

    @property
    def plug_top(self) -> float:
        """``λ_max(Ĝ)`` of the Linear layers: top eigenvalue of the per-token Gram."""
        return self.tokens * self._tok_top / self.b

    @cached_property
    def _tok_top(self) -> float:
        """Top eigenvalue of `tok_gram` (computed once)."""
        return float(torch.linalg.eigvalsh(self.tok_gram)[-1])


def head_config(model: torch.nn.Module) -> tuple[int, int, int]:
    """``(attention heads, key/value heads, head dim)`` of a TinyLM or a transformers LM."""
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if isinstance(cfg, dict) and "heads" in cfg:  # TinyLM
            return cfg["heads"], cfg["heads"], cfg["d"] // cfg["heads"]
        h = getattr(cfg, "num_attention_heads", None)
        if h:
            kv = getattr(cfg, "num_key_value_heads", None) or h
            hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
            return int(h), int(kv), int(hd)
    raise ConfigError(
        "head v2 needs the number of attention heads (a TinyLM or a transformers config)",
        hint="use --method exact for this model",
    )


def _head_ids(width: int, hd: int) -> Tensor:
    """Head id of every neuron of a headdim side: consecutive blocks of ``hd`` dimensions
    (a fused q|k|v projection gets 3H ids: q heads, then k heads, then v heads)."""
    return torch.arange(width) // hd


def _values(src: LinearFactors) -> tuple[Tensor, Tensor]:
    """``x [N, T, I]`` and ``delta [N, C, T, O]`` as captured (views, no copy)."""
    x, d = src.x, src.delta
    if x.dim() == 2:
        x, d = x[:, None], d[..., None, :]
    if d.dim() == 3:
        d = d[:, None]
    return x, d


def sym_gram(a: Tensor, splits: int | None = None) -> Tensor:
    """``a aᵀ`` for rows ``a [M, D]`` by `rows_gram` on the upper blocks of a
    ``splits x splits`` row partition, mirrored: ``(s + 1) / 2s`` of a full product
    (default: blocks of at least 128 rows, at most 8 of them)."""
    m = a.shape[0]
    if splits is None:
        splits = max(1, min(8, m // 128))
    if splits <= 1 or m < 2 * splits:
        return rows_gram(a)
    edges = [m * k // splits for k in range(splits + 1)]
    blocks = [a[edges[k] : edges[k + 1]] for k in range(splits)]
    out = None
    for i in range(splits):
        for j in range(i, splits):
            blk = rows_gram(blocks[i], blocks[j])
            if out is None:
                out = blk.new_empty(m, m)
            out[edges[i] : edges[i + 1], edges[j] : edges[j + 1]] = blk
            if j != i:
                out[edges[j] : edges[j + 1], edges[i] : edges[i + 1]] = blk.T
    assert out is not None
    return out


def _token_gram(
    x: Tensor, d: Tensor, has_weight: bool, has_bias: bool, cache: dict | None = None
) -> Tensor:
    """``[(n,c,t), (m,c',s)]`` Gram of per-token gradients ``delta_t a_tᵀ`` (``a = [x, 1]``):
    ``(δ_t·δ_s)(a_t·a_s)``, both products in the factors' dtype (`rows_gram`: float32
    factors summed in float64 over long inner dimensions), the Hadamard product in
    float64. Cost ``(N C T)² O + (N T)² I``, halved by symmetry (`sym_gram`); `cache`
    keeps ``x xᵀ`` of inputs shared by several layers (Llama's q/k/v, gate/up)."""
    N, C, T, O = d.shape
    dd = sym_gram(d.reshape(N * C * T, O)).double()
    if has_weight:
        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)
        xx = None if cache is None else cache.get(key)
        if xx is None:
            xx = sym_gram(x.reshape(N * T, -1)).double()
            if cache is not None:
                cache[key] = xx
        if has_bias:
            xx = xx + 1.0
    else:
        xx = torch.full((N * T, N * T), 1.0 if has_bias else 0.0, dtype=torch.float64)
    dd = dd.view(N, C, T, N, C, T)
    dd.mul_(xx.view(N, 1, T, N, 1, T))
    return dd.view(N * C * T, N * C * T)


def _seq_gram(tok: Tensor, nc: int, t: int) -> Tensor:
    """Per-sequence Gram ``[(n,c), (m,c')]`` of a Linear layer from its token Gram:
    ``<g_nc, g_mc'> = Σ_{t,s} K[(n,c,t), (m,c',s)]``."""
    return tok.view(nc, t, nc, t).sum((1, 3))


def tset_from_gradients(dg: DecomposedGradients, model: torch.nn.Module) -> TSet:
    """Group the captured factors of `model` by layer role and neuron kind.

    A Linear layer's per-sequence Gram and squared norms are sums of blocks of its token
    Gram (computed once), so no per-sequence gradient is ever materialised."""
    _, _, hd = head_config(model)
    layers: list[TLayer] = []
    other = torch.zeros(dg.n, dtype=torch.float64)
    gram = torch.zeros(dg.n * dg.columns, dg.n * dg.columns, dtype=torch.float64)
    tok = None
    n_params = 0
    d_model = 0
    xx_cache: dict = {}  # inputs shared by several layers (their x xᵀ, once)
    for blk in dg.blocks:
        n_params += blk.dim
        role, src, lin = layer_role(blk.name), blk.source, blk.source
        if isinstance(src, SumOfSources):  # tied LM head (GPT-2): embedding + head parts
            linear = [p for p in src.parts if isinstance(p, LinearFactors)]
            if len(linear) == 1:
                role, lin = "head", linear[0]
        if role is None or not isinstance(lin, LinearFactors):
            g = src.gram().double()
            gram += g
            other += g.diagonal().view(dg.n, dg.columns).sum(1)
            continue
        x, dc = _values(lin)
        kg = _token_gram(x, dc, lin.has_weight, lin.has_bias, xx_cache)
        g = _seq_gram(kg, dg.n * dg.columns, dc.shape[2])
        if src is not lin:  # a tied block: the other parts and the cross terms
            at = next(i for i, p in enumerate(src.parts) if p is lin)  # type: ignore[union-attr]
            g = src.gram(known={at: g}).double()  # type: ignore[call-arg]
        gram += g
        sq = g.diagonal().view(dg.n, dg.columns).sum(1)
        tok = kg if tok is None else tok.add_(kg)
        d = dc[:, 0]  # the head reads the first column
        kx, kd = SIDE_KINDS[role]
        hx = _head_ids(x.shape[-1], hd) if kx == "headdim" else None
        hdd = _head_ids(d.shape[-1], hd) if kd == "headdim" else None
        if kx == "res":
            d_model = x.shape[-1]
        layers.append(
            TLayer(blk.name, role, block_index(blk.name), TSide(x, kx, hx), TSide(d, kd, hdd), sq)
        )
    if not layers or not d_model:
        raise ConfigError(
            "head v2 found no transformer projections (q/k/v, MLP, LM head) in this model",
            hint="use --method exact",
        )
    n_blocks = 1 + max(layer.block for layer in layers)
    return TSet(layers, dg.losses.detach().double(), other, gram, tok, n_params, d_model, n_blocks)


def extract(objective: Objective, batch: Batch, fisher: str = "mc", seed: int = 0) -> TSet:
    """Capture the set's decomposed gradients (one backward) and group them.

    Head v2 reads Monte Carlo gradients (`fisher="mc"`: one next token drawn from the
    model's own prediction at every position, seeded), whose second moment is the
    MC-Fisher (an unbiased estimate of the GGN); ``"empirical"`` uses the data's labels."""
    return extract_with_gradients(objective, batch, fisher, seed)[0]


def extract_with_gradients(
    objective: Objective, batch: Batch, fisher: str = "mc", seed: int = 0
) -> tuple[TSet, DecomposedGradients]:
    """`extract`, also returning the captured gradients (for products with them)."""
    dg = Capturer(objective, fisher, 1, seed, check=False)(batch)
    s = tset_from_gradients(dg, objective.model)
    s.tokens = predicted_tokens(batch)
    return s, dg


def predicted_tokens(batch: Batch) -> float:
    """Mean number of next-token predictions per sequence (``T - 1``, or from the mask)."""
    inp = batch.inputs
    if isinstance(inp, dict):
        mask = inp.get("attention_mask")
        ids = inp["input_ids"]
        if mask is not None:
            return float((mask.sum(1).double() - 1).clamp_min(1).mean())
        return float(ids.shape[1] - 1)
    return float(inp.shape[1] - 1)


# ------------------------------------------------------------------------------- features
MOMENT_CHUNK = 1 << 18  # entries per chunk (~1 MB of float32): temporaries stay on the heap


def moments(values: Tensor) -> Tensor:
    """``[b, T, J] -> [b, J, N_MOMENTS]`` token-pooled moments of ``u = v / rms(v)``
    (float64): the means over tokens of ``u, u², |u|, u p_t, u² p_t``.

    Computed from the raw weighted sums ``Σ_t w_t v``, ``Σ_t w_t v²``, ``Σ_t w_t |v|``
    (``w = [1, p_t] / T``, small products over chunks of ``[T, j]`` columns in the values'
    dtype: no normalised or squared copy of a whole side is made), then scaled by ``1/rms``
    and ``1/rms²`` in float64."""
    b, T, J = values.shape
    w = torch.zeros(2, T, dtype=values.dtype, device=values.device)
    w[0] = 1.0 / T
    if T > 1:
        w[1] = torch.linspace(0.0, 1.0, T, dtype=torch.float64).to(values.dtype) / T
    raw = values.new_empty(b, 5, J)  # Σ w v (2), Σ w v² (2), Σ |v| / T
    step = max(1, MOMENT_CHUNK // max(1, T))
    for n in range(b):
        for lo in range(0, J, step):
            c = values[n, :, lo : lo + step]  # [T, j]
            hi = lo + c.shape[1]
            torch.matmul(w, c, out=raw[n, 0:2, lo:hi])
            torch.matmul(w, c * c, out=raw[n, 2:4, lo:hi])
            torch.matmul(w[:1], c.abs(), out=raw[n, 4:5, lo:hi])
    raw = raw.double()
    rms = float(raw[:, 2].mean().sqrt().clamp_min(1e-300))
    cols = [raw[:, 0] / rms, raw[:, 2] / rms / rms, raw[:, 4] / rms]
    cols += [raw[:, 1] / rms, raw[:, 3] / rms / rms]
    return torch.stack(cols, -1)


def side_scale(values: Tensor) -> float:
    """``log rms`` of a side (its scale; the moments are scale-free)."""
    ss = float(torch.linalg.vector_norm(values).double() ** 2) / max(1, values.numel())
    return 0.5 * math.log(ss + 1e-300)


def global_features(s: TSet) -> Tensor:
    """``[N_GLOBALS]`` invariant summaries: plug-in trace and top (token-level, and the
    per-sequence top relative to it), losses, sizes."""
    tr, top = s.plug_trace, s.plug_top
    vocab = next(layer.d.values.shape[-1] for layer in s.layers if layer.role == "head")
    return torch.tensor(
        [
            math.log(tr + 1e-30),
            math.log(max(top, 1e-30)) - math.log(tr + 1e-30),
            math.log(max(s.seq_top, 1e-30)) - math.log(max(top, 1e-30)),
            float(s.losses.mean()),
            float(s.losses.std()) if s.b > 1 else 0.0,
            float(s.losses.mean()) / math.log(vocab),
            math.log(vocab),
            float(s.n_blocks),
            math.log(s.d_model),
            math.log(s.n_params),
        ],
        dtype=torch.float64,
    )
