"""GPT-2 124M Hessian-vector products: gmcurv against PyHessian, side by side.

    flock /tmp/gmcurv-bench.lock nice -n 5 python bench/models/bench_gpt2_hvp.py --rounds 2
    flock /tmp/gmcurv-bench.lock nice -n 5 python bench/models/bench_gpt2_hvp.py --trace

Model: `transformers`' ``GPT2LMHeadModel`` at the ``gpt2`` config (124M parameters,
``lm_head`` tied to ``wte``), random initialisation with seed 0, eager attention, eval
mode, float32, 2 threads; data: 8 random sequences of 128 tokens, next-token loss over
all tokens (the mean over the 8 x 127 predictions; gmcurv's ``next_token`` objective is the
same mean, checked through ``v^T H v`` agreeing).

Per-HVP mode (default): each library runs in its own process, the two alternating over
`--rounds` (order swapped every round) so that load on the shared machine hits both alike.
A process builds the model, then:

- ``pyhessian``: ``pyhessian.hessian(model, criterion, data=(ids, ids))`` with the model
  wrapped as ``ids -> logits`` (PyHessian calls ``criterion(model(inputs), targets)``; the
  Hugging Face model returns a ``ModelOutput``, which is why the earlier harness reported
  ``unsupported``) and ``criterion`` = next-token cross-entropy; its constructor runs the
  ``backward(create_graph=True)`` (timed as "graph"); every product is
  ``pyhessian.utils.hessian_vector_product`` through the kept graph;
- ``gmcurv``: `gmcurv.operator.CurvatureOperator` (Hessian, default batch size and graph
  budget) ``matvec_dict``; its first product builds the gradient graph (timed as "graph",
  the product included); later products are one backward through it.

Both use the math attention kernel (the CPU flash kernel has no double backward).
Recorded per process: set-up, graph (first product), the per-product times of
`--products` products, peak RSS, ``v^T H v`` for a fixed unit ``v``, and ``uptime``.
Then `--steps` Hutchinson steps, as each library's trace loop runs them: a Rademacher
probe, its product, the sample ``z^T H z`` — PyHessian: ``randint_like`` and a masked fill
per parameter, ``hessian_vector_product``, ``group_product``; gmcurv: what
`gmcurv.stochastic.deflated_block_traces` does per probe (``rademacher_bits``,
``CurvatureOperator.matvec`` of the flat probe, ``probe_dots``). The gmcurv process starts
with `gmcurv.memory.keep_freed_memory` (``large=True``: no mmapped blocks), as the CLI does.

Trace mode (`--trace`): what ``gmcurv trace --curvature hessian --no-per-layer --k 0
--tol 0.05`` computes (`gmcurv.hessian.curvature_summary`), in its own process: value,
standard error, products, time, peak RSS.

`OMP_WAIT_POLICY=PASSIVE` is set for every subprocess alike (`--spin` leaves OpenMP's
default): spin-waiting OpenMP threads distort 2-thread timings on an oversubscribed machine.
Results: ``bench/models/results_hvp.json``.
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
SEQ, N = 128, 8
THREADS = 2


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def peak_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3)


def build():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(use_cache=False)
    model = transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation="eager").eval()
    ids = torch.randint(0, cfg.vocab_size, (N, SEQ), generator=torch.Generator().manual_seed(0))
    return model, ids


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over all predictions (gmcurv's ``next_token``)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


class Logits(torch.nn.Module):
    """``ids -> logits``: the model as PyHessian calls it (same parameters)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).logits


