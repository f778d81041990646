"""The GPT-2 family, compact, loading Hugging Face checkpoints without `transformers`.

A pre-LayerNorm causal decoder (Radford et al., 2019), exactly as Hugging Face's
``GPT2LMHeadModel`` computes it in eval mode (no dropout: gmcurv analyses a fixed function)::

    h   = wte[ids] + wpe[positions]                          [N, T, E]
    h  += c_proj(attention(c_attn(ln_1(h))))                 causal, n_head heads of E / n_head
    h  += c_proj(act(c_fc(ln_2(h))))                         n_inner = 4 E by default
    out = ln_f(h) wte^T                                      [N, T, V]  (lm_head tied to wte)

Attention is ``F.scaled_dot_product_attention`` (causal; an explicit mask when an
``attention_mask`` marks padding). Every weight matrix is an ``nn.Linear`` (or the tied
embedding), so `gmcurv.capture` keeps all of them in decomposed form.

Checkpoints (``config.json`` + ``model.safetensors``, e.g. from ``save_pretrained``):

- HF's ``Conv1D`` stores ``c_attn``/``c_proj``/``c_fc`` weights as ``[in, out]``
  (``y = x W + b``); here they are ``nn.Linear`` weights ``[out, in]``, and
  `gmcurv.checkpoint` transposes them when reading a file without gmcurv metadata (one
  written by ``transformers``); files gmcurv writes (pruned checkpoints) hold the
  parameters as they are, with ``gmcurv.arch = gpt2:n_head=H`` metadata (`arch_spec`).
  `to_hf_state_dict` / `from_hf_state_dict` convert for other tools;
- keys with the ``transformer.`` prefix (``GPT2LMHeadModel``) or without (``GPT2Model``,
  as in the original hub checkpoints) build `GPT2LMHeadModel` or `GPT2BareLMHeadModel`;
- ``lm_head.weight`` is tied to ``wte.weight`` (either name may be in the file);
- legacy attention-mask buffers (``attn.bias``, ``attn.masked_bias``) are ignored.

Config fields read: ``n_embd``, ``n_layer``, ``n_head``, ``n_positions``, ``vocab_size``,
``layer_norm_epsilon``, ``activation_function``, ``n_inner``, ``scale_attn_weights``,
``scale_attn_by_inverse_layer_idx``, ``tie_word_embeddings``; sizes missing from the config
are read off the tensor shapes, and a config that contradicts them is an error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gmcurv.errors import ArchitectureError

Shapes = Mapping[str, tuple[int, ...]]

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}

# checkpoint entries that are not parameters of the model (old attention-mask buffers)
IGNORED_KEYS = (r"(^|\.)attn\.(bias|masked_bias)$",)


@dataclass(frozen=True)
class GPT2Config:
    """The Hugging Face ``GPT2Config`` fields that change the function computed."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.activation_function not in ACTIVATIONS:
            raise ArchitectureError(
                f"GPT-2 activation_function {self.activation_function!r} is not supported",
                hint=f"use one of: {', '.join(ACTIVATIONS)}",
            )
        if self.n_head < 1 or self.n_embd % self.n_head:
            raise ArchitectureError(
                f"GPT-2 n_embd={self.n_embd} is not divisible by n_head={self.n_head}",
                hint="fix n_head in config.json (or --arch gpt2:n_head=H)",
            )

    @property
    def inner(self) -> int:
        return self.n_inner or 4 * self.n_embd

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "gpt2", **asdict(self)}


# ------------------------------------------------------------------------------------ layers
class Conv1D(nn.Linear):
    """A projection stored by Hugging Face as ``Conv1D`` (weight ``[in, out]`` in its files).

    The parameter is an ordinary ``nn.Linear`` weight ``[out, in]`` (decomposed capture, the
    Fisher and every flat parameter vector see Linear layout); `gmcurv.checkpoint` transposes
    these entries when it reads a Hugging Face file (see `checkpoint_transposed_keys`).
    """


