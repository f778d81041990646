"""Train the bundled sample models from real, offline data and write them into the package.

    python scripts/make_samples.py            # needs scikit-learn (pip install -e .[dev])

digits_mlp: a 64-128-64-10 ReLU MLP on scikit-learn's bundled 8x8 digits (1,797 real
images, UCI ML hand-written digits). Deterministic: fixed seeds, one thread, full-batch
Adam. Writes model.safetensors (with gmcurv metadata), data/ as safetensors shards of
training examples, test/ with the held-out split, and MODEL_CARD.md.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from gmcurv.io.checkpoint import gmcurv_metadata, save_checkpoint

ROOT = Path(__file__).resolve().parents[1] / "sample_models"


def digits_split(seed: int = 0):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_train = 1257
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def train_mlp(x, y, sizes, activation=nn.ReLU, steps=150, lr=3e-3, seed=0, wd=1e-3):
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    model = nn.Sequential(*layers)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return model


def evaluate(model, x, y):
    with torch.no_grad():
        out = model(x)
        return float(nn.functional.cross_entropy(out, y)), float(
            (out.argmax(1) == y).float().mean()
        )


def write_shards(folder: Path, x, y, shard_size: int):
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for i, start in enumerate(range(0, len(x), shard_size)):
        save_file(
            {
                "inputs": x[start : start + shard_size].contiguous(),
                "targets": y[start : start + shard_size].contiguous(),
            },
            str(folder / f"shard-{i:03d}.safetensors"),
        )


def make_digits_mlp():
    torch.set_num_threads(1)
    (xtr, ytr), (xte, yte) = digits_split()
    sizes = [64, 128, 64, 10]
    model = train_mlp(xtr, ytr, sizes)
    train = evaluate(model, xtr, ytr)
    test = evaluate(model, xte, yte)
    out = ROOT / "digits_mlp"
    out.mkdir(parents=True, exist_ok=True)
    state = {f"net.{k}": v for k, v in model.state_dict().items()}
    meta = gmcurv_metadata(
        "mlp:relu",
        "cross_entropy",
        dataset="sklearn digits (8x8, 1797 images), inputs scaled to [0, 1]",
        train_metrics={"loss": round(train[0], 4), "accuracy": round(train[1], 4)},
        test_metrics={"loss": round(test[0], 4), "accuracy": round(test[1], 4)},
        training="full-batch Adam lr=3e-3 wd=1e-3, 150 steps, seed 0",
    )
    save_checkpoint(out / "model.safetensors", state, meta)
    write_shards(out / "data", xtr[:1024], ytr[:1024], 256)
    write_shards(out / "test", xte, yte, 540)
    card = f"""# digits_mlp — gmcurv's bundled sample model

- Architecture: MLP 64-128-64-10, ReLU (`net.0`, `net.2`, `net.4`),
  {sum(p.numel() for p in model.parameters()):,} parameters.
- Data: scikit-learn's bundled 8x8 digits (1,797 real hand-written digit images, UCI), pixel
  values scaled to [0, 1]; split with seed 0 into 1,257 training and 540 test images.
- Training: full-batch Adam (lr 3e-3, weight decay 1e-3), 150 steps, seed 0, one thread.
- Metrics: train loss {train[0]:.4f}, accuracy {train[1]:.4f};
  test loss {test[0]:.4f}, accuracy {test[1]:.4f}.
- `data/`: the first 1,024 training images in 4 safetensors shards (`inputs` [n, 64] float32,
  `targets` [n] int64) — the sample `gmcurv trace` uses by default.
- `test/`: the 540 held-out images.
- Reproduce, in the gmcurv source repository: `python scripts/make_samples.py` (needs
  scikit-learn).
"""
    (out / "MODEL_CARD.md").write_text(card)
    print(json.dumps({"digits_mlp": {"train": train, "test": test}}))


if __name__ == "__main__":
    make_digits_mlp()
