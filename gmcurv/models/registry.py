"""Registry of architecture families.

- `FAMILIES` maps a family name (the part of ``--arch`` / ``gmcurv.arch`` metadata before the
  colon) to a builder ``(option, config, shapes, source) -> nn.Module``.
- `HF_MODEL_TYPES` maps a Hugging Face ``config.json`` ``model_type`` to a builder
  ``(config, shapes, source) -> nn.Module`` and the loss that family trains with.
- `FAMILY_LOSSES`: a family's default loss when neither ``--loss`` nor metadata names one.

Built in: ``mlp`` (family), ``gpt2`` (family and ``model_type``; `gmcurv.models.gpt2`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from gmcurv.errors import ArchitectureError
from gmcurv.models.gpt2 import build_gpt2, gpt2_family
from gmcurv.models.mlp import ACTIVATIONS, build_mlp

Shapes = Mapping[str, tuple[int, ...]]
FamilyBuilder = Callable[[str | None, dict[str, Any] | None, Shapes, str], nn.Module]


@dataclass(frozen=True)
class HFFamily:
    """A Hugging Face model type gmcurv can build without `transformers`."""

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


FAMILIES: dict[str, FamilyBuilder] = {"mlp": _mlp, "gpt2": gpt2_family}
HF_MODEL_TYPES: dict[str, HFFamily] = {"gpt2": HFFamily(build_gpt2, "next_token")}
# the loss a family trains with, when neither --loss nor checkpoint metadata names one
FAMILY_LOSSES: dict[str, str] = {"gpt2": "next_token"}


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
    """Build a model from a Hugging Face ``config.json``; returns (model, loss name)."""
    model_type = config.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        known = ", ".join(HF_MODEL_TYPES) or "none yet"
        raise ArchitectureError(
            f"{source}: config.json has model_type {model_type!r}, which gmcurv cannot build "
            f"(supported: {known})",
            hint="pass --arch path/to/model.py:factory to build the model yourself",
        )
    family = HF_MODEL_TYPES[model_type]
    return family.build(config, shapes, source), family.loss