class Attention(nn.Module):
    """Causal multi-head self-attention: ``c_attn`` makes q, k, v; ``c_proj`` mixes heads."""

    def __init__(self, cfg: GPT2Config, layer_idx: int):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = Conv1D(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = Conv1D(cfg.n_embd, cfg.n_embd)
        head_dim = cfg.n_embd // cfg.n_head
        scale = 1.0 / math.sqrt(head_dim) if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.scale = scale

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        n, t, e = x.shape
        q, k, v = self.c_attn(x).split(e, dim=-1)  # 3 x [N, T, E]
        # [N, T, E] -> [N, H, T, E/H]
        q, k, v = (z.reshape(n, t, self.n_head, -1).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, is_causal=bias is None, scale=self.scale
        )
        return self.c_proj(y.transpose(1, 2).reshape(n, t, e))  # [N, H, T, D] -> [N, T, E]


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.c_fc = Conv1D(cfg.n_embd, cfg.inner)
        self.c_proj = Conv1D(cfg.inner, cfg.n_embd)
        self.act = ACTIVATIONS[cfg.activation_function]

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg, layer_idx)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, h: Tensor, bias: Tensor | None = None) -> Tensor:
        h = h + self.attn(self.ln_1(h), bias)
        return h + self.mlp(self.ln_2(h))