def unit_vector(shapes: list[torch.Size]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    v = [torch.randn(s, generator=g) for s in shapes]
    norm = sum(float(x.pow(2).sum()) for x in v) ** 0.5
    return [x / norm for x in v]


def math_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def one_hvp(library: str, products: int, steps: int = 0) -> dict:
    """Set-up, graph and per-product times of one library, in this process; then `steps`
    whole Hutchinson steps (probe, product, sample)."""
    torch.set_num_threads(THREADS)
    model, ids = build()
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    v = unit_vector([params[k].shape for k in names])
    t0 = time.perf_counter()
    extra: dict = {}
    if library == "pyhessian":
        from pyhessian import hessian
        from pyhessian.utils import hessian_vector_product

        wrapped = Logits(model)
        with math_attention():
            comp = hessian(wrapped, next_token_loss, data=(ids, ids), cuda=False)
        assert len(comp.params) == len(v), "PyHessian's parameter list differs"

        def product() -> list[torch.Tensor]:
            with math_attention():
                return hessian_vector_product(comp.gradsH, comp.params, v)

        def step() -> float:  # pyhessian.hessian.trace's loop body
            from pyhessian.utils import group_product

            z = [torch.randint_like(p, high=2) for p in comp.params]
            for z_i in z:
                z_i[z_i == 0] = -1
            with math_attention():
                hz = hessian_vector_product(comp.gradsH, comp.params, z)
            return group_product(hz, z).item()

        setup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        hv = product()
        graph_s = time.perf_counter() - t0  # PyHessian built its graph in the constructor
        graph_s += setup_s
        setup_s = 0.0
    else:
        import tempfile

        from safetensors.torch import save_file

        from gmcurv.io.data import load_data
        from gmcurv.memory import keep_freed_memory
        from gmcurv.objective import Objective
        from gmcurv.operator import CurvatureOperator
        from gmcurv.stochastic import _generator, probe_dots, rademacher_bits

        keep_freed_memory(large=True)  # as the CLI does
        obj = Objective.build(model, "next_token")
        assert list(obj.params) == names
        tmp = Path(tempfile.mkdtemp()) / "tokens.safetensors"
        save_file({"input_ids": ids}, str(tmp))
        op = CurvatureOperator(obj, load_data(tmp), kind="hessian")
        vec = dict(zip(names, v, strict=True))

        def product() -> list[torch.Tensor]:
            out = op.matvec_dict(vec)
            return [out[k] for k in names]

        gen = _generator(0, obj.device)

        def step() -> float:  # gmcurv.stochastic.deflated_block_traces' loop body
            z = rademacher_bits(op.size, gen, obj.dtype, obj.device)
            return probe_dots({}, z, op.matvec(z))[0]

        setup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        hv = product()
        graph_s = time.perf_counter() - t0
        extra = {
            "graph_cached": bool(op.graphs.graphs),
            "graph_gb": round(op.graphs.held / 1e9, 3),
            "graph_budget_gb": round(op.graphs.budget / 1e9, 3),
            "forward_mode": op.forward_mode,
        }
    vhv = sum(float((a * b).sum()) for a, b in zip(hv, v, strict=True))
    del hv
    times = []
    for _ in range(products):
        t0 = time.perf_counter()
        hv = product()
        times.append(time.perf_counter() - t0)
        del hv
    step_times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        step_times.append(time.perf_counter() - t0)
    return {
        "library": library,
        "status": "ok",
        "setup_s": round(setup_s, 3),
        "graph_and_first_product_s": round(graph_s, 3),
        "product_s": [round(t, 3) for t in times],
        "median_product_s": round(statistics.median(times), 3) if times else None,
        "min_product_s": round(min(times), 3) if times else None,
        "step_s": [round(t, 3) for t in step_times],
        "median_step_s": round(statistics.median(step_times), 3) if step_times else None,
        "v_H_v": vhv,
        "peak_rss_gb": peak_gb(),
        "uptime_after": uptime(),
        **extra,
    }


PROGRESS = HERE / "results_hvp_trace_progress.jsonl"


def watch_probes(t0: float) -> None:
    """Append every probe's ``z^T H z`` with the running mean and standard error to
    `PROGRESS` as it lands (the trace can run for hours; nothing is lost if it is cut).
    It observes `gmcurv.stochastic.probe_dots`, which the trace calls once per probe with
    the probe ``z`` and its product ``H z``; the numbers computed are unchanged."""
    import gmcurv.stochastic as st

    inner = st.probe_dots
    samples: list[float] = []
    PROGRESS.write_text("")

    def observed(slices, g, y):
        total, parts = inner(slices, g, y)
        samples.append(total)
        m = len(samples)
        mean = statistics.fmean(samples)
        se = statistics.stdev(samples) / m**0.5 if m > 1 else None
        row = {"probe": m, "t_s": round(time.perf_counter() - t0, 1), "zHz": samples[-1],
               "mean": mean, "stderr": se, "rel_stderr": abs(se / mean) if se else None,
               "uptime": uptime()}  # fmt: skip
        with PROGRESS.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return total, parts

    st.probe_dots = observed


def one_trace(rtol: float, cap: int) -> dict:
    """``gmcurv trace --curvature hessian --no-per-layer --k 0 --tol rtol --probes cap``."""
    import tempfile

    from safetensors.torch import save_file

    from gmcurv.hessian import curvature_summary
    from gmcurv.io.data import load_data
    from gmcurv.objective import Objective

    torch.set_num_threads(THREADS)
    model, ids = build()
    obj = Objective.build(model, "next_token")
    tmp = Path(tempfile.mkdtemp()) / "tokens.safetensors"
    save_file({"input_ids": ids}, str(tmp))
    stamps: list[float] = []
    t0 = time.perf_counter()
    watch_probes(t0)
    s = curvature_summary(
        obj, load_data(tmp), "hessian", probes=cap, k=0, per_layer=False, rtol=rtol,
        progress=lambda _: stamps.append(round(time.perf_counter() - t0, 2)),
    )  # fmt: skip
    t = s.trace
    return {
        "status": "ok",
        "seconds": round(time.perf_counter() - t0, 2),
        "product_done_at_s": stamps,
        "hessian_trace": t.value,
        "stderr": t.stderr,
        "rel_stderr": abs(t.stderr / t.value) if t.stderr and t.value else None,
        "products": s.n_matvecs,
        "stopped": s.stopped,
        "method": s.method,
        "notes": s.notes,
        "peak_rss_gb": peak_gb(),
        "uptime_after": uptime(),
    }


def subprocess_json(args: list[str], spin: bool) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    if not spin:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False
    )
    try:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        out = {"status": "failed", "error": proc.stderr[-1500:]}
    out["process_wall_s"] = round(time.perf_counter() - t0, 2)
    return out


