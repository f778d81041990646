"""GGN-vector products through a cached output graph against forward-mode ``jvp``, on the
bundled tiny_gpt (128 x 64 tokens), interleaved in one process:

    python bench/hessian/bench_ggn_graph.py --threads 1 --rounds 1   # the committed JSON

- ``product``: one ``G v`` on the whole sample, the old route (a fresh forward, ``jvp``,
  ``vjp``) against the graph route (``J v`` by one backward through ``Jᵀu``'s graph, ``Jᵀw``
  through the outputs'), with the largest difference relative to the largest entry;
- ``all``: the engine work of ``gmcurv trace --curvature all`` after the Fisher (the GGN
  and Hessian summaries, `gmcurv.hessian.curvature_summary` with the CLI's defaults) with
  the GGN's output graphs off (the old route) and on, products counted.

Wall and CPU seconds per side, and ``uptime``'s load before and after, go to
``bench/hessian/ggn_graph.json``. The old route is the new code with
`gmcurv.graphcache.output_graph` refusing every graph (then ``J v`` comes by ``jvp``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def load() -> float:
    return os.getloadavg()[0]


@contextmanager
def route(graph: bool):
    from gmcurv import batchstate

    real = batchstate.output_graph
    if not graph:
        batchstate.output_graph = lambda *a, **kw: None
    try:
        yield
    finally:
        batchstate.output_graph = real


def clock(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-all", action="store_true", help="only the single products")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from gmcurv.hessian import curvature_summary
    from gmcurv.io.checkpoint import load_model
    from gmcurv.io.data import load_data
    from gmcurv.io.samples import sample_data, sample_model
    from gmcurv.objective import Objective
    from gmcurv.operator import CurvatureOperator

    loaded = load_model(sample_model("tiny_gpt").parent)
    obj = Objective.build(loaded.model, loaded.loss)
    data = load_data(sample_data("tiny_gpt"))
    gen = torch.Generator().manual_seed(0)
    vs = [torch.randn(obj.space.size, generator=gen) for _ in range(5)]
    doc: dict = {"threads": args.threads, "load_before": load(), "product": [], "all": []}
    ops = {}
    for graph in (False, True):
        with route(graph):
            op = CurvatureOperator(obj, data, 256, "ggn")
            _, w, c = clock(lambda op=op: op.matvec(vs[0]))  # first: builds graphs
            ops[graph] = op
            doc[f"first_product_{'graph' if graph else 'jvp'}"] = {"wall": w, "cpu": c}
    for r in range(args.rounds):
        res = {}
        for graph in (False, True):
            with route(graph):
                out, w, c = clock(lambda g=graph, r=r: ops[g].matvec(vs[1 + r % 4]))
            res[graph] = out
            doc["product"].append({"route": "graph" if graph else "jvp", "wall": w, "cpu": c})
        diff = float((res[True] - res[False]).abs().max() / res[False].abs().max())
        doc["product"][-1]["rel_diff_vs_jvp"] = diff
        print(doc["product"][-2:], flush=True)
    if not args.skip_all:
        for _ in range(args.rounds):
            for graph in (False, True):
                with route(graph):
                    cache: dict = {}

                    s, per = {}, {}
                    for kind in ("ggn", "hessian"):
                        s[kind], *per[kind] = clock(
                            lambda kind=kind, cache=cache: curvature_summary(
                                obj, data, kind, cache=cache
                            )
                        )
                row = {
                    "route": "graph" if graph else "jvp",
                    "wall": sum(t[0] for t in per.values()),
                    "cpu": sum(t[1] for t in per.values()),
                    "per_kind": {k: {"wall": t[0], "cpu": t[1]} for k, t in per.items()},
                    "products": {k: v.n_matvecs for k, v in s.items()},
                    "trace": {k: v.trace.value for k, v in s.items()},
                    "stderr": {k: v.trace.stderr for k, v in s.items()},
                    "load": load(),
                }
                doc["all"].append(row)
                print(row, flush=True)
    doc["load_after"] = load()
    (HERE / "ggn_graph.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
