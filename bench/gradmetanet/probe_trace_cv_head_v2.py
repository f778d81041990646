"""Can the head's gradients beat Hutchinson on the Hessian trace at equal time? (issue 14)

    PYTHONPATH=. python bench/gradmetanet/probe_trace_cv_head_v2.py [--zoo DIR] [--probes 8]

``H = G + R`` on a set of ``b`` sequences. The capture the head reads gives the token-level
plug-in ``tr Ĝ`` (unbiased for ``tr G``, small variance); what it cannot see is ``tr R``.
The only ways to add ``tr R`` are products. This script measures, on every held-out zoo set
(draw 0 of each snapshot of the ``test-*`` groups), ``K`` Rademacher probes of both
``z^T H z`` and ``z^T G z`` (same ``z``), each product timed, and compares at equal wall
time:

- **Hutchinson**: ``mean_k z^T H z`` with ``⌊t / t_H⌋`` probes;
- **control variate** (the head's plug-in + residual probes): ``tr Ĝ + mean_k z^T R z``,
  ``z^T R z = z^T H z - z^T G z``, costing the capture plus ``k (t_H + t_G)``;
- **token control variate** (no GGN product): ``tr M + mean_k (z^T H z - z^T M z)`` with
  ``M = (T_eff / b) (Σ_{n,t} g_nt g_nt^T + Σ_n q_n q_n^T)`` the plug-in's own matrix
  (per-token gradients ``g_nt`` of the Linear layers, per-sequence gradients ``q_n`` of the
  other blocks, all from the capture the head reads; ``tr M = tr Ĝ``): unbiased for
  ``tr H`` on the set for any ``M``; ``z^T M z`` costs contractions of the captured factors
  with ``z`` only, so a probe costs ``t_H + t_M``.

Per set also the per-probe variances ``Var(z^T H z)`` and ``Var(z^T R z)`` (sample
variances over the ``K`` probes): with cost ratio ``c = (t_H + t_G) / t_H`` the control
variate can win at equal time only where ``c · Var(z^T R z) < Var(z^T H z)``. Errors are
relative to the zoo's large-sample truth, on sets whose truth is pinned (Hutch++ s.e. <= 10
% of ``|tr H|``). JSON to ``--out`` (``trace_cv_head_v2.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics as st
import time
from pathlib import Path

import torch

from gmcurv.capture import DecomposedGradients
from gmcurv.factors import LinearFactors, SumOfSources
from gmcurv.gradmetanet.tfeatures import extract_with_gradients, layer_role
from gmcurv.gradmetanet.ttrain import held_out, zoo_sets
from gmcurv.operator import CurvatureOperator
from gmcurv.stochastic import rademacher


def _token_jvp(lin: LinearFactors, vec: dict) -> torch.Tensor:
    """``[N, C, T]``: ``<g_nct, v>`` per token of one Linear layer."""
    d, x = lin.delta.double(), lin.x.double()
    if x.dim() == 2:
        x, d = x[:, None], d[..., None, :]
    w, b = lin.weight_bias_names()
    out = d.new_zeros(d.shape[:3])
    if w is not None:
        W = vec[w].double()
        W = W.transpose(0, 1) if lin.transposed else W.reshape(d.shape[-1], -1)
        out = out + torch.einsum("ncto,oi,nti->nct", d, W, x)
    if b is not None:
        out = out + torch.einsum("ncto,o->nct", d, vec[b].double())
    return out


def plugin_quadratic(dg: DecomposedGradients, vec: dict, tokens: float) -> float:
    """``z^T M z`` for the plug-in's matrix ``M`` (module doc): the blocks and tied-head
    convention of `TSet.plug_trace`, so that ``E_z z^T M z = tr Ĝ``."""
    tok = None
    seq = None
    for blk in dg.blocks:
        role, src, lin = layer_role(blk.name), blk.source, blk.source
        if isinstance(src, SumOfSources):
            linear = [p for p in src.parts if isinstance(p, LinearFactors)]
            if len(linear) == 1:
                role, lin = "head", linear[0]
        if role is None or not isinstance(lin, LinearFactors):
            q = src.jvp(vec).double()
            seq = q if seq is None else seq + q
            continue
        p = _token_jvp(lin, vec)
        tok = p if tok is None else tok + p
    assert tok is not None
    total = float(tok.pow(2).sum()) + (0.0 if seq is None else float(seq.pow(2).sum()))
    return tokens * total / dg.n


def measure(zoo: Path, probes: int, draws: int) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    for zs in zoo_sets(zoo, keep=held_out, draws=draws):
        spec, m, obj, batch, r = zs.spec, zs.meta, zs.objective, zs.batch, zs.draw
        t0 = time.perf_counter()
        s, dg = extract_with_gradients(obj, batch)
        t_feat = time.perf_counter() - t0
        data = zs.data()
        H = CurvatureOperator(obj, data, len(batch), kind="hessian")
        G = CurvatureOperator(obj, data, len(batch), kind="ggn")
        gen = torch.Generator().manual_seed(11 + r)
        H.matvec(rademacher(H.size, gen))  # warm-up (graph cache), not timed
        G.matvec(rademacher(G.size, gen))
        h, g, mq, th, tg, tm = [], [], [], [], [], []
        for _ in range(probes):
            z = rademacher(H.size, gen)
            t0 = time.perf_counter()
            h.append(float(z @ H.matvec(z)))
            th.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            g.append(float(z @ G.matvec(z)))
            tg.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            mq.append(plugin_quadratic(dg, obj.space.unflatten(z), s.tokens))
            tm.append(time.perf_counter() - t0)
        rows.append(
            {
                "gid": spec.gid, "split": spec.split, "family": spec.family,
                "step": m["step"], "draw": r,
                "truth": m["hessian_trace"]["value"],
                "truth_se": m["hessian_trace"]["stderr"] or 0.0,
                "plug": s.plug_trace, "h": h, "g": g, "m": mq,
                "t_feat": t_feat, "t_h": st.median(th), "t_g": st.median(tg),
                "t_m": st.median(tm),
            }
        )  # fmt: skip
    return rows


def errors(rows: list[dict], probes: int) -> dict:
    """Mean / median relative errors at equal time, per control-variate budget ``k``."""
    out: dict = {}
    for name, other, t_other in (("ggn", "g", "t_g"), ("token", "m", "t_m")):
        for k in range(1, probes + 1):
            e_cv, e_hu, used = [], [], []
            for r in rows:
                t = r["t_feat"] + k * (r["t_h"] + r[t_other])
                kh = max(1, int(t // r["t_h"]))
                if kh > probes:
                    continue
                res = [a - b for a, b in zip(r["h"], r[other], strict=True)]
                cv = r["plug"] + st.fmean(res[:k])
                hu = st.fmean(r["h"][:kh])
                e_cv.append(abs(cv - r["truth"]) / abs(r["truth"]))
                e_hu.append(abs(hu - r["truth"]) / abs(r["truth"]))
                used.append(kh)
            if not e_cv:
                break
            out[f"{name}_cv_{k}"] = {
                "sets": len(e_cv),
                "hutchinson_probes_median": st.median(used),
                "control_variate": {"mean": st.fmean(e_cv), "median": st.median(e_cv)},
                "hutchinson_equal_time": {"mean": st.fmean(e_hu), "median": st.median(e_hu)},
                "cv_win_rate": st.fmean(a < b for a, b in zip(e_cv, e_hu, strict=True)),
                "cv_gain_mean": 1 - st.fmean(e_cv) / st.fmean(e_hu),
            }
    return out


def summary(rows: list[dict], probes: int) -> dict:
    pinned = [r for r in rows if r["truth_se"] <= 0.1 * abs(r["truth"])]
    ratios, tratios = [], []
    for r in rows:
        vh = st.variance(r["h"])
        res = [a - b for a, b in zip(r["h"], r["g"], strict=True)]
        vr = st.variance(res)
        c = (r["t_h"] + r["t_g"]) / r["t_h"]
        ratios.append({"var_ratio": vr / vh, "cost_ratio": c, "needed_below_1": c * vr / vh})
        rm = [a - b for a, b in zip(r["h"], r["m"], strict=True)]
        tratios.append(st.variance(rm) / vh)
    plug = [abs(r["plug"] - r["truth"]) / abs(r["truth"]) for r in pinned]
    return {
        "sets": len(rows),
        "sets_pinned": len(pinned),
        "var_R_over_var_H": {
            "median": st.median(x["var_ratio"] for x in ratios),
            "quartiles": st.quantiles([x["var_ratio"] for x in ratios], n=4),
        },
        "cost_R_probe_over_H_probe_median": st.median(x["cost_ratio"] for x in ratios),
        "var_H_minus_M_over_var_H": {
            "median": st.median(tratios),
            "quartiles": st.quantiles(tratios, n=4),
        },
        "cost_M_probe_over_H_probe_median": st.median(
            (r["t_h"] + r["t_m"]) / r["t_h"] for r in rows
        ),
        "cost_times_var_ratio_below_1": st.fmean(x["needed_below_1"] < 1 for x in ratios),
        "feature_over_hvp_median": st.median(r["t_feat"] / r["t_h"] for r in rows),
        "plugin_rel_error_pinned": {"mean": st.fmean(plug), "median": st.median(plug)},
        "equal_time_pinned": errors(pinned, probes),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default="/work/cache/head/tzoo")
    ap.add_argument("--out", default="bench/gradmetanet/trace_cv_head_v2.json")
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--draws", type=int, default=1, help="sets per snapshot")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = measure(Path(args.zoo), args.probes, args.draws)
    res = {
        "what": "control variate (head's plug-in + residual probes) vs Hutchinson, equal time",
        "command": "PYTHONPATH=. python bench/gradmetanet/probe_trace_cv_head_v2.py",
        "loadavg": os.getloadavg(),
        "summary": summary(rows, args.probes),
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
