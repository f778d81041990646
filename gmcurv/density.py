"""Eigenvalue spectral density by stochastic Lanczos quadrature (SLQ).

For a probe ``v = z / ||z||`` (Rademacher ``z``), ``m`` Lanczos steps give ``T = S Θ S^T``;
the Gauss quadrature with nodes ``θ_j`` (Ritz values) and weights ``w_j = S[0, j]^2`` (first
components of the Ritz vectors, squared; ``Σ_j w_j = 1``) reproduces
``v^T p(A) v = Σ_j w_j p(θ_j)`` exactly for polynomials of degree ``<= 2m - 1``. Averaging
over probes estimates the normalised spectral measure ``(1/n) Σ_i δ(λ - λ_i)``, whose
``k``-th moment is ``tr(A^k) / n``. The density is that measure smoothed by a Gaussian of
width ``σ``: ``φ(x) = mean_probes Σ_j w_j N(x; θ_j, σ^2)`` (integrates to 1).

Tiny problems (``method='exact'``) use all ``n`` eigenvalues with weights ``1/n``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gmcurv.errors import ConfigError
from gmcurv.estimate import Estimate
from gmcurv.lanczos import lanczos_tridiagonal
from gmcurv.stochastic import rademacher

Matvec = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Quadrature:
    """Gauss quadrature nodes and weights per probe (rows padded with zero weights)."""

    nodes: Tensor  # [probes, m]
    weights: Tensor  # [probes, m], rows sum to 1
    steps: list[int]  # Lanczos steps actually taken per probe
    n_matvecs: int
    method: str = "slq"

    @property
    def probes(self) -> int:
        return int(self.nodes.shape[0])

    def moment(self, k: int) -> tuple[float, float | None]:
        """``tr(A^k)/n``: the mean over probes and its standard error (None when exact)."""
        per_probe = (self.weights * self.nodes.pow(k)).sum(1)
        mean = float(per_probe.mean())
        if self.method == "exact" or self.probes < 2:
            return mean, None
        return mean, float(per_probe.std(unbiased=True)) / math.sqrt(self.probes)


def slq(
    matvec: Matvec,
    n: int,
    probes: int,
    steps: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Quadrature:
    """`probes` independent Lanczos quadratures of `steps` steps each (see module doc)."""
    if probes < 1 or steps < 1:
        raise ConfigError("SLQ needs at least one probe and one Lanczos step")
    gen = torch.Generator(device=device).manual_seed(int(seed))
    rows: list[tuple[Tensor, Tensor]] = []
    taken: list[int] = []
    count = 0
    for _ in range(probes):
        z = rademacher(n, gen, dtype, device)
        alpha, beta = lanczos_tridiagonal(matvec, z, steps)
        count += len(alpha)
        T = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
        theta, S = torch.linalg.eigh(T)
        rows.append((theta, S[0].pow(2)))  # weights: first components squared
        taken.append(len(alpha))
    m = max(taken)
    nodes = torch.zeros(probes, m, dtype=torch.float64)
    weights = torch.zeros(probes, m, dtype=torch.float64)
    for i, (theta, w) in enumerate(rows):
        nodes[i, : len(theta)] = theta
        nodes[i, len(theta) :] = theta[-1]
        weights[i, : len(w)] = w
    return Quadrature(nodes, weights, taken, count)


def exact_quadrature(eigenvalues: Tensor) -> Quadrature:
    """All eigenvalues with weights ``1/n`` (one 'probe')."""
    w = eigenvalues.double().reshape(1, -1)
    return Quadrature(w, torch.full_like(w, 1.0 / w.numel()), [w.numel()], 0, "exact")


def gaussian_density(q: Quadrature, grid: Tensor, sigma: float) -> Tensor:
    """``φ(x) = mean_probes Σ_j w_j N(x; θ_j, σ^2)`` on `grid`."""
    x = grid.double().reshape(-1, 1, 1)
    kern = torch.exp(-0.5 * ((x - q.nodes) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    return (kern * q.weights).sum(-1).mean(-1)


@dataclass(frozen=True)
class Spectrum:
    """A smoothed spectral density with its quadrature and moments."""

    kind: str
    method: str
    grid: Tensor
    density: Tensor
    sigma: float
    quadrature: Quadrature
    moments: list[Estimate]
    trace: Estimate
    n_params: int
    n_matvecs: int
    notes: list[str] = field(default_factory=list)


def density_from(
    q: Quadrature,
    kind: str,
    n_params: int,
    *,
    points: int = 1000,
    rel_sigma: float = 0.01,
    n_moments: int = 4,
) -> Spectrum:
    """Broaden quadrature `q` into a density on a grid covering the nodes ± 5σ; moments
    ``tr(A^k)/n`` for ``k = 1..n_moments``; the trace is ``n`` times the first moment."""
    lo, hi = float(q.nodes.min()), float(q.nodes.max())
    sigma = rel_sigma * max(hi - lo, abs(hi), abs(lo), 1e-12)
    grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, points, dtype=torch.float64)
    dens = gaussian_density(q, grid, sigma)
    label = "exact(dense)" if q.method == "exact" else "slq"
    samples = q.probes if q.method != "exact" else n_params
    moments = []
    for k in range(1, n_moments + 1):
        mean, se = q.moment(k)
        moments.append(Estimate(mean, se, samples, label, True, n_matvecs=q.n_matvecs))
    m1, se1 = q.moment(1)
    trace = Estimate(
        m1 * n_params, None if se1 is None else se1 * n_params, samples, label, True,
        n_matvecs=q.n_matvecs,
    )  # fmt: skip
    return Spectrum(kind, label, grid, dens, sigma, q, moments, trace, n_params, q.n_matvecs)


def spectrum_summary(
    objective,
    data,
    kind: str,
    *,
    method: str = "auto",
    probes: int = 3,
    steps: int = 50,
    seed: int = 0,
    points: int = 1000,
    rel_sigma: float = 0.01,
    batch_size: int = 256,
    budget_bytes: int | None = None,
    progress: Callable[[int], None] | None = None,
    phase: Callable[[str, int | None], None] | None = None,
) -> Spectrum:
    """What ``gmcurv spectrum`` reports, for the Hessian or the GGN: SLQ (``slq``/``lanczos``)
    or the exact spectrum of the dense matrix (``exact``; ``auto`` picks it when tiny).
    `phase(label, total)` announces the graph build and the products to come,
    `progress(k)` counts the products."""
    from gmcurv.hessian import dense_matrix, graphs_first, resolve_method
    from gmcurv.operator import CurvatureOperator

    if kind not in ("hessian", "ggn"):
        raise ConfigError(
            f"--curvature {kind} has no spectral density here",
            hint="use --curvature hessian or ggn",
        )
    P, n = objective.space.size, data.n
    resolved = resolve_method(method, P, n)
    resolved = "slq" if resolved in ("hutchpp", "hutchinson", "lanczos") else resolved
    if resolved not in ("exact", "slq"):
        raise ConfigError(
            f"--method {method} does not give a spectral density",
            hint="use auto, exact or lanczos (stochastic Lanczos quadrature)",
        )
    op = CurvatureOperator(objective, data, batch_size, kind, progress=progress)
    if phase is not None:
        graphs_first(op, phase)  # the graph build: its own phase, before the products
        dense = resolved == "exact"
        label = "dense matrix: products" if dense else "Lanczos quadrature: products"
        phase(label, P if dense else probes * min(steps, P))
    if resolved == "exact":
        q = exact_quadrature(torch.linalg.eigvalsh(dense_matrix(op, budget_bytes)))
        q = Quadrature(q.nodes, q.weights, q.steps, op.n_matvecs, "exact")
    else:
        q = slq(op.matvec, P, probes, steps, seed=seed, device=objective.device)
    spec = density_from(q, kind, P, points=points, rel_sigma=rel_sigma)
    notes = []
    if resolved == "slq" and op.is_random(seed):
        notes.append("products are random (train mode with Dropout): the density is blurred")
    if notes:
        spec = Spectrum(**{**spec.__dict__, "notes": notes})
    return spec
