"""Where the default `gmcurv trace` spends its time on GPT-2, stage by stage, against one
plain forward+backward over the same sequences, in one process.

    flock /tmp/gmcurv-bench.lock nice -n 10 python bench/models/profile_gpt2_trace.py
    python bench/models/profile_gpt2_trace.py --layers 4 --threads 1   # a smaller proxy

Model and data as `bench_gpt2.py` (GPT-2 124M by default, random init, 8 x 128 random
tokens; `--layers` / `--width` for a proxy). Each round runs the plain ``loss.backward()``
then `fisher_summary` with the default options (what `gmcurv trace` computes), after the
command line's start-up (`gmcurv.cli.session.warm_up_autograd`: its malloc setting). Stages
are timed by wrapping the engine functions that run them (wall and CPU seconds of this
process; CPU seconds are the less load-sensitive measure on a shared machine): the memory
preflight (its one-example forward is also the self-check's reference), the hooked forward
and backward to the module outputs (`Capturer._record`), the factors, the one-off
self-check (`check_example`: one example's backward, its materialised gradient, the
agreement norms), per-block squared norms (`FisherAccumulator.add`), the Gram kernel and
the top-5 eigenvalues.
Results: ``profile_gpt2_trace.json`` (see RESULTS.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

STAGES = [  # (module, attribute, label)
    ("gmcurv.capture.stream", "preflight_capture", "preflight"),
    ("gmcurv.capture.capturer:Capturer", "_record", "hooked fwd + bwd to outputs"),
    ("gmcurv.capture.capturer", "block_source", "factors"),
    ("gmcurv.capture.capturer", "check_example", "self-check"),
    ("gmcurv.fisher:FisherAccumulator", "add", "per-block squared norms"),
    ("gmcurv.fisher", "formed_kernel_product", "Gram kernel"),
    ("gmcurv.fisher", "fisher_eigen", "top-5 eigenvalues"),
]


def _wrap(times: dict, target: str, name: str, label: str) -> None:
    import importlib

    mod_name, _, cls = target.partition(":")
    owner = importlib.import_module(mod_name)
    owner = getattr(owner, cls) if cls else owner
    f = getattr(owner, name)

    @functools.wraps(f)
    def timed(*a, **k):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return f(*a, **k)
        finally:
            d = times.setdefault(label, [0.0, 0.0])
            d[0] += time.perf_counter() - t0
            d[1] += time.process_time() - c0

    setattr(owner, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "profile_gpt2_trace.json"))
    args = ap.parse_args()

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    from gmcurv.cli.session import warm_up_autograd

    warm_up_autograd()  # the command line's start-up (its malloc setting)
    import bench_gpt2 as B

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(use_cache=False, n_layer=args.layers, n_embd=args.width)
    model = transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation="eager").eval()
    ids = torch.randint(0, 50257, (8, B.SEQ), generator=torch.Generator().manual_seed(0))
    times: dict = {}
    for target, name, label in STAGES:
        _wrap(times, target, name, label)
    plain = B.make_method("plain_backward", model, ids)
    summary = B.make_method("gmcurv_fisher_summary", model, ids)
    rounds = []
    for _ in range(args.rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        plain()
        plain_wall, plain_cpu = time.perf_counter() - t0, time.process_time() - c0
        model.zero_grad(set_to_none=True)
        times.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        out = summary()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        row = {
            "plain_wall_s": round(plain_wall, 3),
            "plain_cpu_s": round(plain_cpu, 3),
            "trace_wall_s": round(wall, 3),
            "trace_cpu_s": round(cpu, 3),
            "ratio_wall": round(wall / plain_wall, 3),
            "ratio_cpu": round(cpu / plain_cpu, 3),
            "stages_cpu_s": {k: round(v[1], 3) for k, v in times.items()},
            "stages_cpu_over_plain": {k: round(v[1] / plain_cpu, 3) for k, v in times.items()},
            "stages_wall_s": {k: round(v[0], 3) for k, v in times.items()},
            "load_avg": [round(x, 2) for x in os.getloadavg()],
            "fisher_trace": out["fisher_trace"],
            "top_eigenvalues": out["top_eigenvalues"],
        }
        rounds.append(row)
        print(json.dumps(row), flush=True)
    doc = {
        "model": f"GPT-2 ({args.layers} layers, width {args.width}), random init, 8 x 128",
        "threads": args.threads,
        "torch": torch.__version__,
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
        "rounds": rounds,
    }
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
