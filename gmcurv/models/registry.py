"""Registry of architecture families.

- `FAMILIES` maps a family name (the part of ``--arch`` / ``gmcurv.arch`` metadata before the
  colon) to a builder ``(option, config, shapes, source) -> nn.Module``.
- `HF_MODEL_TYPES` maps a Hugging Face ``config.json`` ``model_type`` to a builder
  ``(config, shapes, source) -> nn.Module`` and the loss that family trains with; any
  other ``model_type`` is built by `transformers` itself (`gmcurv.models.hf`).
- `FAMILY_LOSSES`: a family's default loss when neither ``--loss`` nor metadata names one.

Built in: ``mlp`` and ``hf[:Class]`` (a `transformers` model from its config:
``config.json`` beside the weights, or the config gmcurv stored in a checkpoint it wrote).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from gmcurv.errors import ArchitectureError
from gmcurv.models.mlp import ACTIVATIONS, build_mlp

Shapes = Mapping[str, tuple[int, ...]]
FamilyBuilder = Callable[[str | None, dict[str, Any] | None, Shapes, str], nn.Module]


@dataclass(frozen=True)
class HFFamily:
    """A Hugging Face model type built by a registered builder instead of `transformers`."""

    build: Callable[[dict[str, Any], Shapes, str], nn.Module]
    loss: str


def _mlp(option: str | None, config: dict[str, Any] | None, shapes: Shapes, source: str):
    """An MLP fitted to `shapes`; the activation must be named (weights do not tell it)."""
    activation = option or (config or {}).get("activation")
    if activation is None:
        raise ArchitectureError(
            f"{source}: --arch mlp needs the activation: the weights do not tell it, and the "
            "loss and every curvature depend on it (the checkpoint's metadata names none)",
            hint=f"pass --arch mlp:<activation>, one of {'|'.join(ACTIVATIONS)}",
        )
    if activation not in ACTIVATIONS:
        raise ArchitectureError(
            f"unknown MLP activation {activation!r}",
            hint=f"use --arch mlp:<activation> with one of: {', '.join(ACTIVATIONS)}",
        )
    return build_mlp(shapes, activation, source)


def _hf(option: str | None, config: dict[str, Any] | None, shapes: Shapes, source: str):
    from gmcurv.models.hf import build_hf, is_hf_config

    if not is_hf_config(config):
        raise ArchitectureError(
            f"{source}: --arch hf needs the model's config.json beside the weights",
            hint="point MODEL at the directory save_pretrained wrote",
        )
    return build_hf(config, shapes, source, option)[0]


FAMILIES: dict[str, FamilyBuilder] = {"mlp": _mlp, "hf": _hf}
HF_MODEL_TYPES: dict[str, HFFamily] = {}
# the loss a family trains with, when neither --loss nor checkpoint metadata names one
FAMILY_LOSSES: dict[str, str] = {}


def register_family(name: str, builder: FamilyBuilder, loss: str | None = None) -> None:
    """Make ``--arch name[:option]`` build models with `builder` (trained with `loss`)."""
    FAMILIES[name] = builder
    if loss is not None:
        FAMILY_LOSSES[name] = loss


def family_loss(spec: str) -> str | None:
    """The default loss of ``family[:option]``, if the family declares one."""
    return FAMILY_LOSSES.get(spec.partition(":")[0])


def register_hf_model_type(model_type: str, family: HFFamily) -> None:
    """Make a ``config.json`` with this ``model_type`` loadable."""
    HF_MODEL_TYPES[model_type] = family


def build_family(
    spec: str, shapes: Shapes, source: str, config: dict[str, Any] | None = None
) -> nn.Module:
    """Build ``family[:option]`` (e.g. ``mlp:tanh``) to fit a state dict's shapes."""
    family, _, option = spec.partition(":")
    if family not in FAMILIES:
        raise ArchitectureError(
            f"unknown architecture family {family!r} in --arch {spec!r}",
            hint=f"use one of: {', '.join(FAMILIES)}, or path/to/model.py:factory, "
            "or package.module:factory",
        )
    return FAMILIES[family](option or None, config, shapes, source)


def build_from_hf_config(
    config: dict[str, Any], shapes: Shapes, source: str
) -> tuple[nn.Module, str]:
    """Build a model from a Hugging Face ``config.json``; returns (model, loss name).

    A registered ``model_type`` uses its builder; any other is built by `transformers`.
    """
    model_type = config.get("model_type")
    if model_type in HF_MODEL_TYPES:
        family = HF_MODEL_TYPES[model_type]
        return family.build(config, shapes, source), family.loss
    if not isinstance(model_type, str):
        raise ArchitectureError(
            f"{source}: config.json names no model_type",
            hint="use the config.json save_pretrained wrote, or --arch path/to/model.py:factory",
        )
    from gmcurv.models.hf import build_hf

    model, _, loss = build_hf(config, shapes, source)
    return model, loss
