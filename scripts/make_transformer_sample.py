"""Train the bundled character-level GPT-2 sample (tiny_gpt) and write it into the package.

    python scripts/make_transformer_sample.py      # needs transformers (pip install "gmcurv[hf]")

Text: ``sample_models/tiny_gpt/corpus.txt`` — public-domain works written into the
repo (Carroll, Lincoln, Shakespeare). Characters are the tokens (ids in sorted order, see
``vocab.json``). One 512-character block in ten is held out. Model: `transformers`'
``GPT2LMHeadModel``, trained here and saved by ``save_pretrained`` (``config.json`` +
``model.safetensors``, ``lm_head`` tied to ``wte``), exactly what a user's own checkpoint
looks like. Deterministic: fixed seeds, one thread.

Writes ``model.safetensors``, ``config.json``, ``generation_config.json``, ``vocab.json``,
``data/tokens.safetensors`` (training windows, ``input_ids`` only: next-token targets are the
inputs shifted), ``test/tokens.safetensors`` and ``MODEL_CARD.md``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[1] / "sample_models" / "tiny_gpt"
CONFIG = {
    "n_positions": 64,
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "activation_function": "gelu_new",
    "resid_pdrop": 0.0,  # a fixed function: gmcurv analyses the model in eval mode anyway
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
    "bos_token_id": None,
    "eos_token_id": None,
}
SEQ = 64
TRAIN_WINDOWS = 128  # sequences in data/ (what `gmcurv ... tiny_gpt/ tiny_gpt/data` reads)
STEPS = 800
BATCH = 32
LR = 3e-3
SEED = 0
BLOCK = 512  # held-out split: every tenth block of this many characters


def encode(text: str, chars: list[str]) -> torch.Tensor:
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text], dtype=torch.int64)


def windows(ids: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """Evenly spaced length-SEQ windows ``[count, SEQ]`` (non-overlapping when they fit)."""
    last = len(ids) - SEQ
    n = count or last // SEQ + 1
    starts = torch.linspace(0, last, n).round().long()
    return torch.stack([ids[s : s + SEQ] for s in starts])


def next_token_loss(model, ids: torch.Tensor) -> tuple[float, float]:
    """Mean next-token cross-entropy (nats) and accuracy over all predicted positions."""
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
        target = ids[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        acc = (logits.argmax(-1) == target).double().mean()
    return float(loss), float(acc)


def train(ids: torch.Tensor, cfg) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(SEED)
    model = transformers.GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(SEED)
    for step in range(STEPS):
        lr = LR * 0.5 * (1 + math.cos(math.pi * step / STEPS))  # cosine decay
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(ids) - SEQ, (BATCH,), generator=g)
        batch = torch.stack([ids[s : s + SEQ] for s in starts])
        logits = model(batch).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.eval()


def sample_text(model, chars: list[str], prompt: str, length: int = 50) -> str:
    """Greedy continuation, for the model card."""
    ids = encode(prompt, chars)[None]
    with torch.no_grad():
        for _ in range(length):
            nxt = model(ids[:, -SEQ:]).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return "".join(chars[i] for i in ids[0])


def main() -> None:
    torch.set_num_threads(1)
    text = (OUT / "corpus.txt").read_text()
    chars = sorted(set(text))
    blocks = [text[i : i + BLOCK] for i in range(0, len(text), BLOCK)]
    train_ids = encode("".join(b for i, b in enumerate(blocks) if i % 10 != 5), chars)
    test_ids = encode("".join(b for i, b in enumerate(blocks) if i % 10 == 5), chars)
    cfg = transformers.GPT2Config(vocab_size=len(chars), **CONFIG)
    model = train(train_ids, cfg)

    data, test = windows(train_ids, TRAIN_WINDOWS), windows(test_ids)
    metrics = {"train": next_token_loss(model, data), "test": next_token_loss(model, test)}
    for folder, ids in (("data", data), ("test", test)):
        if (OUT / folder).exists():
            shutil.rmtree(OUT / folder)
        (OUT / folder).mkdir(parents=True)
        save_file({"input_ids": ids.contiguous()}, str(OUT / folder / "tokens.safetensors"))
    model.save_pretrained(str(OUT))  # config.json, generation_config.json, model.safetensors
    (OUT / "vocab.json").write_text(json.dumps(chars, ensure_ascii=False) + "\n")
    n_params = sum(p.numel() for p in model.parameters())
    prompt = "Alice was "
    card = f"""# tiny_gpt — gmcurv's bundled transformer sample

A character-level GPT-2-family language model, small enough to analyse in seconds.

- Architecture: `transformers`' `GPT2LMHeadModel` (pre-LayerNorm causal decoder),
  {cfg.n_layer} layers, {cfg.n_head} heads, n_embd {cfg.n_embd}, MLP {4 * cfg.n_embd},
  context {cfg.n_positions}, vocabulary {cfg.vocab_size} characters, `gelu_new`,
  `lm_head` tied to `wte`; {n_params:,} parameters; transformers {transformers.__version__}.
- Files: written by `save_pretrained` (`config.json`, `generation_config.json`,
  `model.safetensors`): gmcurv builds `GPT2LMHeadModel` from `config.json` with
  `transformers` (`pip install "gmcurv[hf]"`) and the library's causal-LM loss
  (`next_token`); `GPT2LMHeadModel.from_pretrained` loads the same directory.
  `vocab.json`: the characters, token id = position.
- Text: `corpus.txt` ({len(text):,} characters), public-domain works written into the repo
  from memory (small differences from printed editions are possible): Lewis Carroll,
  *Alice's Adventures in Wonderland*, chapter I (1865); Abraham Lincoln, the Gettysburg
  Address (1863); William Shakespeare, sonnets 18, 29, 73 and 116 (1609). One
  {BLOCK}-character block in ten (the 6th, 16th, ...) is held out, the rest is for training.
- Training: AdamW (lr {LR} with cosine decay, betas 0.9/0.95, weight decay 0.01, gradient
  clipping 1.0), {STEPS} steps of {BATCH} random {SEQ}-character windows, seed {SEED}, one
  thread.
- `data/tokens.safetensors`: {len(data)} training windows of {SEQ} characters
  (`input_ids` [{len(data)}, {SEQ}] int64; targets are the inputs shifted by one, the
  `next_token` loss). `test/tokens.safetensors`: {len(test)} held-out windows.
- Metrics (next-character cross-entropy in nats, greedy accuracy): train windows
  {metrics["train"][0]:.4f} / {metrics["train"][1]:.4f}; held-out
  {metrics["test"][0]:.4f} / {metrics["test"][1]:.4f}.
- Greedy continuation of "{prompt}": `{sample_text(model, chars, prompt)!r}`
- Try: `gmcurv info tiny_gpt/`, `gmcurv trace tiny_gpt/ tiny_gpt/data` (directory paths
  under `sample_models/`).
- Reproduce, in the gmcurv source repository: `python scripts/make_transformer_sample.py`.
"""
    (OUT / "MODEL_CARD.md").write_text(card)
    print(json.dumps({"tiny_gpt": metrics, "n_params": n_params}))


if __name__ == "__main__":
    main()
