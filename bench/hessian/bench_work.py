"""The work behind a 100-probe Hessian trace, counted (load-independent): gmcurv's command
against PyHessian's loop, on W1-W3.

    python bench/hessian/bench_work.py

Timings on a shared 2-core machine swing by 30 % between two runs of the same command;
counts do not. For each workload, in its own process: matmul FLOPs
(`torch.utils.flop_counter.FlopCounterMode`) and every aten op with the elements it
writes (a ``TorchDispatchMode``, forward and backward), over

- gmcurv: the ``hessian`` stage of ``gmcurv trace --curvature hessian --method hutchinson
  --probes 100 --tol 0 --k 0 --no-per-layer`` (`gmcurv.hessian.curvature_summary`, run
  through the CLI in-process), i.e. what `bench/cli/bench_cli.py` times as compute;
- PyHessian: `bench/cli/peers.py`'s ``hessian100`` (constructor + 100 products), what
  that benchmark times for the peer.

Writes ``bench/hessian/work.json``: per workload, FLOPs, op calls and elements per side,
and the ops whose counts differ most. Views and detaches write nothing (counted apart).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "cli"))
sys.path.insert(0, str(HERE.parent / "distributed"))
FREE = {"aten.view", "aten.detach", "aten.t", "aten._unsafe_view", "aten.alias", "aten.slice"}
FREE |= {"aten.expand", "aten.reshape", "aten.unsqueeze", "aten.squeeze", "aten.transpose"}
FREE |= {"aten.permute", "aten.as_strided", "aten.split_with_sizes", "aten.split"}


def counted(run) -> dict:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    ops: collections.Counter = collections.Counter()
    elems: collections.Counter = collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            outs = out if isinstance(out, tuple | list) else [out]
            name = str(func.overloadpacket)
            ops[name] += 1
            elems[name] += sum(t.numel() for t in outs if isinstance(t, torch.Tensor))
            return out

    flops = FlopCounterMode(display=False)
    with flops, Count():
        run()
    work = {k: v for k, v in ops.items() if k not in FREE}
    return {
        "flops": flops.get_total_flops(),
        "ops": sum(work.values()),
        "elements": sum(v for k, v in elems.items() if k not in FREE),
        "by_op": {k: [ops[k], elems[k]] for k in work},
    }


def gmcurv_side(name: str, tmp: Path) -> dict:
    from bench_cli import HESSIAN100
    from bench_distributed import write_workload
    from typer.testing import CliRunner

    import gmcurv.hessian as hs
    from gmcurv.cli.app import app

    model, data, extra = write_workload(name, tmp)
    box: dict = {}
    real = hs.curvature_summary

    def wrapped(*a, **kw):
        box["out"] = None

        def run():
            box["out"] = real(*a, **kw)

        box["counts"] = counted(run)
        return box["out"]

    hs.curvature_summary = wrapped
    os.environ["GMCURV_NO_CONFIG"] = "1"
    r = CliRunner().invoke(app, [*HESSIAN100, str(model), str(data), *extra, "-q"])
    assert r.exit_code == 0, r.output
    return box["counts"]


def peer_side(name: str) -> dict:
    import peers
    from workloads import build

    w = build(name)
    import pyhessian  # noqa: F401  (start-up, as in peers.py)

    return counted(lambda: peers.hessian100(w))


def one(name: str) -> dict:
    import torch

    torch.set_num_threads(1)
    import torch.fx.experimental.symbolic_shapes  # torch's lazy imports

    g = gmcurv_side(name, Path(tempfile.mkdtemp()))
    p = peer_side(name)
    diff = sorted(
        set(g["by_op"]) | set(p["by_op"]),
        key=lambda k: -abs(g["by_op"].get(k, [0, 0])[1] - p["by_op"].get(k, [0, 0])[1]),
    )
    return {
        "workload": name,
        "gmcurv": {k: g[k] for k in ("flops", "ops", "elements")},
        "pyhessian": {k: p[k] for k in ("flops", "ops", "elements")},
        "flops_ratio": g["flops"] / p["flops"],
        "elements_ratio": g["elements"] / p["elements"],
        "largest_differences": {
            k: {"gmcurv": g["by_op"].get(k, [0, 0]), "pyhessian": p["by_op"].get(k, [0, 0])}
            for k in diff[:8]
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one")
    ap.add_argument("--workloads", nargs="*", default=["W1", "W2", "W3"])
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    rows = []
    for name in args.workloads:
        proc = subprocess.run(
            [sys.executable, __file__, "--one", name], capture_output=True, text=True
        )
        try:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        except (IndexError, ValueError):
            rows.append({"workload": name, "status": "failed", "error": proc.stderr[-1500:]})
        r = rows[-1]
        print(name, r.get("flops_ratio"), r.get("elements_ratio"), flush=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
    ).stdout.strip()
    doc = {"commit": commit, "unit": "per 100-probe trace (constructor/graph included)"}
    (HERE / "work.json").write_text(json.dumps({**doc, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