def machine(spin: bool) -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": THREADS,
        "cpus": os.cpu_count(),
        "omp_wait_policy": "default" if spin else "PASSIVE (both libraries)",
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", choices=["gmcurv", "pyhessian"])
    ap.add_argument("--one-trace", action="store_true")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--products", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1, help="Hutchinson steps after products")
    ap.add_argument("--trace", action="store_true", help="the Hessian trace to --tol")
    ap.add_argument("--tol", type=float, default=0.05)
    ap.add_argument("--cap", type=int, default=400)
    ap.add_argument("--spin", action="store_true", help="leave OMP_WAIT_POLICY unset")
    ap.add_argument("--out", default=str(HERE / "results_hvp.json"))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_hvp(args.one, args.products, args.steps)))
        return
    if args.one_trace:
        print(json.dumps(one_trace(args.tol, args.cap)))
        return
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc["setup"] = {
        "model": "GPT2LMHeadModel, gpt2 config (124M), random init seed 0, eager attention",
        "data": f"{N} x {SEQ} random tokens, next-token loss",
        **machine(args.spin),
    }
    if args.trace:
        cmd = ["--one-trace", "--tol", str(args.tol), "--cap", str(args.cap)]
        doc["trace"] = {"uptime_before": uptime(), **subprocess_json(cmd, args.spin)}
        print(json.dumps(doc["trace"], indent=1))
    else:
        rounds = []
        for r in range(args.rounds):
            order = ["gmcurv", "pyhessian"] if r % 2 == 0 else ["pyhessian", "gmcurv"]
            row = {}
            for lib in order:
                before = uptime()
                row[lib] = {"uptime_before": before, **subprocess_json(
                    ["--one", lib, "--products", str(args.products), "--steps",
                     str(args.steps)], args.spin
                )}  # fmt: skip
                res = row[lib]
                graph = res.get("graph_and_first_product_s")
                print(f"round {r + 1} {lib}: {res.get('product_s')} s/product, "
                      f"{res.get('step_s')} s/step, graph {graph}"
                      f" s, peak {res.get('peak_rss_gb')} GB, {res.get('status')} "
                      f"{res.get('error', '')[-300:]}", flush=True)  # fmt: skip
            rounds.append(row)
        doc["hvp"] = {"rounds": rounds, "summary": summarise(rounds)}
        print(json.dumps(doc["hvp"]["summary"], indent=1))
    out.write_text(json.dumps(doc, indent=2) + "\n")


def summarise(rounds: list[dict]) -> dict:
    """Per round, gmcurv / PyHessian median product time; overall the median of those."""
    ratios, steps, agree = [], [], []
    for row in rounds:
        g, p = row.get("gmcurv", {}), row.get("pyhessian", {})
        if g.get("status") == "ok" and p.get("status") == "ok":
            ratios.append(g["median_product_s"] / p["median_product_s"])
            if g.get("median_step_s") and p.get("median_step_s"):
                steps.append(g["median_step_s"] / p["median_step_s"])
            agree.append(abs(g["v_H_v"] - p["v_H_v"]) / abs(p["v_H_v"]))
    return {
        "gmcurv_over_pyhessian_per_round": [round(x, 3) for x in ratios],
        "gmcurv_over_pyhessian_median": round(statistics.median(ratios), 3) if ratios else None,
        "step_gmcurv_over_pyhessian_per_round": [round(x, 3) for x in steps],
        "step_gmcurv_over_pyhessian_median": round(statistics.median(steps), 3) if steps else None,
        "vHv_rel_diff_max": max(agree) if agree else None,
    }


if __name__ == "__main__":
    main()
