"""Closed forms for the Fisher on decomposed gradients.

With ``J`` the ``[N C, P]`` matrix whose rows are the gradients ``g[n,c]``,
``F = (1/N) J^T J`` and:

- trace: ``tr F = (1/N) Σ_{n,c} ||g[n,c]||^2`` (per block: the same sum over its parameters);
- diagonal: ``diag F = (1/N) Σ_{n,c} g[n,c]^2``;
- Gram kernel: ``K = J J^T = Σ_blocks K_block`` (``[N C, N C]``, float64); the nonzero
  eigenvalues of ``F`` are ``eig(K) / N`` and for ``K u = μ u`` the unit eigenvector is
  ``v = J^T u / sqrt(μ)`` — exact top-k for any ``P`` at cost ``O((N C)^2 Σ(I+O) + (N C)^3)``;
- products: ``F v = (1/N) J^T (J v)``.

Streaming: `FisherAccumulator` sums traces and diagonals batch by batch, keeping only the
per-example squared norms (``[N]`` per block), which also give the standard error of the
trace as an estimate of the population Fisher.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gmcurv.capture import DecomposedGradients


def _blocks(dg: DecomposedGradients, names: Iterable[str] | None):
    if names is None:
        return dg.blocks
    wanted = set(names)
    return tuple(b for b in dg.blocks if b.name in wanted)


def per_example_sq_norms(dg: DecomposedGradients) -> dict[str, Tensor]:
    """``s[n] = Σ_c ||g[n,c]||^2`` restricted to each block, ``{block: [N]}``."""
    return {b.name: b.source.sq_norms().sum(1) for b in dg.blocks}


def fisher_trace(dg: DecomposedGradients) -> float:
    """``tr F`` over all captured parameters."""
    return float(sum(v.sum() for v in per_example_sq_norms(dg).values())) / dg.n


def fisher_diagonal(dg: DecomposedGradients) -> dict[str, Tensor]:
    """``diag F`` in parameter layout, ``{param: tensor}``."""
    out: dict[str, Tensor] = {}
    for b in dg.blocks:
        for k, v in b.source.diag().items():
            out[k] = v / dg.n
    return out


def gram_kernel(dg: DecomposedGradients, blocks: Iterable[str] | None = None) -> Tensor:
    """``K = J J^T`` (float64, ``[N C, N C]``), optionally over a subset of blocks."""
    chosen = _blocks(dg, blocks)
    size = dg.n * dg.columns
    K = torch.zeros(size, size, dtype=torch.float64, device=dg.losses.device)
    for b in chosen:
        K += b.source.gram()
    return K


def jvp(dg: DecomposedGradients, vector: Mapping[str, Tensor]) -> Tensor:
    """``J v`` as ``[N, C]`` for a direction in parameter layout (missing params are 0)."""
    out = None
    for b in dg.blocks:
        if not any(k in vector for k in b.params):
            continue
        full = {k: vector[k] if k in vector else torch.zeros(s, dtype=dg.losses.dtype,
                                                              device=dg.losses.device)
                for k, s in zip(b.params, b.shapes, strict=True)}
        part = b.source.jvp(full)
        out = part if out is None else out + part
    if out is None:
        return torch.zeros(dg.n, dg.columns, dtype=dg.losses.dtype, device=dg.losses.device)
    return out


def vjp(dg: DecomposedGradients, u: Tensor) -> dict[str, Tensor]:
    """``J^T u`` in parameter layout for ``u: [N, C]``."""
    out: dict[str, Tensor] = {}
    for b in dg.blocks:
        out.update(b.source.vjp(u))
    return out


def fisher_matvec(dg: DecomposedGradients, vector: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``F v = (1/N) J^T (J v)``."""
    return {k: v / dg.n for k, v in vjp(dg, jvp(dg, vector)).items()}


def fisher_quadratic_form(dg: DecomposedGradients, vector: Mapping[str, Tensor]) -> float:
    """``v^T F v = (1/N) ||J v||^2`` without forming ``F``."""
    return float(jvp(dg, vector).double().pow(2).sum()) / dg.n


@dataclass(frozen=True)
class FisherEigen:
    """Top eigenpairs of ``F`` (exact, via the Gram kernel)."""

    values: Tensor  # [k], descending
    vectors: list[dict[str, Tensor]] | None  # unit eigenvectors in parameter layout
    rank: int  # numerical rank of K (how many nonzero eigenvalues F has)


def fisher_eigen(
    dg: DecomposedGradients,
    k: int = 5,
    blocks: Iterable[str] | None = None,
    vectors: bool = False,
) -> FisherEigen:
    """The `k` largest eigenvalues of ``F`` (restricted to `blocks`) and optionally vectors."""
    K = gram_kernel(dg, blocks)
    mu, U = torch.linalg.eigh(K)
    mu, U = mu.flip(0), U.flip(1)
    tol = mu[0].abs() * K.shape[0] * torch.finfo(torch.float64).eps if len(mu) else 0.0
    rank = int((mu > tol).sum())
    take = min(k, len(mu))
    values = (mu[:take] / dg.n).clamp_min(0.0)
    vecs = None
    if vectors:
        sub = DecomposedGradients(_blocks(dg, blocks), dg.fisher, dg.losses)
        vecs = []
        for j in range(take):
            u = U[:, j].reshape(dg.n, dg.columns).to(dg.losses.dtype)
            scale = math.sqrt(max(float(mu[j]), 1e-300))
            vecs.append({name: t / scale for name, t in vjp(sub, u).items()})
    return FisherEigen(values, vecs, rank)


@dataclass
class FisherAccumulator:
    """Streams traces and diagonals over batches of decomposed gradients."""

    diagonal: bool = True
    sq_norms: dict[str, list[Tensor]] = field(default_factory=dict)
    diag_sums: dict[str, Tensor] = field(default_factory=dict)
    losses: list[Tensor] = field(default_factory=list)
    block_params: dict[str, tuple[str, ...]] = field(default_factory=dict)
    block_kinds: dict[str, str] = field(default_factory=dict)

    def add(self, dg: DecomposedGradients) -> None:
        for b in dg.blocks:
            self.block_params[b.name] = b.params
            self.block_kinds[b.name] = b.kind
            self.sq_norms.setdefault(b.name, []).append(b.source.sq_norms().sum(1).double())
            if self.diagonal:
                for k, v in b.source.diag().items():
                    v = v.double()
                    self.diag_sums[k] = v if k not in self.diag_sums else self.diag_sums[k] + v
        self.losses.append(dg.losses.double())

    @property
    def n(self) -> int:
        return sum(len(x) for x in self.losses)

    def per_example(self, block: str | None = None) -> Tensor:
        """``s[n]``: the example's contribution to the trace (one block or all)."""
        names = [block] if block else list(self.sq_norms)
        return sum(torch.cat(self.sq_norms[b]) for b in names)  # type: ignore[return-value]

    def trace(self, block: str | None = None) -> tuple[float, float]:
        """(``tr F`` on the sample, its standard error as an estimate of the population trace)."""
        s = self.per_example(block)
        n = s.numel()
        stderr = float(s.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
        return float(s.mean()), stderr

    def diag(self) -> dict[str, Tensor]:
        return {k: v / self.n for k, v in self.diag_sums.items()}

    def mean_loss(self) -> float:
        return float(torch.cat(self.losses).mean())
