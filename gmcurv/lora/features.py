"""Features of a LoRA update that do not depend on how it is factored.

``ΔW = s B A`` is unchanged when ``(B, A) -> (B R, R⁻¹ A)`` for any ``R ∈ GL(r)``, so any
function of ``ΔW`` alone is an invariant of the factors. Its singular values come without
forming the ``[m, k]`` product (Putterman et al., Learning on LoRAs, 2024):

    B = Q_B R_B,   Aᵀ = Q_A R_A        (reduced QR: Q_B [m, r'], Q_A [k, r''])
    B A = Q_B (R_B R_Aᵀ) Q_Aᵀ,         R_B R_Aᵀ = U_m Σ V_mᵀ   (an r' x r'' SVD)
    σ(ΔW) = |s| Σ,   U = Q_B U_m,   V = Q_A V_m

at cost ``O((m + k) r²)``. From ``σ``: Frobenius norm ``sqrt(Σ σ²)``, spectral norm ``σ₁``,
nuclear norm ``Σ σ``, effective rank ``exp(H(p))`` with ``p = σ / Σ σ`` (Roy & Vetterli,
2007; 0 for a zero update), stable rank ``||ΔW||_F² / ||ΔW||_2²`` (0 for a zero update) and
the numerical rank (``σ > σ₁ max(m, k) ε`` of the factors' dtype).

The canonical factors ``B' = U sqrt(Σ)``, ``A' = sqrt(Σ) Vᵀ`` (of the unscaled product, so
the adapter's config still applies) are the same for every factorisation of ``ΔW``: the
sign of each singular pair is fixed by making the largest-magnitude entry of ``U[:, j]``
positive (ties: the first).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gmcurv.errors import GmcurvWarning
from gmcurv.estimate import Estimate
from gmcurv.lora.adapter import Adapter, LoraLayer

METHOD = "QR + r x r SVD"


@dataclass(frozen=True)
class UpdateSVD:
    """Thin SVD of the unscaled product ``B A = U diag(S) Vᵀ`` (float64)."""

    U: Tensor  # [m, q]
    S: Tensor  # [q], descending, q = min(r, m, k)
    V: Tensor  # [k, q]


def update_svd(B: Tensor, A: Tensor) -> UpdateSVD:
    """SVD of ``B A`` (``B [m, r]``, ``A [r, k]``) from two QRs and a small SVD."""
    B, A = B.double(), A.double()
    Q_B, R_B = torch.linalg.qr(B)  # [m, r'], [r', r]
    Q_A, R_A = torch.linalg.qr(A.T)  # [k, r''], [r'', r]
    U_m, S, Vh_m = torch.linalg.svd(R_B @ R_A.T, full_matrices=False)
    q = min(B.shape[1], B.shape[0], A.shape[1])
    return UpdateSVD(Q_B @ U_m[:, :q], S[:q], Q_A @ Vh_m[:q].T)


def singular_values(layer: LoraLayer) -> Tensor:
    """``σ(s B A)``, descending, float64."""
    B2, A2 = layer.matrices()
    return abs(layer.scale) * update_svd(B2, A2).S


def effective_rank(sigma: Tensor) -> float:
    """Roy & Vetterli's ``exp(-Σ p log p)``, ``p = σ / Σ σ`` (0 for a zero matrix)."""
    total = float(sigma.sum())
    if total <= 0:
        return 0.0
    p = sigma[sigma > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def stable_rank(sigma: Tensor) -> float:
    """``||M||_F² / ||M||_2²`` (0 for a zero matrix)."""
    top = float(sigma.max()) if sigma.numel() else 0.0
    return float(sigma.pow(2).sum()) / top**2 if top > 0 else 0.0


def numerical_rank(sigma: Tensor, shape: tuple[int, int], dtype: torch.dtype) -> int:
    """Singular values above ``σ₁ max(m, k) ε`` (ε of the factors' storage dtype)."""
    if not sigma.numel() or float(sigma.max()) <= 0:
        return 0
    tol = float(sigma.max()) * max(shape) * torch.finfo(dtype).eps
    return int((sigma > tol).sum())


@dataclass(frozen=True)
class LayerFeatures:
    """GL(r)-invariant features of one layer's update ``ΔW = s B A``."""

    module: str
    kind: str
    shape: tuple[int, int]  # (m, k) of the update matrix
    rank: int  # r, the adapter's rank for this layer
    alpha: float
    scale: float
    singular_values: list[Estimate]
    frobenius: Estimate
    spectral: Estimate
    nuclear: Estimate
    effective_rank: Estimate
    stable_rank: Estimate
    numerical_rank: int
    target: str | None = None  # base module (when mapped onto a model)
    param: str | None = None  # base parameter the update applies to


@dataclass(frozen=True)
class AdapterFeatures:
    """Per-layer features and totals of one adapter."""

    name: str
    path: str
    sha256: str
    r: int
    lora_alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    n_layers: int
    n_params: int
    frobenius: Estimate  # ||dθ|| = sqrt(Σ_l ||ΔW_l||_F²)
    layers: dict[str, LayerFeatures] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


def _exact(value: float, what: str) -> Estimate:
    return Estimate.exact_value(value, 0, f"{what} ({METHOD})")


def layer_features(layer: LoraLayer, dtype: torch.dtype | None = None) -> LayerFeatures:
    """Invariant features of one layer (see module doc); `dtype` sets the rank tolerance."""
    sigma = singular_values(layer)
    shape = layer.shape
    return LayerFeatures(
        module=layer.module,
        kind=layer.kind,
        shape=shape,
        rank=layer.rank,
        alpha=layer.alpha,
        scale=layer.scale,
        singular_values=[_exact(float(v), "singular value") for v in sigma],
        frobenius=_exact(float(sigma.pow(2).sum().sqrt()), "Frobenius norm"),
        spectral=_exact(float(sigma.max()) if sigma.numel() else 0.0, "spectral norm"),
        nuclear=_exact(float(sigma.sum()), "nuclear norm"),
        effective_rank=_exact(effective_rank(sigma), "entropy effective rank"),
        stable_rank=_exact(stable_rank(sigma), "stable rank"),
        numerical_rank=numerical_rank(sigma, shape, dtype or layer.A.dtype),
    )


def adapter_features(adapter: Adapter) -> AdapterFeatures:
    """Features of every layer of `adapter` and its totals."""
    layers = {m: layer_features(layer, adapter.dtype) for m, layer in adapter.layers.items()}
    total = math.sqrt(sum(f.frobenius.value**2 for f in layers.values()))
    if total == 0:
        warnings.warn(
            f"{adapter.path}: the update is zero (every lora_B is 0, as peft initialises it): "
            "is this an untrained adapter?",
            GmcurvWarning,
            stacklevel=2,
        )
    cfg = adapter.config
    return AdapterFeatures(
        name=adapter.name,
        path=str(adapter.path),
        sha256=adapter.sha256,
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        use_rslora=cfg.use_rslora,
        fan_in_fan_out=cfg.fan_in_fan_out,
        n_layers=len(layers),
        n_params=adapter.n_params,
        frobenius=_exact(total, "update norm"),
        layers=layers,
        ignored=list(adapter.ignored),
    )


# ------------------------------------------------------------------------- canonical form
def canonical_factors(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """``(U sqrt(Σ), sqrt(Σ) Vᵀ)`` with ``B A = U Σ Vᵀ`` (float64; padded with zeros to rank
    r when ``min(m, k) < r``), signs fixed as in the module doc."""
    svd = update_svd(B, A)
    U, V = svd.U, svd.V
    if U.shape[1]:
        pivot = U.abs().argmax(0)
        signs = torch.sign(U[pivot, torch.arange(U.shape[1])])
        signs[signs == 0] = 1.0
        U, V = U * signs, V * signs
    root = svd.S.clamp_min(0).sqrt()
    Bc, Ac = U * root, (V * root).T
    r, q = B.shape[1], svd.S.numel()
    if q < r:
        Bc = torch.cat([Bc, Bc.new_zeros(Bc.shape[0], r - q)], 1)
        Ac = torch.cat([Ac, Ac.new_zeros(r - q, Ac.shape[1])], 0)
    return Bc, Ac


def canonical_adapter(adapter: Adapter) -> Adapter:
    """`adapter` with every layer's factors in canonical form (its storage dtype kept)."""
    factors = {}
    for module, layer in adapter.layers.items():
        B2, A2 = layer.matrices()
        Bc, Ac = canonical_factors(B2, A2)
        factors[module] = (Bc.to(layer.B.dtype), Ac.to(layer.A.dtype))
    return adapter.with_factors(factors)
