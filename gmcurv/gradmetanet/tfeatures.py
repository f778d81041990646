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

import torch
from torch import Tensor

from gmcurv.batch import Batch
from gmcurv.capture import Capturer, DecomposedGradients
from gmcurv.errors import ConfigError
from gmcurv.factors import LinearFactors, SumOfSources
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
        return self.tokens * float(torch.linalg.eigvalsh(self.tok_gram)[-1]) / self.b


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
    """``x [N, T, I]`` and ``delta [N, C, T, O]`` in float64."""
    x = src.x.double()
    d = src.delta.double()
    if x.dim() == 2:
        x, d = x[:, None], d[..., None, :]
    if d.dim() == 3:
        d = d[:, None]
    return x, d


def _token_gram(x: Tensor, d: Tensor, bias: bool) -> Tensor:
    """``[(n,c,t), (m,c',s)]`` Gram of per-token gradients ``delta x^T`` (+ bias)."""
    N, C, T, _O = d.shape
    xx = torch.einsum("nti,msi->ntms", x, x)
    if bias:
        xx = xx + 1.0
    dd = torch.einsum("ncto,mdso->nctmds", d, d)
    return (dd * xx[:, None, :, :, None, :]).reshape(N * C * T, N * C * T)


def tset_from_gradients(dg: DecomposedGradients, model: torch.nn.Module) -> TSet:
    """Group the captured factors of `model` by layer role and neuron kind."""
    _, _, hd = head_config(model)
    layers: list[TLayer] = []
    other = torch.zeros(dg.n, dtype=torch.float64)
    gram = torch.zeros(dg.n * dg.columns, dg.n * dg.columns, dtype=torch.float64)
    tok = None
    n_params = 0
    d_model = 0
    for blk in dg.blocks:
        sq = blk.source.sq_norms().sum(1).double()
        gram += blk.source.gram().double()
        n_params += blk.dim
        role, src = layer_role(blk.name), blk.source
        if isinstance(src, SumOfSources):  # tied LM head (GPT-2): embedding + head parts
            linear = [p for p in src.parts if isinstance(p, LinearFactors)]
            if len(linear) == 1:
                role, src = "head", linear[0]
        if role is None or not isinstance(src, LinearFactors):
            other += sq
            continue
        x, dc = _values(src)
        kg = _token_gram(x if src.has_weight else x[..., :0], dc, src.has_bias)
        tok = kg if tok is None else tok + kg
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
    dg = Capturer(objective, fisher, 1, seed, check=False)(batch)
    s = tset_from_gradients(dg, objective.model)
    s.tokens = predicted_tokens(batch)
    return s


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
def moments(values: Tensor) -> Tensor:
    """``[b, T, J] -> [b, J, N_MOMENTS]`` token-pooled moments of ``u = v / rms(v)``."""
    T = values.shape[1]
    rms = values.pow(2).mean().sqrt().clamp_min(1e-300)
    u = values / rms
    p = torch.linspace(0.0, 1.0, T, dtype=u.dtype)[None, :, None] if T > 1 else None
    u2 = u * u
    cols = [u.mean(1), u2.mean(1), u.abs().mean(1)]
    if p is None:
        cols += [torch.zeros_like(cols[0])] * 2
    else:
        cols += [(u * p).mean(1), (u2 * p).mean(1)]
    return torch.stack(cols, -1)


def side_scale(values: Tensor) -> float:
    """``log rms`` of a side (its scale; the moments are scale-free)."""
    return 0.5 * math.log(float(values.pow(2).mean()) + 1e-300)


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
