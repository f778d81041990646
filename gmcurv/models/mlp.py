"""Multi-layer perceptrons, including ones inferred from a bare state dict.

A checkpoint with keys ``fc1.weight, fc1.bias, fc2.weight ...`` (or ``net.0.weight`` style
``nn.Sequential`` keys) describes an MLP up to its activation: the Linear layers are chained
in natural key order and their shapes must connect (``out`` of one = ``in`` of the next).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from gmcurv.errors import ArchitectureError

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "softplus": nn.Softplus,
    "identity": nn.Identity,
}


@dataclass(frozen=True)
class LinearSpec:
    """One Linear layer of an MLP: its module path and shape."""

    path: str
    in_features: int
    out_features: int
    bias: bool


class MLP(nn.Module):
    """Linear layers at arbitrary module paths, applied in order with an activation between.

    Inputs whose last dimension is not ``in_features`` but whose trailing dimensions multiply
    to it are flattened (images); otherwise the layers act on the last dimension (tokens).
    """

    def __init__(self, layers: list[LinearSpec], activation: str = "relu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ArchitectureError(
                f"unknown activation {activation!r}",
                hint=f"use one of: {', '.join(ACTIVATIONS)}",
            )
        self.activation_name = activation
        self.act = ACTIVATIONS[activation]()
        self._paths = [spec.path for spec in layers]
        for spec in layers:
            _set_submodule(
                self, spec.path, nn.Linear(spec.in_features, spec.out_features, spec.bias)
            )
        self.in_features = layers[0].in_features
        self.out_features = layers[-1].out_features

    @property
    def linears(self) -> list[nn.Linear]:
        return [self.get_submodule(p) for p in self._paths]

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features and math.prod(x.shape[1:]) == self.in_features:
            x = x.reshape(x.shape[0], -1)  # [N, C, H, W] -> [N, C*H*W]
        layers = self.linears
        for i, layer in enumerate(layers):
            x = layer(x)
            if i < len(layers) - 1:
                x = self.act(x)
        return x


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Create intermediate containers so that `module` lives at dotted `path` under `root`."""
    *parents, leaf = path.split(".")
    node = root
    for name in parents:
        if not hasattr(node, name) or not isinstance(getattr(node, name), nn.Module):
            node.add_module(name, nn.Module())
        node = getattr(node, name)
    node.add_module(leaf, module)


def natural_key(text: str) -> list[object]:
    """Sort key treating digit runs as numbers: ``fc2 < fc10``, ``net.2 < net.10``."""
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", text)]


def infer_mlp_layers(shapes: Mapping[str, tuple[int, ...]], source: str) -> list[LinearSpec]:
    """Chain ``<path>.weight`` / ``<path>.bias`` entries of a state dict into MLP layers."""
    weights = {k[: -len(".weight")]: s for k, s in shapes.items() if k.endswith(".weight")}
    biases = {k[: -len(".bias")]: s for k, s in shapes.items() if k.endswith(".bias")}
    other = [k for k in shapes if not (k.endswith((".weight", ".bias")))]
    if other or not weights:
        raise ArchitectureError(
            f"{source}: cannot infer an MLP: "
            + (f"unexpected keys {other[:4]}" if other else "no '<layer>.weight' keys"),
            hint="an MLP checkpoint holds only '<layer>.weight' and '<layer>.bias' tensors; "
            "for other models pass --arch path/to/model.py:factory",
        )
    orphans = sorted(set(biases) - set(weights))
    if orphans:
        raise ArchitectureError(
            f"{source}: bias without weight for layers {orphans[:4]}",
            hint="the checkpoint does not look like an MLP; pass --arch path/to/model.py:factory",
        )
    layers: list[LinearSpec] = []
    for path in sorted(weights, key=natural_key):
        shape = weights[path]
        if len(shape) != 2:
            raise ArchitectureError(
                f"{source}: {path}.weight has shape {tuple(shape)}; an MLP needs 2-D weights",
                hint="for conv nets or other models pass --arch path/to/model.py:factory",
            )
        out_f, in_f = shape
        if path in biases and tuple(biases[path]) != (out_f,):
            raise ArchitectureError(
                f"{source}: {path}.bias has shape {tuple(biases[path])}, expected ({out_f},)",
                hint="the checkpoint is inconsistent; re-export it",
            )
        if layers and layers[-1].out_features != in_f:
            prev = layers[-1]
            raise ArchitectureError(
                f"{source}: layers do not chain: {prev.path} outputs {prev.out_features} "
                f"features but {path} expects {in_f}",
                hint="an inferred MLP applies layers in natural name order; for other wiring "
                "pass --arch path/to/model.py:factory",
            )
        layers.append(LinearSpec(path, in_f, out_f, path in biases))
    return layers


def build_mlp(shapes: Mapping[str, tuple[int, ...]], activation: str, source: str) -> MLP:
    """An `MLP` whose state dict keys and shapes equal `shapes`."""
    return MLP(infer_mlp_layers(shapes, source), activation)


def mlp_state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a model, as `infer_mlp_layers` expects them."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


__all__ = ["ACTIVATIONS", "MLP", "LinearSpec", "build_mlp", "infer_mlp_layers"]
