"""Hessian/GGN benchmark: gmcurv vs PyHessian, curvlinops, hessian-eigenthings, BackPACK.

On the shared workloads W1, W2, W3 (`bench/workloads.py`, float32, one thread, the whole
sample as one batch for every library), in one run:

- per-HVP time (median of repeated products after warm-up);
- Hessian trace to 1 % relative error: plain Hutchinson's need from its measured per-probe
  variance (``m = var / (0.01 tr)^2``; the same estimator PyHessian, curvlinops and
  hessian-eigenthings implement), gmcurv Hutch++ and gmcurv ``auto`` (exact GGN trace from
  C-class factors + block-restricted Hutch++ on ``H - G``) with budgets doubling until the
  calibrated standard error is at most 1 % of the trace; the peers' 100-product estimates;
- top-5 eigenvalues to 1e-3 relative accuracy (products, time, error) against a tight
  Lanczos reference;
- spectral density (one 50-step Lanczos run) times;
- exact GGN trace: gmcurv's C-class factors vs BackPACK's DiagGGNExact.

Reference Hessian trace: W1 (ReLU) — exact: each layer's parameters enter a ReLU network
linearly, so the diagonal blocks of ``H - G`` vanish and ``tr H = tr G`` (exact from the
factors, cross-checked against BackPACK). W2/W3 — ``tr G`` exact plus ``tr(H - G)`` from a
large block-restricted Hutch++ run (its standard error is reported).

Run: ``flock /tmp/gmcurv-bench.lock python bench/hessian/bench_hessian.py``
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from workloads import WORKLOADS, build  # noqa: E402

from gmcurv.density import slq  # noqa: E402
from gmcurv.hessian import curvature_summary, exact_ggn_trace, top_eigen  # noqa: E402
from gmcurv.io.data import load_data  # noqa: E402
from gmcurv.lanczos import lanczos  # noqa: E402
from gmcurv.objective import Objective  # noqa: E402
from gmcurv.operator import CurvatureOperator  # noqa: E402
from gmcurv.stochastic import hutchinson, trace  # noqa: E402


def clock(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Setup:
    def __init__(self, name: str):
        self.name = name
        self.w = build(name)
        self.tmp = Path(tempfile.mkdtemp()) / f"{name}.safetensors"
        from safetensors.torch import save_file

        save_file(
            {"inputs": self.w.x.contiguous(), "targets": self.w.y.contiguous()}, str(self.tmp)
        )
        self.data = load_data(self.tmp, None)
        self.obj = Objective.build(self.w.model, "cross_entropy")
        self.n = self.w.n
        self.P = self.obj.space.size
        self.params = [p for p in self.w.model.parameters() if p.requires_grad]

    def op(self, kind="hessian") -> CurvatureOperator:
        return CurvatureOperator(self.obj, self.data, self.n, kind)


# ------------------------------------------------------------------------------ peers
def pyhessian_obj(s: Setup):
    from pyhessian import hessian

    # PyHessian builds its graph with loss.backward(create_graph=True), which *adds* to
    # existing .grad fields: clear them or a second instance sees a doubled Hessian
    s.w.model.zero_grad(set_to_none=True)
    return hessian(s.w.model, nn.CrossEntropyLoss(), data=(s.w.x, s.w.y), cuda=False)


class Counter:
    def __init__(self, fn):
        self.fn, self.count = fn, 0

    def __call__(self, *a, **kw):
        self.count += 1
        return self.fn(*a, **kw)


def patch_pyhessian():
    import pyhessian  # noqa: F401

    ph = sys.modules["pyhessian.hessian"]

    counter = Counter(ph.hessian_vector_product)
    ph.hessian_vector_product = counter
    return counter, lambda: setattr(ph, "hessian_vector_product", counter.fn)


def curvlinops_op(s: Setup):
    from curvlinops import HessianLinearOperator

    return HessianLinearOperator(
        s.w.model, nn.CrossEntropyLoss(), s.params, [(s.w.x, s.w.y)], check_deterministic=False
    )


def eigenthings_op(s: Setup):
    from hessian_eigenthings import HessianOperator, supervised_loss

    return HessianOperator(s.w.model, [(s.w.x, s.w.y)], supervised_loss(nn.CrossEntropyLoss()))


# -------------------------------------------------------------------------- sections
def per_hvp(s: Setup, repeats: int) -> dict:
    """Median time of one product per library, measured round-robin (fair under load)."""
    g = torch.Generator().manual_seed(0)
    v64 = torch.randn(s.P, generator=g, dtype=torch.float64)
    v32 = v64.float()
    op = s.op()
    ph = pyhessian_obj(s)
    from pyhessian.utils import hessian_vector_product

    sizes = [p.numel() for p in ph.params]
    vs = [t.reshape(p.shape) for t, p in zip(v32.split(sizes), ph.params, strict=True)]
    cl = curvlinops_op(s)
    he = eigenthings_op(s)
    fns = {
        "gmcurv": lambda: op.matvec(v64),
        "pyhessian": lambda: hessian_vector_product(ph.gradsH, ph.params, vs),
        "curvlinops": lambda: cl @ v32,
        "hessian_eigenthings": lambda: he.matvec(v32),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up (gmcurv: first pass caches batches and gradient graphs)
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    s.w.model.zero_grad(set_to_none=True)
    return {k: round(statistics.median(v), 5) for k, v in times.items()}


def reference_trace(s: Setup, ref_probes: int) -> dict:
    acc = exact_ggn_trace(s.obj, s.data, s.n)
    ggn = acc.trace(None)[0]
    if s.name == "W1":
        return {"value": ggn, "stderr": 0.0, "how": "exact: tr H = tr G (ReLU)", "ggn": ggn}
    res = curvature_summary(
        s.obj, s.data, "hessian", probes=ref_probes, k=0, batch_size=s.n, seed=12345
    )
    return {
        "value": res.trace.value,
        "stderr": res.trace.stderr,
        "how": f"exact tr G + block Hutch++ on H-G ({res.n_matvecs} products)",
        "ggn": ggn,
    }


def trace_section(s: Setup, ref: dict, cap: int) -> dict:
    truth = ref["value"]
    op = s.op()
    # plain Hutchinson: per-probe variance -> probes for 1 %
    h, t_h = clock(lambda: hutchinson(op.matvec, s.P, 60, seed=1, dtype=torch.float64))
    var = (h.stderr * math.sqrt(h.n_probes)) ** 2
    need_h = math.ceil(var / (0.01 * abs(truth)) ** 2)
    out = {
        "hutchinson": {
            "per_probe_sd": math.sqrt(var),
            "probes_for_1pct": need_h,
            "seconds_for_1pct": need_h * t_h / h.n_probes,
            "value_60": h.value,
            "rel_err_60": abs(h.value - truth) / abs(truth),
        }
    }

    def escalate(run, start):
        m, rows = start, []
        while True:
            (value, se, n_mv), secs = clock(lambda m=m: run(m))
            rows.append(
                {
                    "budget": m,
                    "value": value,
                    "stderr": se,
                    "n_matvecs": n_mv,
                    "seconds": secs,
                    "rel_err": abs(value - truth) / abs(truth),
                }
            )
            if se <= 0.01 * abs(truth) or n_mv >= cap:
                return rows
            m *= 2

    def pp(m):
        e = trace(op.matvec, s.P, m, "hutchpp", seed=2, dtype=torch.float64)
        return e.value, e.stderr, e.n_matvecs

    def auto(p):
        r = curvature_summary(s.obj, s.data, "hessian", probes=p, k=0, batch_size=s.n, seed=3)
        return r.trace.value, r.trace.stderr or 0.0, r.n_matvecs

    out["gmcurv_hutchpp"] = escalate(pp, 24)
    out["gmcurv_auto"] = escalate(auto, 6)
    for key in ("gmcurv_hutchpp", "gmcurv_auto"):
        last = out[key][-1]
        ok = last["stderr"] <= 0.01 * abs(truth)
        out[key + "_1pct"] = {
            "reached": ok,
            "n_matvecs": last["n_matvecs"],
            "seconds": last["seconds"],
            "rel_err": last["rel_err"],
            "fewer_hvps_than_hutchinson": need_h / max(last["n_matvecs"], 1) if ok else None,
        }
    # peers with 100 products
    ph = pyhessian_obj(s)
    (vals), t = clock(lambda: ph.trace(maxIter=100, tol=-1.0))
    mean = float(statistics.mean(vals))
    out["pyhessian_hutchinson_100"] = {
        "value": mean,
        "seconds": t,
        "rel_err": abs(mean - truth) / abs(truth),
    }
    from curvlinops import hutchinson_trace, hutchpp_trace

    cl = curvlinops_op(s)
    torch.manual_seed(0)
    v, t = clock(lambda: float(hutchpp_trace(cl, 99)))
    out["curvlinops_hutchpp_99"] = {
        "value": v,
        "seconds": t,
        "rel_err": abs(v - truth) / abs(truth),
    }
    v, t = clock(lambda: float(hutchinson_trace(cl, 100)))
    out["curvlinops_hutchinson_100"] = {
        "value": v,
        "seconds": t,
        "rel_err": abs(v - truth) / abs(truth),
    }
    from hessian_eigenthings import hutch_plus_plus

    he = eigenthings_op(s)
    r, t = clock(lambda: hutch_plus_plus(he, num_matvecs=99, seed=0))
    out["eigenthings_hutchpp_99"] = {
        "value": r.estimate,
        "stderr": r.stderr,
        "seconds": t,
        "rel_err": abs(r.estimate - truth) / abs(truth),
    }
    return out


def eigen_section(s: Setup) -> dict:
    op = s.op()
    ref = lanczos(op.matvec, s.P, 5, tol=1e-6, max_iters=200, max_restarts=0, criterion="gap")
    truth = ref.values

    def err(vals):
        v = torch.tensor(sorted(vals, reverse=True)[:5], dtype=torch.float64)
        return float(((v - truth).abs() / truth.abs()).max())

    out = {"reference": truth.tolist(), "reference_converged": bool(ref.converged.all())}
    r, t = clock(lambda: top_eigen(s.obj, s.data, "hessian", 5, tol=1e-3, batch_size=s.n))
    out["gmcurv_lanczos"] = {
        "n_matvecs": r.n_matvecs,
        "seconds": t,
        "rel_err": err([e.value for e in r.values]),
        "converged": all(e.converged for e in r.values),
    }
    from hessian_eigenthings import lanczos as he_lanczos

    he = eigenthings_op(s)
    counter = Counter(he.matvec)
    he.matvec = counter
    r, t = clock(lambda: he_lanczos(he, k=5, which="LA", tol=1e-3, max_iter=100, seed=0))
    out["eigenthings_lanczos"] = {
        "n_matvecs": counter.count,
        "seconds": t,
        "rel_err": err(r.eigenvalues.tolist()),
        "converged": bool(r.converged.all()),
    }
    ph = pyhessian_obj(s)
    counter, undo = patch_pyhessian()
    try:
        (vals, _), t = clock(lambda: ph.eigenvalues(maxIter=100, tol=1e-3, top_n=5))
    finally:
        undo()
    out["pyhessian_power"] = {"n_matvecs": counter.count, "seconds": t, "rel_err": err(vals)}
    from scipy.sparse.linalg import LinearOperator, eigsh

    cl = curvlinops_op(s).to_scipy()
    c = Counter(cl.matvec)
    wrapped = LinearOperator(cl.shape, matvec=c, dtype=cl.dtype)
    (w, _), t = clock(lambda: eigsh(wrapped, k=5, which="LA", tol=1e-3))
    out["curvlinops_eigsh"] = {"n_matvecs": c.count, "seconds": t, "rel_err": err(w.tolist())}
    return out


def density_section(s: Setup, steps: int) -> dict:
    op = s.op()
    _, t = clock(lambda: slq(op.matvec, s.P, 1, steps, seed=0))
    out = {"gmcurv_slq": {"seconds": t, "n_matvecs": steps}}
    ph = pyhessian_obj(s)
    counter, undo = patch_pyhessian()
    t0 = time.perf_counter()
    try:
        ph.density(iter=steps, n_v=1)
        out["pyhessian_density"] = {"seconds": time.perf_counter() - t0}
    except Exception as e:  # PyHessian 0.1 calls torch.eig, removed in torch 1.9+
        out["pyhessian_density"] = {
            "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}",
            "seconds_until_error": time.perf_counter() - t0,
        }
    finally:
        undo()
    out["pyhessian_density"]["n_matvecs"] = counter.count
    from hessian_eigenthings import spectral_density

    he = eigenthings_op(s)
    _, t = clock(lambda: spectral_density(he, num_runs=1, lanczos_steps=steps, seed=0))
    out["eigenthings_density"] = {"seconds": t, "n_matvecs": steps}
    return out


def ggn_section(s: Setup, repeats: int) -> dict:
    acc = exact_ggn_trace(s.obj, s.data, s.n)
    value = acc.trace(None)[0]
    t_ours = median_time(lambda: exact_ggn_trace(s.obj, s.data, s.n), repeats)
    t_fast = median_time(lambda: exact_ggn_trace(s.obj, s.data, s.n, check=False), repeats)
    out = {"gmcurv": {"value": value, "seconds": t_ours, "seconds_without_self_check": t_fast}}
    try:
        from backpack import backpack, extend
        from backpack.extensions import DiagGGNExact

        model = extend(build(s.name).model)
        lossf = extend(nn.CrossEntropyLoss())
        params = list(model.parameters())

        def run():
            model.zero_grad()
            loss = lossf(model(s.w.x), s.w.y)
            with backpack(DiagGGNExact()):
                loss.backward()
            return float(sum(p.diag_ggn_exact.sum() for p in params))

        v = run()
        out["backpack"] = {
            "value": v,
            "seconds": median_time(run, repeats),
            "rel_diff": abs(v - value) / abs(value),
        }
    except Exception as e:  # unsupported layers (Embedding, LayerNorm, attention matmul)
        out["backpack"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", nargs="*", default=list(WORKLOADS))
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--ref-probes", type=int, default=64)
    ap.add_argument("--cap", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "results.json"))
    ap.add_argument("--markdown", action="store_true", help="Only print tables from --out.")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.out).read_text())))
        return
    torch.set_num_threads(args.threads)
    results = {
        "meta": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": args.threads,
            "dtype": "float32",
            "date": time.strftime("%Y-%m-%d %H:%M"),
        },
        "workloads": {},
    }
    for name in args.workloads:
        s = Setup(name)
        print(f"[{name}] P={s.P} N={s.n}", flush=True)
        res: dict = {"P": s.P, "N": s.n}
        res["per_hvp_seconds"] = per_hvp(s, args.repeats)
        print(" per-HVP", res["per_hvp_seconds"], flush=True)
        res["ggn_exact_trace"] = ggn_section(s, min(args.repeats, 5))
        print(" ggn", res["ggn_exact_trace"], flush=True)
        res["reference_trace"] = reference_trace(s, args.ref_probes)
        print(" reference", res["reference_trace"], flush=True)
        res["trace"] = trace_section(s, res["reference_trace"], args.cap)
        print(" trace done", flush=True)
        res["eigen_top5"] = eigen_section(s)
        print(" eigen", json.dumps(res["eigen_top5"]), flush=True)
        res["density"] = density_section(s, 50)
        print(" density", res["density"], flush=True)
        results["workloads"][name] = res
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))


def _f(x, digits=3):
    if x is None:
        return "—"
    return f"{x:.{digits}g}"


def markdown(results: dict) -> str:
    """The tables of RESULTS.md from results.json."""
    wl = results["workloads"]
    m = results["meta"]
    out = [
        f"torch {m['torch']}, {m['dtype']}, {m['threads']} thread(s), CPU; {m['date']}; "
        "whole sample as one batch for every library.",
        "",
        "**Per-HVP time** (ms, median, measured round-robin; ratio = peer / gmcurv)",
        "",
        "| workload | P | gmcurv | PyHessian | curvlinops | hessian-eigenthings |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in wl.items():
        h = r["per_hvp_seconds"]
        cells = [f"{h['gmcurv'] * 1e3:.1f}"] + [
            f"{h[k] * 1e3:.1f} ({h[k] / h['gmcurv']:.2f}x)"
            for k in ("pyhessian", "curvlinops", "hessian_eigenthings")
        ]
        out.append(f"| {name} | {r['P']:,} | " + " | ".join(cells) + " |")
    out += [
        "",
        "**Hessian trace to 1 % relative error** (reference: "
        + "; ".join(f"{n} {_f(r['reference_trace']['value'], 6)} ({r['reference_trace']['how']}"
                    f", s.e. {_f(r['reference_trace']['stderr'], 2)})" for n, r in wl.items())
        + ")",
        "",
        "| workload | plain Hutchinson: HVPs (s) | gmcurv Hutch++: HVPs (s, err) | gmcurv auto: "
        "HVPs (s, err) | auto vs Hutchinson |",
        "|---|---:|---:|---:|---:|",
    ]  # fmt: skip
    for name, r in wl.items():
        t = r["trace"]
        h = t["hutchinson"]
        cells = [f"{h['probes_for_1pct']:,} ({h['seconds_for_1pct']:.1f})"]
        for key in ("gmcurv_hutchpp_1pct", "gmcurv_auto_1pct"):
            e = t[key]
            mark = "" if e["reached"] else " not reached at cap"
            cells.append(
                f"{e['n_matvecs']:,} ({e['seconds']:.1f}, {100 * e['rel_err']:.2f} %){mark}"
            )
        ratio = t["gmcurv_auto_1pct"]["fewer_hvps_than_hutchinson"]
        cells.append(f"{ratio:.0f}x fewer HVPs" if ratio else "—")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out += [
        "",
        "Peers at a fixed budget of ~100 products (relative error vs the reference, seconds):",
        "",
        "| workload | PyHessian Hutchinson 100 | curvlinops Hutchinson 100 | curvlinops Hutch++ 99 "
        "| hessian-eigenthings Hutch++ 99 |",
        "|---|---:|---:|---:|---:|",
    ]  # fmt: skip
    for name, r in wl.items():
        t = r["trace"]
        cells = [
            f"{100 * t[k]['rel_err']:.1f} % ({t[k]['seconds']:.1f} s)"
            for k in ("pyhessian_hutchinson_100", "curvlinops_hutchinson_100",
                      "curvlinops_hutchpp_99", "eigenthings_hutchpp_99")
        ]  # fmt: skip
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out += [
        "",
        "**Top-5 eigenvalues** (HVPs, seconds, max relative error vs a tight Lanczos reference)",
        "",
        "| workload | gmcurv Lanczos | hessian-eigenthings Lanczos | PyHessian power | "
        "curvlinops + scipy eigsh |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in wl.items():
        e = r["eigen_top5"]
        cells = []
        for k in ("gmcurv_lanczos", "eigenthings_lanczos", "pyhessian_power", "curvlinops_eigsh"):
            x = e[k]
            flag = "" if x.get("converged", True) else ", not converged"
            cells.append(f"{x['n_matvecs']} ({x['seconds']:.1f} s, {_f(x['rel_err'], 2)}{flag})")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out += [
        "",
        "**Spectral density** (one Lanczos run of 50 steps; seconds)",
        "",
        "| workload | gmcurv SLQ | hessian-eigenthings | PyHessian |",
        "|---|---:|---:|---:|",
    ]
    for name, r in wl.items():
        d = r["density"]
        ph = d["pyhessian_density"]
        ph_cell = f"{ph['seconds']:.1f}" if "seconds" in ph else f"fails ({ph['error'][:40]}...)"
        out.append(
            f"| {name} | {d['gmcurv_slq']['seconds']:.1f} | "
            f"{d['eigenthings_density']['seconds']:.1f} | {ph_cell} |"
        )
    out += [
        "",
        "**Exact GGN trace** (seconds, end to end; BackPACK: DiagGGNExact summed)",
        "",
        "| workload | gmcurv (C-class factors) | gmcurv, capture self-check off | BackPACK | "
        "ratio BackPACK / gmcurv (check on, off) | agreement |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in wl.items():
        g = r["ggn_exact_trace"]
        bp = g["backpack"]
        if "error" in bp:
            out.append(
                f"| {name} | {g['gmcurv']['seconds']:.3f} | "
                f"{g['gmcurv']['seconds_without_self_check']:.3f} | "
                f"unsupported ({bp['error'][:60]}) | — | — |"
            )
        else:
            on, off = g["gmcurv"]["seconds"], g["gmcurv"]["seconds_without_self_check"]
            out.append(
                f"| {name} | {on:.3f} | {off:.3f} | {bp['seconds']:.3f} | "
                f"{bp['seconds'] / on:.2f}, {bp['seconds'] / off:.2f} | {bp['rel_diff']:.1e} |"
            )
    return "\n".join(out)


if __name__ == "__main__":
    main()