def attention_bias(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """``[N, 1, T, T]`` additive bias: 0 where query t may see key s (s <= t, s not padding).

    Masked entries get the dtype's most negative value (not -inf), so a fully masked row
    (a padding query) stays finite, as in Hugging Face's implementation.
    """
    t = attention_mask.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal & attention_mask.bool()[:, None, None, :]  # [N, 1, T, T]
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


class GPT2Model(nn.Module):
    """The transformer body (Hugging Face ``GPT2Model``): embeddings, blocks, final norm."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        _init_weights(self, cfg)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``[N, T] -> [N, T, E]``."""
        if input_ids.is_floating_point():
            raise TypeError("GPT-2 takes integer token ids (input_ids), not floats")
        n, t = input_ids.shape
        if t > self.config.n_positions:
            raise ValueError(
                f"sequences of {t} tokens are longer than the model's n_positions "
                f"{self.config.n_positions}"
            )
        # positions per example ([N, T], not [T]) so each example's gradient stays its own
        positions = torch.arange(t, device=input_ids.device).expand(n, t)
        h = self.wte(input_ids) + self.wpe(positions)
        bias = None
        if attention_mask is not None:
            bias = attention_bias(attention_mask, h.dtype)
        for block in self.h:
            h = block(h, bias)
        return self.ln_f(h)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.hidden_states(input_ids, attention_mask)


class _CheckpointLayout:
    """What `gmcurv.checkpoint` asks of a model beyond its state dict."""

    config: GPT2Config
    ignored_checkpoint_keys = IGNORED_KEYS

    def checkpoint_transposed_keys(self) -> set[str]:
        """State-dict keys a Hugging Face file stores transposed (the ``Conv1D`` weights)."""
        return {
            f"{path}.weight"
            for path, m in self.named_modules()  # type: ignore[attr-defined]
            if isinstance(m, Conv1D)
        }

    @property
    def arch_config(self) -> dict[str, Any]:
        return self.config.to_dict()

    @property
    def arch_spec(self) -> str:
        """``gpt2:n_head=H[,...]``: the family spec that rebuilds this model from its shapes
        (written into the metadata of checkpoints gmcurv saves, e.g. pruned ones)."""
        default = GPT2Config()
        fields_ = ["n_head"] + [
            f
            for f in ("activation_function", "layer_norm_epsilon", "scale_attn_weights",
                      "scale_attn_by_inverse_layer_idx", "tie_word_embeddings")
            if getattr(self.config, f) != getattr(default, f)
        ]  # fmt: skip
        return "gpt2:" + ",".join(f"{f}={getattr(self.config, f)}" for f in fields_)


class GPT2LMHeadModel(_CheckpointLayout, nn.Module):
    """Hugging Face ``GPT2LMHeadModel`` layout: ``transformer.*`` keys and a tied ``lm_head``."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.config = cfg
        self.transformer = GPT2Model(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits ``[N, T, V]``."""
        return self.lm_head(self.transformer.hidden_states(input_ids, attention_mask))


class GPT2BareLMHeadModel(_CheckpointLayout, GPT2Model):
    """Hugging Face ``GPT2Model`` layout (keys without prefix) plus the tied ``lm_head``."""

    def __init__(self, cfg: GPT2Config):
        super().__init__(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits ``[N, T, V]``."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask))


def _init_weights(model: GPT2Model, cfg: GPT2Config, std: float = 0.02) -> None:
    """GPT-2's initialisation (normal(0, 0.02); residual projections scaled by 1/sqrt(2 L))."""
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif ".ln_" in name or name.startswith("ln_"):
            nn.init.ones_(p)
        elif name.endswith("c_proj.weight"):
            nn.init.normal_(p, 0.0, std / math.sqrt(2 * cfg.n_layer))
        else:
            nn.init.normal_(p, 0.0, std)


def to_hf_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's tensors as a Hugging Face file holds them: ``Conv1D`` weights ``[in, out]``,
    a tied ``lm_head.weight`` left out (``save_pretrained`` keeps ``wte`` only)."""
    transposed = model.checkpoint_transposed_keys()  # type: ignore[operator]
    state = model.state_dict()
    tied = getattr(model.config, "tie_word_embeddings", True)  # type: ignore[union-attr]
    return {
        k: (v.t() if k in transposed else v).contiguous()
        for k, v in state.items()
        if not (tied and k == "lm_head.weight")
    }


def from_hf_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A Hugging Face state dict in this model's layout, for ``model.load_state_dict``."""
    transposed = model.checkpoint_transposed_keys()  # type: ignore[operator]
    return {k: (v.t() if k in transposed else v) for k, v in state.items()}


# ---------------------------------------------------------------------------------- building
def _prefix(shapes: Shapes) -> str:
    return "transformer." if any(k.startswith("transformer.") for k in shapes) else ""


def infer_config(
    shapes: Shapes, source: str, config: Mapping[str, Any] | None = None
) -> GPT2Config:
    """A `GPT2Config` from a checkpoint's shapes and (optionally) config fields.

    Sizes come from the shapes; `config` supplies what shapes cannot tell (``n_head``,
    activation, epsilon, scaling flags) and must agree with them. Without ``n_head`` the
    GPT-2 convention of 64-dimensional heads is assumed.
    """
    config = dict(config or {})
    if config.get("add_cross_attention"):
        raise ArchitectureError(
            f"{source}: GPT-2 with cross-attention (add_cross_attention) is not supported",
            hint="use a decoder-only GPT-2 checkpoint, or --arch path/to/model.py:factory",
        )
    p = _prefix(shapes)
    if p + "wte.weight" not in shapes or p + "wpe.weight" not in shapes:
        raise ArchitectureError(
            f"{source}: not a GPT-2 checkpoint (no {p}wte.weight / {p}wpe.weight tensors)",
            hint="check the file, or pass --arch for another architecture",
        )
    vocab, embd = shapes[p + "wte.weight"]
    positions = shapes[p + "wpe.weight"][0]
    layers = {int(m[1]) for k in shapes if (m := re.match(rf"{re.escape(p)}h\.(\d+)\.", k))}
    n_layer = max(layers) + 1 if layers else 0
    fc = shapes.get(p + "h.0.mlp.c_fc.bias")  # [inner] in either weight layout
    inner = fc[0] if fc is not None else None
    found = {"vocab_size": vocab, "n_embd": embd, "n_positions": positions, "n_layer": n_layer}
    for key, value in found.items():
        given = config.get(key)
        if given is not None and int(given) != value:
            raise ArchitectureError(
                f"{source}: config says {key}={given} but the weights have {key}={value}",
                hint="the config.json does not belong to these weights; fix or remove it",
            )
    if config.get("n_inner") is not None and inner is not None and config["n_inner"] != inner:
        raise ArchitectureError(
            f"{source}: config says n_inner={config['n_inner']} but the weights have {inner}",
            hint="the config.json does not belong to these weights; fix or remove it",
        )
    n_head = config.get("n_head")
    if n_head is None:
        if embd % 64:
            raise ArchitectureError(
                f"{source}: cannot tell the number of attention heads (n_embd={embd})",
                hint="put n_head in config.json or pass --arch gpt2:n_head=H",
            )
        n_head = embd // 64
    tie = config.get("tie_word_embeddings", True)
    if not tie and "lm_head.weight" not in shapes:
        raise ArchitectureError(
            f"{source}: tie_word_embeddings is false but the file has no lm_head.weight",
            hint="fix tie_word_embeddings in config.json",
        )
    known = {f.name for f in fields(GPT2Config)}
    rest = {k: v for k, v in config.items() if k in known and k not in found}
    rest.update(n_head=int(n_head), n_inner=inner if inner != 4 * embd else None)
    rest["tie_word_embeddings"] = bool(tie)
    return GPT2Config(**found, **rest)


def build_gpt2(config: Mapping[str, Any] | None, shapes: Shapes, source: str) -> nn.Module:
    """The model whose state-dict keys match the checkpoint's (with or without prefix)."""
    cfg = infer_config(shapes, source, config)
    return GPT2LMHeadModel(cfg) if _prefix(shapes) else GPT2BareLMHeadModel(cfg)


def _parse_option(option: str | None) -> dict[str, Any]:
    """``n_head=12,activation_function=gelu`` -> a dict of typed config overrides."""
    out: dict[str, Any] = {}
    types = {f.name: f.type for f in fields(GPT2Config)}
    for item in filter(None, (s.strip() for s in (option or "").split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in types:
            raise ArchitectureError(
                f"--arch gpt2:{option}: cannot read {item!r}",
                hint="write --arch gpt2:key=value[,key=value] with keys from: " + ", ".join(types),
            )
        value = value.strip()
        kind = str(types[key])
        if "bool" in kind:
            out[key] = value.lower() in ("1", "true", "yes")
        elif "float" in kind:
            out[key] = float(value)
        elif "int" in kind:
            out[key] = int(value)
        else:
            out[key] = value
    return out


def gpt2_family(
    option: str | None, config: dict[str, Any] | None, shapes: Shapes, source: str
) -> nn.Module:
    """``--arch gpt2[:key=value,...]`` (and ``gmcurv.arch = gpt2`` metadata).

    Config, first match wins per field: the option, `config` (gmcurv metadata), a
    ``config.json`` beside the weights, the shapes (64-dimensional heads by default).
    """
    merged: dict[str, Any] = {}
    beside = Path(source).parent / "config.json"
    if beside.is_file():
        try:
            loaded = _read_json(beside)
        except ValueError:
            loaded = {}
        if loaded.get("model_type", "gpt2") == "gpt2":
            merged.update(loaded)
    merged.update(config or {})
    merged.update(_parse_option(option))
    return build_gpt2(merged, shapes, source)


def _read_json(path: Path) -> dict[str, Any]:
    import json

    value = json.loads(path.read_text())
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


__all__ = [
    "Conv1D",
    "GPT2BareLMHeadModel",
    "GPT2Config",
    "GPT2LMHeadModel",
    "GPT2Model",
    "build_gpt2",
    "from_hf_state_dict",
    "gpt2_family",
    "infer_config",
    "to_hf_state_dict",
]
