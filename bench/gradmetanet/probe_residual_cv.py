"""Experiment (not used by the head): two second-order probes on head v2's sets.

    PYTHONPATH=. python bench/gradmetanet/probe_residual_cv.py [--zoo DIR] [--out JSON]

The gradients the head reads carry the GGN part ``G`` of ``H = G + R``; the residual ``R``
(which makes ``tr H`` small or negative near init and 2-4x ``tr G`` while training) is
invisible to them. Two products on the same ``b`` sequences could fill it in:

- **residual probe** (one ``R``-vector product, Rademacher ``z``): the control-variate trace
  ``tr Ĝ + z^T R z``, unbiased for ``tr H`` on the set; its variance ``2 ||R||_F^2`` is
  smaller than Hutchinson's ``2 ||H||_F^2`` once the GGN carries most of ``H``;
- **Rayleigh quotient** (one ``H``-vector product) at the token-level plug-in's top
  direction ``v = Σ_{n,t} α_nt g_nt`` (``α`` the top eigenvector of its Gram matrix).

Measured on the zoo's groups (2 draws per snapshot; ``residual_cv.json``): the control
variate roughly halves the plug-in's median error but its one-probe tails keep the mean at
the plug-in's, still far from Hutchinson with the same products; the Rayleigh quotient is
worse than the per-sequence plug-in for λ_max. Neither was adopted.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from gmcurv.capture import DecomposedGradients
from gmcurv.data import DataSample
from gmcurv.factors import LinearFactors, SumOfSources
from gmcurv.gradmetanet.tfeatures import TSet, extract_with_gradients, layer_role
from gmcurv.objective import Objective
from gmcurv.operator import CurvatureOperator
from gmcurv.stochastic import rademacher


@dataclass(frozen=True)
class Probes:
    ztrace: float  # z^T R z (one Rademacher probe of the residual's trace)
    rayleigh: float  # v^T H v / v^T v at the plug-in's top direction
    seconds: float


def top_direction(dg: DecomposedGradients, s: TSet, objective: Objective) -> Tensor:
    """``Σ_{n,t} α_nt g_nt`` normalised (flat, float64, zero off the Linear layers): the top
    eigenvector of the token-level plug-in ``Σ_{n,t} g_nt g_nt^T`` (``α`` the top
    eigenvector of its Gram matrix ``TSet.tok_gram``, same layers and order)."""
    _, vecs = torch.linalg.eigh(s.tok_gram)
    alpha = vecs[:, -1]
    parts: dict[str, Tensor] = {}
    for blk in dg.blocks:
        src = blk.source
        if isinstance(src, SumOfSources):
            linear = [p for p in src.parts if isinstance(p, LinearFactors)]
            src = linear[0] if len(linear) == 1 else src
        if layer_role(blk.name) is None and not (
            isinstance(blk.source, SumOfSources) and isinstance(src, LinearFactors)
        ):
            continue
        if not isinstance(src, LinearFactors):
            continue
        d = src.delta.double()
        x = src.x.double()
        if x.dim() == 2:
            x, d = x[:, None], d[..., None, :]
        N, C, T, _ = d.shape
        a = alpha.reshape(N, C, T)  # the Gram sums the layers: one α for all of them
        w = torch.einsum("nct,ncto,nti->oi", a, d, x) if src.has_weight else None
        b = torch.einsum("nct,ncto->o", a, d) if src.has_bias else None
        for k, v in src.pack(w, b).items():
            parts[k] = v if k not in parts else parts[k] + v
    full = {
        k: parts.get(k, torch.zeros(p.shape, dtype=torch.float64))
        for k, p in objective.params.items()
    }
    v = objective.space.flatten(full).double()
    return v / v.norm().clamp_min(1e-300)


def probe(
    objective: Objective, dg: DecomposedGradients, s: TSet, data: DataSample, seed: int = 0
) -> Probes:
    """The two probes of the module doc on the set `data` (the sequences of `dg`)."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    res = CurvatureOperator(objective, data, data.n, kind="residual")
    z = rademacher(res.size, gen)
    ztrace = float(z @ res.matvec(z))
    hess = CurvatureOperator(objective, data, data.n, kind="hessian")
    v = top_direction(dg, s, objective)
    rq = float(v @ hess.matvec(v))
    return Probes(ztrace, rq, time.perf_counter() - t0)


def main(argv=None) -> int:
    import argparse
    import json
    import statistics as st
    from pathlib import Path

    from gmcurv.gradmetanet.ttrain import zoo_sets

    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default="/work/cache/head/tzoo")
    ap.add_argument("--out", default="bench/gradmetanet/residual_cv.json")
    ap.add_argument("--draws", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for zs in zoo_sets(args.zoo, draws=args.draws):
        spec, m, obj, b, r = zs.spec, zs.meta, zs.objective, zs.batch, zs.draw
        t0 = time.perf_counter()
        s, dg = extract_with_gradients(obj, b)
        t_feat = time.perf_counter() - t0
        p = probe(obj, dg, s, zs.data(), seed=r)
        rows.append(
            {
                "gid": spec.gid, "split": spec.split, "step": m["step"],
                "truth": m["hessian_trace"]["value"],
                "se": m["hessian_trace"]["stderr"], "top": m["hessian_top"],
                "plug": s.plug_trace, "seqtop": s.seq_top, "plugtop": s.plug_top,
                "z": p.ztrace, "rq": p.rayleigh, "t_feat": t_feat,
                "t_probe": p.seconds,
            }
        )  # fmt: skip
    rel = [r for r in rows if r["se"] <= 0.1 * abs(r["truth"])]

    def err(f):
        e = [abs(f(r) - r["truth"]) / abs(r["truth"]) for r in rel]
        return {"mean": st.fmean(e), "median": st.median(e)}

    def lerr(f):
        e = [abs(math.log(max(f(r), 1e-3 * r["top"]) / r["top"])) for r in rel]
        return {"mean": st.fmean(e), "median": st.median(e)}

    summary = {
        "sets_reliable_truth": len(rel),
        "trace_plugin": err(lambda r: r["plug"]),
        "trace_control_variate_1_probe": err(lambda r: r["plug"] + r["z"]),
        "top_plugin_seq": lerr(lambda r: r["seqtop"]),
        "top_rayleigh_at_plugin_direction": lerr(lambda r: r["rq"]),
        "probe_over_features_seconds_median": st.median(r["t_probe"] / r["t_feat"] for r in rows),
    }
    Path(args.out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
