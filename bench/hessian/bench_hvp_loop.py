"""The 100-probe Hutchinson Hessian trace: gmcurv's engine against PyHessian's loop, with
a per-product split of where the time goes.

    python bench/hessian/bench_hvp_loop.py            # W1-W3, 5 rounds, 1 thread
    python bench/hessian/bench_hvp_loop.py --workloads W1 --rounds 7 --threads 2

Each workload (`bench/workloads.py`) runs in its own process holding both libraries,
timed round-robin (the order swapped every round), on the process CPU clock (user +
system time: load on the shared machine barely moves it at one thread) and on the wall
clock; kept: per library the median over rounds, and the median of the per-round ratios.

- gmcurv: exactly what ``gmcurv trace --curvature hessian --method hutchinson --probes 100
  --tol 0 --k 0 --no-per-layer`` computes after loading (`gmcurv.hessian.curvature_summary`:
  the operator, its gradient graph, 100 probes and products, the estimate);
- PyHessian: `bench/cli/peers.py`'s ``hessian100`` (``pyhessian.hessian`` builds the
  graph, then 100 × Rademacher probe, ``hessian_vector_product``, ``group_product``).

`gmcurv.memory.keep_freed_memory` is applied in the process (the CLI does it at
start-up), so it serves both libraries alike.

The split (`--split`, on by default) replays 100 products of each library step by step
with a CPU-clock timer around every step: probe generation, the backward through the
kept graph, gmcurv's per-product bookkeeping around it (parameter views, the 1/N scaling,
flattening), the sample ``z^T H z`` and the stopping rule. Writes
``bench/hessian/hvp_loop.json`` with ``uptime`` before and after each workload.

Before/after: ``--tree DIR --no-split`` imports gmcurv from DIR (e.g. ``git archive
OLD gmcurv | tar -x -C DIR``) instead of the installed checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "cli"))
from workloads import WORKLOADS, build  # noqa: E402

PROBES = 100


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _clock() -> tuple[float, float]:
    return time.process_time(), time.perf_counter()


def _since(t: tuple[float, float]) -> tuple[float, float]:
    cpu, wall = _clock()
    return cpu - t[0], wall - t[1]


def use_tree(tree: str) -> None:
    """Import gmcurv from `tree`, not from the editable install."""
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in f.__module__]
    sys.path.insert(0, tree)


def one(name: str, rounds: int, split: bool) -> dict:
    from peers import hessian100
    from safetensors.torch import save_file

    from gmcurv.hessian import curvature_summary
    from gmcurv.io.data import load_data
    from gmcurv.memory import keep_freed_memory
    from gmcurv.objective import Objective

    keep_freed_memory()
    import gmcurv

    w = build(name)
    path = Path(tempfile.mkdtemp()) / f"{name}.safetensors"
    save_file({"inputs": w.x.contiguous(), "targets": w.y.contiguous()}, str(path))
    obj = Objective.build(w.model, "cross_entropy")
    data = load_data(path, None)

    def ours() -> float:
        s = curvature_summary(
            obj, data, "hessian", method="hutchinson", probes=PROBES, k=0, per_layer=False,
            rtol=0.0,
        )  # fmt: skip
        assert s.n_matvecs == PROBES
        return s.trace.value

    def theirs() -> float:
        for p in w.model.parameters():  # PyHessian's backward(create_graph) fills .grad
            p.grad = None
        return hessian100(w)[1]

    fns = {"gmcurv": ours, "pyhessian": theirs}
    values = {k: f() for k, f in fns.items()}  # warm-up (lazy imports, allocator)
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    wall: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for lib in ("gmcurv", "pyhessian") if r % 2 == 0 else ("pyhessian", "gmcurv"):
            t = _clock()
            values[lib] = fns[lib]()
            c, s = _since(t)
            cpu[lib].append(c)
            wall[lib].append(s)
    row = {
        "workload": name,
        "n": w.n,
        "params": w.n_params,
        "threads": torch.get_num_threads(),
        "gmcurv": str(Path(gmcurv.__file__).parent),
        "median_cpu_ms_per_product": {k: _ms(statistics.median(v)) for k, v in cpu.items()},
        "median_wall_ms_per_product": {k: _ms(statistics.median(v)) for k, v in wall.items()},
        "gmcurv_over_pyhessian_cpu": _paired(cpu),
        "gmcurv_over_pyhessian_wall": _paired(wall),
        "trace": values,
        "cpu_s": {k: [round(x, 4) for x in v] for k, v in cpu.items()},
        "wall_s": {k: [round(x, 4) for x in v] for k, v in wall.items()},
    }
    if split:
        row["split_cpu_ms_per_product"] = {
            "gmcurv": split_gmcurv(obj, data),
            "pyhessian": split_pyhessian(w),
        }
    return row


def _ms(seconds: float) -> float:
    return round(1e3 * seconds / PROBES, 3)


def _paired(times: dict[str, list[float]]) -> float:
    """Median over rounds of gmcurv / PyHessian (the two ran back to back)."""
    pairs = zip(times["gmcurv"], times["pyhessian"], strict=True)
    return round(statistics.median(a / b for a, b in pairs), 3)


class Steps:
    """CPU time per named step, summed over a replay."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self.t = time.process_time()

    def mark(self, step: str) -> None:
        now = time.process_time()
        self.total[step] = self.total.get(step, 0.0) + now - self.t
        self.t = now

    def per_product(self) -> dict[str, float]:
        out = {k: round(1e3 * v / PROBES, 3) for k, v in self.total.items()}
        out["total"] = round(sum(out.values()), 3)
        return out


