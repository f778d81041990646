"""EWC penalty and Fisher-weighted merging from gmcurv's exported Fisher diagonals.

Produce the inputs with gmcurv (one Fisher diagonal per checkpoint, on that task's data)::

    gmcurv trace task_a.safetensors data_a/ --save-diagonal fisher_a.safetensors
    gmcurv trace task_b.safetensors data_b/ --save-diagonal fisher_b.safetensors

then::

    python fisher_merge.py task_a.safetensors fisher_a.safetensors \\
                           task_b.safetensors fisher_b.safetensors merged.safetensors

Only ``torch`` and ``safetensors`` are needed; the files line up with ``state_dict()`` names.
"""

from __future__ import annotations

import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor


def load_diagonal(path: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The diagonal's tensors and the gmcurv metadata (kind, N, fisher type, ...)."""
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata() or {})
    if not meta.get("gmcurv.kind", "").endswith("-diagonal"):
        raise ValueError(f"{path}: not a gmcurv curvature diagonal ({meta.get('gmcurv.kind')})")
    return load_file(path), meta


def ewc_penalty(
    params: dict[str, Tensor], anchor: dict[str, Tensor], fisher: dict[str, Tensor], lam: float
) -> Tensor:
    """EWC (Kirkpatrick et al. 2017): ``(λ/2) Σ_q F_qq (θ_q − θ*_q)²``.

    ``F`` is gmcurv's mean-over-examples Fisher; to weigh it as the sum over the old task's
    ``N`` examples (the Laplace approximation of the posterior), pass ``lam = N * λ'``
    with ``N = int(meta["gmcurv.N"])``. Parameters absent from the file are not penalised.
    """
    total = torch.zeros((), dtype=torch.float64)
    for name, f in fisher.items():
        d = params[name].double() - anchor[name].double()
        total = total + (f.double() * d * d).sum()
    return 0.5 * lam * total


def fisher_merge(
    states: list[dict[str, Tensor]], fishers: list[dict[str, Tensor]], eps: float = 1e-8
) -> dict[str, Tensor]:
    """Fisher-weighted averaging (Matena & Raffel 2022), per parameter entry:
    ``θ = Σ_i F_i θ_i / Σ_i F_i`` (``eps`` keeps entries no model is sensitive to at the
    plain average). Tensors without a Fisher are averaged uniformly."""
    merged = {}
    for name in states[0]:
        thetas = [s[name].double() for s in states]
        if all(name in f for f in fishers):
            ws = [f[name].double() + eps for f in fishers]
            merged[name] = (sum(w * t for w, t in zip(ws, thetas, strict=False)) / sum(ws)).to(
                states[0][name].dtype
            )
        else:
            merged[name] = (sum(thetas) / len(thetas)).to(states[0][name].dtype)
    return merged


def main(argv: list[str]) -> None:
    a, fa, b, fb, out = argv
    state_a, state_b = load_file(a), load_file(b)
    (fisher_a, meta_a), (fisher_b, _) = load_diagonal(fa), load_diagonal(fb)
    merged = fisher_merge([state_a, state_b], [fisher_a, fisher_b])
    with safe_open(a, framework="pt") as f:  # keep A's header (architecture) for gmcurv
        meta = dict(f.metadata() or {})
    save_file({k: v.contiguous() for k, v in merged.items()}, out, metadata=meta)
    pen = ewc_penalty(merged, state_a, fisher_a, lam=float(meta_a["gmcurv.N"]))
    print(f"wrote {out}; EWC penalty w.r.t. A (λ = N_A = {meta_a['gmcurv.N']}): {pen:.6g}")


if __name__ == "__main__":
    main(sys.argv[1:])
