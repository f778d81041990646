"""Tiny random Hugging Face models of every supported family, saved by ``save_pretrained``.

Nothing is downloaded: each model is built from a small config at test time and written
to a temporary directory with a data sample (``data.safetensors``) in the library's
layout (``input_ids`` [+ ``attention_mask``, ``token_type_ids``] [+ ``labels``], or
``pixel_values`` + ``labels``).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
from safetensors.torch import save_file

VOCAB, T, N = 29, 6, 8
FAMILIES = ("gpt2", "llama", "qwen2", "mistral", "opt", "bert", "vit")
CAUSAL = ("gpt2", "llama", "qwen2", "mistral", "opt")


def build(family: str, seed: int = 0):
    """A tiny random model of `family` (eval mode, eager attention)."""
    import transformers as tf

    small = {"vocab_size": VOCAB, "hidden_size": 16, "num_hidden_layers": 2}
    heads = {"num_attention_heads": 2, "max_position_embeddings": 16}
    decoder = {**small, **heads, "intermediate_size": 24, "num_key_value_heads": 1}
    configs = {
        "gpt2": lambda: tf.GPT2LMHeadModel(
            tf.GPT2Config(
                vocab_size=VOCAB,
                n_positions=16,
                n_embd=16,
                n_layer=2,
                n_head=2,
                bos_token_id=0,
                eos_token_id=0,
            )
        ),
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**decoder)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**decoder)),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**decoder, head_dim=8)),
        "opt": lambda: tf.OPTForCausalLM(
            tf.OPTConfig(
                **small,
                **heads,
                ffn_dim=24,
                word_embed_proj_dim=16,
                bos_token_id=0,
                eos_token_id=0,
                pad_token_id=1,
            )
        ),
        "bert": lambda: tf.BertForSequenceClassification(
            tf.BertConfig(**small, **heads, intermediate_size=24, num_labels=3)
        ),
        "vit": lambda: tf.ViTForImageClassification(
            tf.ViTConfig(
                image_size=8,
                patch_size=4,
                num_channels=3,
                hidden_size=16,
                intermediate_size=24,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_labels=3,
            )
        ),
    }
    torch.manual_seed(seed)
    with contextlib.redirect_stderr(io.StringIO()):  # config sanity notes
        model = configs[family]()
    model.config._attn_implementation = "eager"
    return model.eval()


def data(family: str, n: int = N, seed: int = 1) -> dict[str, torch.Tensor]:
    """A batch in the library's layout: what gmcurv reads and what the model takes."""
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {
            "pixel_values": torch.randn(n, 3, 8, 8, generator=g),
            "labels": torch.randint(0, 3, (n,), generator=g),
        }
    ids = torch.randint(2, VOCAB, (n, T), generator=g)
    if family == "bert":
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "token_type_ids": (torch.arange(T) >= T // 2).long().expand(n, T).contiguous(),
            "labels": torch.randint(0, 3, (n,), generator=g),
        }
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def save(family: str, root: Path, **kwargs) -> tuple[Path, Path]:
    """``save_pretrained`` the model of `family` into ``root/family``; (model dir, data)."""
    model = build(family)
    out = root / family
    with contextlib.redirect_stderr(io.StringIO()):
        model.save_pretrained(str(out), **kwargs)
    path = out / "data.safetensors"
    save_file({k: v.contiguous() for k, v in data(family).items()}, str(path))
    return out, path


def hf_loss(model, batch: dict[str, torch.Tensor], family: str) -> torch.Tensor:
    """The model's own ``outputs.loss`` (labels = input_ids for causal LMs, as HF trains)."""
    kwargs = dict(batch)
    if family in CAUSAL:
        kwargs["labels"] = batch["input_ids"]
    with torch.no_grad():
        return model(**kwargs).loss