def split_gmcurv(obj, data) -> dict[str, float]:
    """The steps of `gmcurv.stochastic.deflated_block_traces` around
    `gmcurv.operator.CurvatureOperator.matvec`, one by one (the graph is built first)."""
    from gmcurv.operator import CurvatureOperator
    from gmcurv.stochastic import _generator, _Running, probe_dots, rademacher_bits

    op = CurvatureOperator(obj, data, kind="hessian")
    op.prepare()
    gen = _generator(0, obj.device)
    running, rows = _Running(), []
    st = Steps()
    for _ in range(PROBES):
        g = rademacher_bits(op.size, gen, obj.dtype, obj.device)
        st.mark("probe (rademacher_bits)")
        vec = op.space.unflatten(g)
        out = None
        for i, batch in op._product_batches():
            st.mark("views, batch loop")
            part = op._batch(i, batch, vec)
            st.mark("backward through the kept graph")
            out = part if out is None else {k: t.add_(part[k]) for k, t in out.items()}
            st.mark("views, batch loop")
        mean = op._mean(out, 1)
        st.mark("1/N scaling")
        y = op.space.flatten(mean)
        st.mark("flatten (one cat)")
        total, _ = probe_dots({}, g, y)
        st.mark("z^T H z (float64 sum)")
        rows.append([total])
        running.add(total)
        running.mean_se()
        st.mark("stopping rule, bookkeeping")
    return st.per_product()


def split_pyhessian(w) -> dict[str, float]:
    """`bench/cli/peers.py`'s ``hessian100`` loop, one step at a time."""
    from pyhessian import hessian
    from pyhessian.utils import group_product, hessian_vector_product

    for p in w.model.parameters():
        p.grad = None
    torch.manual_seed(0)
    h = hessian(w.model, torch.nn.CrossEntropyLoss(), data=(w.x, w.y), cuda=False)
    st = Steps()
    for _ in range(PROBES):
        v = [torch.randint_like(p, high=2) for p in h.params]
        for v_i in v:
            v_i[v_i == 0] = -1
        st.mark("probe (randint_like, masked fill)")
        hv = hessian_vector_product(h.gradsH, h.params, v)
        st.mark("backward through the kept graph")
        group_product(hv, v).item()
        st.mark("z^T H z (float32 sums)")
    return st.per_product()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workloads", nargs="*", default=list(WORKLOADS))
    ap.add_argument("--no-split", action="store_true")
    ap.add_argument("--tree", help="import gmcurv from this directory (before/after)")
    ap.add_argument("--out", default=str(HERE / "hvp_loop.json"))
    args = ap.parse_args()
    if args.one:
        if args.tree:
            use_tree(args.tree)
        torch.set_num_threads(args.threads)
        print(json.dumps(one(args.one, args.rounds, not args.no_split)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE"}
    rows = []
    for name in args.workloads:
        before = uptime()
        cmd = [sys.executable, __file__, "--one", name, "--rounds", str(args.rounds)]
        cmd += ["--threads", str(args.threads)] + (["--no-split"] if args.no_split else [])
        cmd += ["--tree", args.tree] if args.tree else []
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        try:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            row = {"workload": name, "status": "failed", "error": proc.stderr[-1500:]}
        row.update(uptime_before=before, uptime_after=uptime())
        rows.append(row)
        print(
            name,
            row.get("median_cpu_ms_per_product"),
            "cpu ratio",
            row.get("gmcurv_over_pyhessian_cpu"),
            "wall ratio",
            row.get("gmcurv_over_pyhessian_wall"),
            flush=True,
        )
    doc = {
        "command": "python bench/hessian/bench_hvp_loop.py " + " ".join(sys.argv[1:]),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": args.threads,
            "cpus": os.cpu_count(),
            "commit": _commit(),
            "gmcurv_from": args.tree or "this checkout",
        },
        "rounds": args.rounds,
        "probes": PROBES,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")


def _commit() -> str:
    proc = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
    )
    return proc.stdout.strip()


if __name__ == "__main__":
    main()
