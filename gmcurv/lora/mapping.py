"""Where an adapter's layers land in a base model, and the update ``dθ`` they make.

Each adapted module is found in the base model by its path (exactly, or as the unique
module whose path ends with the adapter's, or vice versa — adapters saved from
``GPT2LMHeadModel`` fit ``GPT2Model``-style checkpoints and back). The update of its weight
is kept low-rank, in the layout of ``weight.reshape(rows, -1)``:

    nn.Linear [out, in]                                       ΔW = (s B) A
    nn.Conv2d [out, in, kh, kw]                               ΔW = (s B2) A2, reshaped
    nn.Embedding [V, E]                                        ΔW = (s Aᵀ) Bᵀ
    HF Conv1D, other 2-d weights [in, out] with fan_in_fan_out ΔW = (s Aᵀ) Bᵀ

so ``dθ`` is ``left @ right`` on each adapted parameter and zero elsewhere. Several updates
on one parameter (tied weights) add up.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gmcurv.capture import is_hf_conv1d
from gmcurv.errors import GmcurvWarning
from gmcurv.lora.adapter import Adapter, AdapterError, LoraLayer


@dataclass(frozen=True)
class LayerUpdate:
    """One adapted module's update of one base parameter: ``left @ right`` reshaped."""

    module: str  # module path in the adapter
    target: str  # module path in the base model
    param: str  # base parameter name
    kind: str  # linear | conv2d | embedding | matrix
    left: Tensor  # [rows, r], scale folded in (float64)
    right: Tensor  # [r, cols] (float64)
    shape: tuple[int, ...]  # the parameter's shape

    def dense(self, dtype: torch.dtype | None = None, device=None) -> Tensor:
        """``ΔW`` in the parameter's shape (parameter-sized, never per example)."""
        return (self.left @ self.right).reshape(self.shape).to(dtype=dtype, device=device)


def _find(model: nn.Module, module: str, where: str) -> tuple[str, nn.Module]:
    modules = dict(model.named_modules())
    if module in modules:
        return module, modules[module]
    near = [m for m in modules if m and (module.endswith("." + m) or m.endswith("." + module))]
    if len(near) == 1:
        return near[0], modules[near[0]]
    with_weights = [
        m for m, mod in modules.items() if isinstance(getattr(mod, "weight", None), Tensor)
    ]
    if len(near) > 1:
        raise AdapterError(
            f"{where}: adapted module {module} is ambiguous in the base model "
            f"({', '.join(near[:4])})",
            hint="save the adapter against the same model class as the checkpoint",
        )
    listing = ", ".join(with_weights[:8]) + (" ..." if len(with_weights) > 8 else "")
    raise AdapterError(
        f"{where}: unknown target module {module}: the base model has no such module",
        hint=f"is this adapter for this model? Modules with weights: {listing}",
    )


def _shape_error(where: str, layer: LoraLayer, target: str, weight: Tensor) -> AdapterError:
    m, k = layer.shape
    return AdapterError(
        f"{where}: module {layer.module} ({layer.kind} update {m} x {k}) does not fit "
        f"{target}.weight of shape {tuple(weight.shape)}",
        hint="is this adapter for this model (and is fan_in_fan_out right)?",
    )


def layer_update(
    layer: LoraLayer, model: nn.Module, fan_in_fan_out: bool, where: str = "adapter"
) -> LayerUpdate:
    """The update `layer` makes on its base module's weight (see module doc)."""
    target, module = _find(model, layer.module, where)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        raise AdapterError(
            f"{where}: adapted module {target} has no weight to update",
            hint="LoRA adapts Linear, Conv2d and Embedding modules",
        )
    B2, A2 = (t.double() for t in layer.matrices())
    s = layer.scale
    m, k = layer.shape
    shape = tuple(weight.shape)
    param = next((n for n, p in model.named_parameters() if p is weight), None)
    if param is None:
        raise AdapterError(
            f"{where}: the weight of adapted module {target} is not a parameter of the model",
            hint="LoRA adapts trainable weights",
        )
    if layer.kind == "embedding":
        if not isinstance(module, nn.Embedding) or shape != (k, m):
            raise _shape_error(where, layer, target, weight)
        return LayerUpdate(layer.module, target, param, "embedding", s * A2.T, B2.T, shape)
    if isinstance(module, nn.Embedding):
        raise _shape_error(where, layer, target, weight)
    if layer.kind == "conv2d":
        if not isinstance(module, nn.Conv2d) or shape != (m, *layer.A.shape[1:]):
            raise _shape_error(where, layer, target, weight)
        return LayerUpdate(layer.module, target, param, "conv2d", s * B2, A2, shape)
    if isinstance(module, nn.Linear):  # [out, in] whatever fan_in_fan_out says
        if shape != (m, k):
            raise _shape_error(where, layer, target, weight)
        return LayerUpdate(layer.module, target, param, "linear", s * B2, A2, shape)
    if len(shape) == 2 and (fan_in_fan_out or is_hf_conv1d(module)) and shape == (k, m):
        return LayerUpdate(layer.module, target, param, "matrix", s * A2.T, B2.T, shape)
    if len(shape) == 2 and shape == (m, k):
        return LayerUpdate(layer.module, target, param, "matrix", s * B2, A2, shape)
    raise _shape_error(where, layer, target, weight)


def attach(adapter: Adapter, model: nn.Module) -> list[LayerUpdate]:
    """Map every layer of `adapter` onto `model` (typed errors for modules that are unknown
    or do not fit; warnings for modules ``target_modules`` does not name and tied weights)."""
    where = str(adapter.path)
    updates = [
        layer_update(layer, model, adapter.config.fan_in_fan_out, where)
        for layer in adapter.layers.values()
    ]
    stray = [u.module for u in updates if adapter.config.targets(u.module) is False]
    if stray:
        warnings.warn(
            f"{where}: target_modules in the config does not name {', '.join(stray[:4])}"
            + (" ..." if len(stray) > 4 else "")
            + "; their factors are used anyway",
            GmcurvWarning,
            stacklevel=2,
        )
    users: dict[int, list[str]] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        w = getattr(mod, "weight", None)
        if isinstance(w, Tensor):
            users.setdefault(id(w), []).append(path)
    params = dict(model.named_parameters())
    for u in updates:
        shared = users.get(id(params[u.param]), [])
        others = [p for p in shared if p != u.target]
        if others:
            warnings.warn(
                f"{where}: {u.target} shares its weight with {', '.join(others)}: the update is "
                "applied to the shared parameter (as merging the adapter does), so it changes "
                "those modules too",
                GmcurvWarning,
                stacklevel=2,
            )
    return updates


def update_direction(
    updates: list[LayerUpdate], dtype: torch.dtype, device: torch.device | str = "cpu"
) -> dict[str, Tensor]:
    """``dθ`` in parameter layout: ``{param: ΔW}`` (updates on one parameter summed)."""
    out: dict[str, Tensor] = {}
    for u in updates:
        d = u.dense(dtype, device)
        out[u.param] = d if u.param not in out else out[u.param] + d
    return out
