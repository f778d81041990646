"""Top eigenvalues and traces from the same products: Lanczos, then a deflated Hutchinson.

The Lanczos run for the top-k eigenvalues builds an orthonormal Krylov basis ``Q``
(``m`` rows, one product each). For any orthonormal ``Q`` and ``Π = I - QQ^T``,

    tr(P_b A) = Σ_j (q_j)_b^T (A q_j)_b + tr(Π P_b A Π)

(``P_b`` the coordinate projector of block ``b``), so the products Lanczos already made
give the first term exactly, per block and in total (``Σ_j q_j^T A q_j = Σ_j α_j``), and
Hutchinson probes ``Π g`` (Rademacher ``g`` drawn independently of the Lanczos start)
estimate the second without bias conditionally on ``Q`` — Hutch++ with the Krylov basis as
its sketch (Meyer et al. 2021; Chen & Hallman 2023, "Krylov-aware" trace estimation). The
Krylov basis captures the top of the spectrum better than Hutch++'s one-pass sketch
``orth(A S)``, and costs nothing beyond the eigenvalues' own products. The standard
errors are those of the residual probes (per block and in total), calibrated given ``Q``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from gmcurv.lanczos import LanczosResult, lanczos
from gmcurv.params import ParamSpace
from gmcurv.stochastic import (
    SharedTraces,
    Sketch,
    block_slices,
    deflated_block_traces,
    probe_dots,
)

Matvec = Callable[[Tensor], Tensor]
METHOD = "hutchpp(lanczos)"
RESIDUAL_SEED = 7_919  # offset of the residual probes' seed from the Lanczos start's


def lanczos_block_traces(
    matvec: Matvec,
    space: ParamSpace,
    blocks: Mapping[str, Sequence[str]],
    k: int,
    probes: int,
    *,
    tol: float,
    max_iters: int | None = None,
    restarts: int = 0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    rtol: float | None = None,
    offset: float = 0.0,
) -> tuple[LanczosResult, SharedTraces]:
    """Top-`k` eigenvalues by Lanczos (gap criterion, `tol` relative to ``|λ_max|``) and
    ``tr A`` with every block's ``tr A_bb`` from the same products plus residual probes
    (see module doc). The trace's products (basis plus residual probes) stop at `rtol`
    relative standard error of ``offset + trace`` or at `probes` (at least 2 residual
    probes)."""
    slices = block_slices(space, blocks)
    seen: list[tuple[float, dict[str, float]]] = []  # per product: (v^T A v, per block)

    def recording(v: Tensor) -> Tensor:
        y = matvec(v).to(torch.float64)
        seen.append(probe_dots(slices, v, y))
        return y

    res = lanczos(
        recording,
        space.size,
        k,
        tol=tol,
        max_iters=max_iters,
        seed=seed,
        dtype=torch.float64,
        device=device,
        max_restarts=restarts,
        criterion="gap",
        keep_basis=True,
    )
    assert res.basis is not None
    m = res.basis.shape[0]
    first = seen[:m]  # the first run's products are those with its basis vectors
    top = {b: sum(parts[b] for _, parts in first) for b in blocks}
    sketch = Sketch(res.basis, sum(q for q, _ in first), top, m, METHOD)
    traces = deflated_block_traces(
        matvec,
        space,
        blocks,
        sketch,
        probes,
        gen=torch.Generator(device=device).manual_seed(seed + RESIDUAL_SEED),
        dtype=torch.float64,
        device=device,
        rtol=rtol,
        offset=offset,
    )
    return res, traces
