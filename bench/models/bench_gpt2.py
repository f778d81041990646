"""Throughput on a randomly initialised 124M-parameter GPT-2 on a CPU.

    python bench/models/bench_gpt2.py                 # N = 4 and 8 sequences of 128 tokens
    python bench/models/bench_gpt2.py --n 4 --quick   # one size, one timed repeat
    python bench/models/bench_gpt2.py --targets 2 --repeats 1 --no-trace  # issue 13's ratio

Model: `transformers`' ``GPT2LMHeadModel`` (eager attention, as gmcurv builds it) with
``gpt2`` sizes (n_embd 768,
12 layers, 12 heads, vocabulary 50,257, 1,024 positions; ``lm_head`` tied to ``wte``, a
38.6M-parameter block), GPT-2 initialisation with seed 0, float32, 2 threads. Data:
uniformly random token ids, ``[N, 128]``, next-token loss (all tokens count).

Each method runs in its own subprocess; peak memory is the process's peak RSS (absolute,
and above the RSS after set-up: model and data built, nothing run). Times: first run, then
the median and the minimum of the timed repeats (the machine is shared: the load average
after each method is recorded, and the minimum is the least disturbed measurement). The
gmcurv methods start as the command line does (`gmcurv.cli.session.warm_up_autograd`: torch's
lazy imports, and malloc reusing freed memory); the peers and the plain backward as a plain
script does.

- ``plain_backward``: ``loss.backward()`` of the mean loss (the reference cost);
- ``gmcurv_trace``: `gmcurv.memory.estimate_capture` (the preflight), then `Capturer` +
  `FisherAccumulator`: the empirical Fisher trace, total and per block. The first run
  includes the one-off self-check of the factors against autograd; repeats do not;
- ``gmcurv_trace_nocheck``: the same without the self-check (steady-state memory);
- ``gmcurv_fisher_summary``: everything the default ``gmcurv trace`` computes
  (`fisher_summary` with ``--k 5``, per layer, batch size 256 so the 8 sequences are one
  batch): the preflight (its one-example forward, graph kept, is also the self-check's
  reference forward), the capture (losses and empirical-Fisher columns from one
  log-sum-exp pass) with its one-off self-check (example 0 alone against its row of the
  batch's capture, recorded as ``self_check``), each block's Gram kernel formed once by
  token pairs (traces from its diagonal) and the top-5 eigenvalues of their sum;
- ``torch_func_trace``: per-example gradients from ``vmap(grad)`` (``N x P`` floats), summed
  squares;
- ``opacus_trace``: opacus ``GradSampleModule`` per-sample gradients, summed squares;
- ``gmcurv_hvp`` / ``gmcurv_ggnvp``: `CurvatureOperator` Hessian / GGN-vector products
  (batches of 4, forward-over-reverse; attention on the math kernel);
- ``pyhessian_hvp``: PyHessian's Hessian-vector product (``backward(create_graph=True)``
  once, then ``autograd.grad`` of the kept graph per product; math attention kernel, since
  the CPU flash kernel's backward is not differentiable).

Results: bench/models/results.json (see RESULTS.md). Run final numbers under
``flock /tmp/gmcurv-bench.lock``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
SEQ = 128
HVP_BATCH = 256  # gmcurv's default --batch-size: the 8 sequences are one batch
TRACE_TOL = 0.05  # issue 13: the Hessian trace to 5 % relative standard error
TRACE_CAP = 40  # products at most (the machine is shared: bound the run)
TARGETS = ["plain_backward", "gmcurv_fisher_summary"]
HVP_TARGETS = ["gmcurv_hvp", "pyhessian_hvp"]  # --with-hvp (see also bench_gpt2_hvp.py)
METHODS = [
    "plain_backward",
    "gmcurv_trace",
    "gmcurv_trace_nocheck",
    "gmcurv_fisher_summary",
    "torch_func_trace",
    "opacus_trace",
    "gmcurv_hvp",
    "gmcurv_ggnvp",
    "pyhessian_hvp",
    "gmcurv_hessian_trace",
]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build(n: int):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(use_cache=False)
    model = transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation="eager").eval()
    ids = torch.randint(0, 50257, (n, SEQ), generator=torch.Generator().manual_seed(0))
    return model, ids


def mean_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over all tokens (= gmcurv's objective: equal lengths)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def math_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def unit_vector(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    v = {k: torch.randn(p.shape, generator=g) for k, p in params.items()}
    norm = sum(float(x.pow(2).sum()) for x in v.values()) ** 0.5
    return {k: x / norm for k, x in v.items()}


def make_method(name: str, model, ids):
    """A zero-argument callable doing one unit of work, returning a dict of outputs."""
    from gmcurv.batch import Batch
    from gmcurv.objective import Objective

    n = len(ids)
    if name == "plain_backward":

        def run():
            model.zero_grad(set_to_none=True)
            mean_loss(model(ids).logits, ids).backward()
            return {}

        return run
    if name in ("gmcurv_trace", "gmcurv_trace_nocheck"):
        from gmcurv.capture import Capturer
        from gmcurv.capture.budget import estimate_capture
        from gmcurv.fisher import FisherAccumulator

        obj = Objective.build(model, "next_token")
        batch = Batch(ids, None, 0)
        t0 = time.perf_counter()
        est = estimate_capture(obj, Batch(ids[:1], None, 0))
        preflight_s = time.perf_counter() - t0
        cap = Capturer(obj, check=name == "gmcurv_trace")

        def run():
            dg = cap(batch)
            acc = FisherAccumulator(diagonal=False)
            acc.add(dg)
            tied = next(b for b in dg.blocks if b.kind == "tied")
            return {
                "fisher_trace": acc.trace()[0],
                "tied_block_trace": acc.trace(tied.name)[0],
                "factor_gb": sum(b.source.nbytes() for b in dg.blocks) / 1e9,
                "blocks": len(dg.blocks),
                "preflight_s": preflight_s,
                "estimate_first_batch_gb": est.batch_bytes(n) / 1e9,
                "estimate_steady_batch_gb": est.batch_bytes(n, first=False) / 1e9,
            }

        return run
    if name == "gmcurv_fisher_summary":
        import tempfile

        from safetensors.torch import save_file

        from gmcurv.fisher import fisher_summary
        from gmcurv.io.data import load_data

        obj = Objective.build(model, "next_token")
        tmp = Path(tempfile.mkdtemp()) / "tokens.safetensors"
        save_file({"input_ids": ids}, str(tmp))
        data = load_data(tmp)

        def run():  # `gmcurv trace` with default options (k 5, per layer, one batch)
            s = fisher_summary(obj, data, batch_size=256, k=5, per_layer=True)
            return {
                "fisher_trace": s.trace.value,
                "top_eigenvalues": [e.value for e in s.eigenvalues],
                "rank": s.rank,
                "blocks": len(s.per_layer),
                "self_check": s.self_check,
            }

        return run
    if name == "torch_func_trace":
        from torch.func import functional_call, grad, vmap

        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss_one(p, x):
            xb = x.unsqueeze(0)
            return mean_loss(functional_call(model, p, (xb,)), xb)

        per_example = vmap(grad(loss_one), in_dims=(None, 0))

        def run():
            with math_attention():  # vmap has no batching rule for the CPU flash kernel
                g = per_example(params, ids)
            return {"fisher_trace": sum(float(v.pow(2).sum()) for v in g.values()) / n}

        return run
    if name == "opacus_trace":
        from opacus import GradSampleModule

        gsm = GradSampleModule(model, loss_reduction="sum").train()  # no dropout in the model

        def run():
            gsm.zero_grad(set_to_none=True)
            logits = gsm(ids)
            per = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                ids[:, 1:].reshape(-1),
                reduction="none",
            ).reshape(n, -1)
            per.mean(1).sum().backward()
            total = 0.0
            for p in gsm.parameters():
                gs = p.grad_sample
                total += float(gs.pow(2).sum())
            return {"fisher_trace": total / n}

        return run
    if name in ("gmcurv_hvp", "gmcurv_ggnvp"):
        import tempfile

        from safetensors.torch import save_file

        from gmcurv.io.data import load_data
        from gmcurv.operator import CurvatureOperator

        obj = Objective.build(model, "next_token")
        tmp = Path(tempfile.mkdtemp()) / "tokens.safetensors"
        save_file({"input_ids": ids}, str(tmp))
        kind = "hessian" if name == "gmcurv_hvp" else "ggn"
        op = CurvatureOperator(obj, load_data(tmp), batch_size=HVP_BATCH, kind=kind)
        v = unit_vector(obj.params)

        def run():
            hv = op.matvec_dict(v)
            quad = sum(float((hv[k] * v[k]).sum()) for k in v)
            return {"v_C_v": quad, "forward_mode": op.forward_mode}

        return run
    if name == "gmcurv_hessian_trace":
        import tempfile

        from safetensors.torch import save_file

        from gmcurv.hessian import curvature_summary
        from gmcurv.io.data import load_data

        obj = Objective.build(model, "next_token")
        tmp = Path(tempfile.mkdtemp()) / "tokens.safetensors"
        save_file({"input_ids": ids}, str(tmp))
        data = load_data(tmp)

        def run():  # `gmcurv trace --curvature hessian --no-per-layer --k 0 --tol 0.05`
            s = curvature_summary(
                obj, data, "hessian", probes=TRACE_CAP, k=0, per_layer=False, rtol=TRACE_TOL
            )
            t = s.trace
            return {
                "hessian_trace": t.value,
                "stderr": t.stderr,
                "rel_stderr": abs(t.stderr / t.value) if t.stderr and t.value else None,
                "products": s.n_matvecs,
                "stopped": s.stopped,
                "method": s.method,
                "notes": s.notes,
            }

        return run
    if name == "pyhessian_hvp":
        from pyhessian import hessian
        from pyhessian.utils import hessian_vector_product

        with math_attention():
            comp = hessian(model, mean_loss, data=(ids, ids), cuda=False)
        names = [k for k, p in model.named_parameters() if p.requires_grad]
        v = unit_vector(dict(model.named_parameters()))
        vs = [v[k] for k in names]

        def run():
            with math_attention():
                hv = hessian_vector_product(comp.gradsH, comp.params, vs)
            return {"v_C_v": sum(float((a * b).sum()) for a, b in zip(hv, vs, strict=True))}

        return run
    raise KeyError(name)


def measure_one(n: int, method: str, repeats: int) -> dict:
    torch.set_num_threads(2)
    if method.startswith("gmcurv"):  # the command line's start-up: its malloc setting
        from gmcurv.cli.session import warm_up_autograd

        warm_up_autograd()
    model, ids = build(n)
    base = rss_bytes()
    t_setup = time.perf_counter()
    try:
        run = make_method(method, model, ids)
        setup_s = time.perf_counter() - t_setup
        t0, c0 = time.perf_counter(), time.process_time()
        out = run()
        first_s, first_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    except Exception as e:  # a peer that cannot handle the model
        return {"status": "unsupported", "error": f"{type(e).__name__}: {str(e)[:300]}"}
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = run()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {
        "status": "ok",
        "n": n,
        "seq": SEQ,
        "n_params": sum(p.numel() for p in model.parameters()),
        "setup_s": round(setup_s, 3),
        "first_s": round(first_s, 3),
        "median_s": round(statistics.median(times), 3) if times else None,
        "min_s": round(min(times), 3) if times else None,
        "load_avg": [round(x, 2) for x in os.getloadavg()],  # 1, 5, 15 min, after the runs
        "times_s": [round(t, 3) for t in times],
        # CPU seconds of this process (both threads): less sensitive to other jobs' load
        "first_cpu_s": round(first_cpu_s, 3),
        "cpu_times_s": [round(t, 3) for t in cpu],
        "setup_rss_gb": round(base / 1e9, 3),
        "peak_rss_gb": round(peak_bytes() / 1e9, 3),
        "peak_extra_gb": round(max(0, peak_bytes() - base) / 1e9, 3),
        **out,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", nargs=2, metavar=("N", "METHOD"))
    ap.add_argument("--n", type=int, nargs="*", default=[4, 8])
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results.json"))
    ap.add_argument("--targets", type=int, metavar="ROUNDS", default=0, help="issue 13")
    ap.add_argument("--no-trace", action="store_true", help="--targets without the 5 %% trace")
    ap.add_argument("--with-hvp", action="store_true", help="--targets: also the HVP rows")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure_one(int(args.one[0]), args.one[1], args.repeats)))
        return
    if args.targets:
        methods = TARGETS + (HVP_TARGETS if args.with_hvp else [])
        targets(
            args.targets,
            args.repeats,
            Path(args.out),
            with_trace=not args.no_trace,
            methods=methods,
        )
        return
    repeats = 1 if args.quick else args.repeats
    results: dict = {}
    for n in args.n:
        key = f"N={n}"
        results[key] = {}
        for method in args.methods:
            proc = subprocess.run(
                [sys.executable, __file__, "--one", str(n), method, "--repeats", str(repeats)],
                capture_output=True,
                text=True,
                check=False,
            )
            try:
                res = json.loads(proc.stdout.strip().splitlines()[-1])
            except (IndexError, ValueError):
                res = {"status": "failed", "error": proc.stderr[-600:]}
            results[key][method] = res
            shown = (
                f"first {res['first_s']:.1f}s, median {res['median_s']}s, "
                f"peak {res['peak_rss_gb']:.2f} GB (+{res['peak_extra_gb']:.2f})"
                if res.get("status") == "ok"
                else f"{res['status']}: {res.get('error', '')[:200]}"
            )
            print(f"{key:5s} {method:22s} {shown}", flush=True)
        _compare(results[key])
    doc = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": 2,
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
        },
        "model": "GPT-2 124M (n_embd 768, 12 layers, 12 heads, vocab 50257), random init",
        "seq": SEQ,
        "repeats": repeats,
        "results": results,
    }
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")


def _one(n: int, method: str, repeats: int) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--one", str(n), method, "--repeats", str(repeats)],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"status": "failed", "error": proc.stderr[-600:]}


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def targets(
    rounds: int,
    repeats: int,
    out: Path,
    n: int = 8,
    with_trace: bool = True,
    methods: list[str] = TARGETS,
) -> None:
    """Issue 13's GPT-2 targets: `methods` interleaved over `rounds` (each method in its own
    process, minimum over rounds), then the Hessian trace to 5 % relative s.e. once."""
    doc: dict = {"uptime_before": _uptime(), "rounds": [], "n": n, "seq": SEQ}
    for r in range(rounds):
        row = {}
        for method in methods:
            row[method] = _one(n, method, repeats)
            res = row[method]
            print(f"round {r + 1} {method}: first {res.get('first_s')} s, "
                  f"min {res.get('min_s')} s, "
                  f"peak {res.get('peak_rss_gb')} GB {res.get('status')}, load "
                  f"{res.get('load_avg')}", flush=True)  # fmt: skip
        doc["rounds"].append(row)
    if with_trace:
        doc["hessian_trace"] = _one(n, "gmcurv_hessian_trace", 0)
    doc["uptime_after"] = _uptime()

    def best(method: str, key: str = "min_s") -> dict:
        ok = [row[method] for row in doc["rounds"] if row.get(method, {}).get("status") == "ok"]
        return min(ok, key=lambda x: x[key]) if ok else {}

    def ratios(key: str) -> list[float]:  # per round: trace / plain of the same round
        return [
            round(row["gmcurv_fisher_summary"][key] / row["plain_backward"][key], 3)
            for row in doc["rounds"]
            if row["gmcurv_fisher_summary"].get(key) and row["plain_backward"].get(key)
        ]

    plain, trace = best("plain_backward"), best("gmcurv_fisher_summary")
    hvp, peer = best("gmcurv_hvp"), best("pyhessian_hvp")
    doc["summary"] = {
        "trace_over_plain_time_per_round_repeat": ratios("min_s"),
        "trace_over_plain_time_per_round_first": ratios("first_s"),
        "trace_over_plain_peak_rss_per_round": ratios("peak_rss_gb"),
        "trace_over_plain_time": trace.get("min_s", 0) / plain["min_s"] if plain else None,
        "trace_over_plain_peak_rss": (trace.get("peak_rss_gb", 0) / plain["peak_rss_gb"])
        if plain
        else None,
        "hvp_over_pyhessian": hvp.get("min_s", 0) / peer["min_s"] if peer else None,
        "vHv_rel_diff": abs(hvp["v_C_v"] - peer["v_C_v"]) / abs(peer["v_C_v"])
        if hvp and peer
        else None,
    }
    doc["machine"] = {"python": platform.python_version(), "torch": torch.__version__,
                      "threads": 2, "cpus": os.cpu_count()}  # fmt: skip
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc["summary"], indent=2))


def _compare(res: dict) -> None:
    """Ratios to the plain backward pass and agreement between methods, in place."""
    ok = {k: v for k, v in res.items() if v.get("status") == "ok"}
    base = ok.get("plain_backward", {}).get("median_s")
    best = ok.get("plain_backward", {}).get("min_s")
    for v in ok.values():
        if base and v.get("median_s"):
            v["x_plain_backward"] = round(v["median_s"] / base, 2)
        if best and v.get("min_s"):
            v["x_plain_backward_min"] = round(v["min_s"] / best, 2)
    ref = ok.get("gmcurv_trace", {}).get("fisher_trace")
    for k in ("torch_func_trace", "opacus_trace", "gmcurv_trace_nocheck", "gmcurv_fisher_summary"):
        if ref and k in ok:
            ok[k]["trace_rel_diff_vs_gmcurv"] = abs(ok[k]["fisher_trace"] - ref) / abs(ref)
    hv = ok.get("gmcurv_hvp", {}).get("v_C_v")
    if hv and "pyhessian_hvp" in ok:
        ok["pyhessian_hvp"]["vHv_rel_diff_vs_gmcurv"] = abs(
            ok["pyhessian_hvp"]["v_C_v"] - hv
        ) / abs(hv)


if __name__ == "__main__":
    main()
