"""What a trained head records about itself: the zoo it learned from (split sizes, held-out
data and architectures), the training run, and the models it supports (read off the zoo's
training groups)."""

from __future__ import annotations

from typing import Any

import torch

from gmcurv.gradmetanet.zoo import ACTIVATIONS, HELD_OUT_ARCHS, HELD_OUT_DATASET, ZOO_VERSION


def _groups(plan: dict[str, Any], split: str) -> list[dict[str, Any]]:
    return [g for g in plan["groups"] if g["split"] == split]


def n_models(plan: dict[str, Any], split: str) -> int:
    """Checkpoints of the zoo's `split` ('train' or 'val'): one per recorded step."""
    return sum(len(g["steps"]) for g in _groups(plan, split))


def training_record(
    plan: dict[str, Any],
    *,
    train_models: int,
    val_models: int,
    config: dict[str, Any],
    commands: list[str],
    result: Any,
) -> dict[str, Any]:
    """The ``training`` metadata of a head: the zoo, the configuration, the commands that
    rebuild it, time, steps, the best epoch and its validation metrics."""
    return {
        "zoo": {
            "version": ZOO_VERSION,
            "size": plan["size"],
            "seed": plan["seed"],
            "train_models": train_models,
            "val_models": val_models,
            "held_out_dataset": HELD_OUT_DATASET,
            "held_out_archs": ["x".join(map(str, a)) for a in HELD_OUT_ARCHS],
            "datasets": sorted({g["dataset"] for g in _groups(plan, "train")}),
        },
        "config": config,
        "commands": commands,
        "seconds": result.seconds,
        "steps": result.steps,
        "best_epoch": result.best_epoch,
        "val": result.val_metrics,
        "torch": torch.__version__,
    }


def supported_models(plan: dict[str, Any]) -> dict[str, Any]:
    """The models a head trained on `plan` covers: MLPs of the trained depths (+1 layer of
    extrapolation), activations and widths, with the cross-entropy loss and empirical Fisher."""
    train = _groups(plan, "train")
    depths = [len(g["widths"]) + 1 for g in train]
    widths = [w for g in train for w in g["widths"]]
    return {
        "model": "MLP (Linear layers, one elementwise activation, vector inputs)",
        "loss": "cross_entropy",
        "fisher": "empirical",
        "activations": sorted({g["activation"] for g in train}) or list(ACTIVATIONS),
        "min_layers": min(depths) if depths else 1,
        "max_layers": (max(depths) + 1) if depths else 5,
        "trained_widths": sorted(set(widths)),
        "set_size": 128,
    }
