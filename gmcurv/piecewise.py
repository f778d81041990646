"""Networks that are piecewise linear in each layer's parameters: ``H - G`` has zero
within-layer blocks.

``H - G = (1/N) Σ_n Σ_o r[n,o] ∇²f[n,o]`` (`gmcurv.hessian`). If the outputs ``f`` are
piecewise linear in each capture block's parameters ``θ_b`` with the others fixed, then
``∂²f / ∂θ_b ∂θ_b = 0`` almost everywhere (and exactly so in autograd, whose ReLU has zero
second derivative), so every diagonal block ``(H - G)_bb`` vanishes: per layer
``tr H_bb = tr G_bb`` and, as ``tr(H - G) = Σ_b tr (H - G)_bb``, ``tr H = tr G`` — for any
loss on the outputs. The off-diagonal blocks do not vanish (products of two layers).

Recognised, conservatively: an ``nn.Sequential`` (nested allowed) or a gmcurv ``MLP`` of
Linear / Conv layers, ReLU / LeakyReLU / ReLU6 / Hardtanh / Identity activations,
Flatten, Dropout, max- and average-pooling, and BatchNorm in eval mode (affine); every
module used once. Anything else (LayerNorm, smooth activations, attention, custom
forwards) is not claimed.
"""

from __future__ import annotations

from torch import nn

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PIECEWISE = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.Identity,
    nn.Flatten,
    nn.Dropout,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
)
_MLP_ACTIVATIONS = ("relu", "leaky_relu", "identity")


def _leaf_ok(module: nn.Module, mode: str) -> bool:
    if isinstance(module, _LAYERS + _PIECEWISE):
        return True
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and mode == "eval"


def piecewise_linear_reason(model: nn.Module, mode: str = "eval") -> str | None:
    """Why `model` is piecewise linear in each layer's parameters, or None if not shown."""
    from gmcurv.models.mlp import MLP

    seen: set[int] = set()

    def ok(module: nn.Module) -> bool:
        if id(module) in seen:
            return False  # a module applied twice makes f quadratic in its weights
        seen.add(id(module))
        if isinstance(module, MLP):
            return module.activation_name in _MLP_ACTIVATIONS and all(
                ok(layer) for layer in module.linears
            )
        if type(module) is nn.Sequential:
            return all(ok(child) for child in module)
        return not list(module.children()) and _leaf_ok(module, mode)

    if not ok(model):
        return None
    return (
        "the model is piecewise linear in each layer's parameters (Linear/Conv layers with "
        "ReLU-type activations), so the within-layer blocks of H - G vanish: per-layer "
        "Hessian traces equal the GGN's and tr H = tr G exactly (no products)"
    )
