"""``gmcurv spectrum`` on Hugging Face directories: per product against a plain HVP, and the
whole command (issue 13, RESULTS.md row 9 of "Commands beyond trace").

Per family (the tiny ``save_pretrained`` models of `try_families`: BERT classifier, Llama,
ViT; 16 examples), in one fresh process with one torch thread, rounds interleaved in a
shuffled order, thread CPU time and wall time per product (medians):

- ``gmcurv``: `CurvatureOperator.matvec` (the kept whole-sample gradient graph, as the CLI);
- ``gmcurv (hooked graph)``: the same product through a graph built under identity
  ``saved_tensors_hooks`` — how `GraphCache` counted bytes before this change (the hooks
  stay attached: each product calls Python once per saved tensor);
- ``plain kept graph``: ``∇<g, v>`` with ``g = ∇ outputs.loss`` built once with
  ``create_graph`` (the model's own loss, math attention kernel);
- ``plain torch.func``: ``jvp(grad(outputs.loss))`` through ``functional_call``, forward
  recomputed each product.

All four agree (relative difference printed). Then the whole command, default options
(3 probes x 50 steps), in a fresh process per family, with 1 torch thread and with the
default (all cores), and with the default under ``OMP_WAIT_POLICY=PASSIVE``: wall, CPU
seconds, the report's stage timings, the trace and the top node.

    nice -n 10 python bench/families/spectrum_speed.py            # writes spectrum_speed.json
    python bench/families/spectrum_speed.py --markdown              # the RESULTS.md tables

Under load, wall times are noise (``uptime`` is recorded); the CPU-time ratios are the result.
"""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
OUT = HERE / "spectrum_speed.json"
FAMILIES = ("bert-cls", "llama", "vit")
ROUNDS = 100


def build(root: Path) -> dict[str, dict]:
    """The families' model directories and data files, as `try_families.build` writes them."""
    import contextlib
    import io

    from safetensors.torch import save_file
    from try_families import _data, _hf_model

    out = {}
    for fam in FAMILIES:
        d = root / fam
        d.mkdir(parents=True)
        data = _data(fam)
        save_file({k: v.contiguous() for k, v in data.items()}, str(d / "data.safetensors"))
        with contextlib.redirect_stderr(io.StringIO()):
            _hf_model(fam).save_pretrained(str(d / "model"))
        out[fam] = {"model": str(d / "model"), "data": str(d / "data.safetensors")}
    return out


def per_product(fam: str, model_dir: str, data_file: str) -> dict:
    """The four products side by side (see module doc); one torch thread."""
    import warnings

    import torch
    from safetensors.torch import load_file
    from torch.func import functional_call, grad, jvp
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from gmcurv.graphcache import gradient_graph, graph_product
    from gmcurv.io.checkpoint import load_model
    from gmcurv.io.data import load_data
    from gmcurv.io.factories import load_loss
    from gmcurv.objective import Objective
    from gmcurv.operator import CurvatureOperator

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    lm = load_model(Path(model_dir), dtype=torch.float32, device=torch.device("cpu"))
    data = load_data(Path(data_file), None)
    obj = Objective.build(lm.model, load_loss(lm.loss), None, "eval", 0)
    op = CurvatureOperator(obj, data, 256, "hessian")
    op.prepare()
    (batch,) = list(op.batches())
    names, n = op.space.names, data.n
    model = lm.model
    params = [dict(model.named_parameters())[k] for k in names]
    inputs = load_file(data_file)
    if "labels" not in inputs:  # causal LM: the library shifts the labels itself
        inputs["labels"] = inputs["input_ids"]

    with (
        sdpa_kernel([SDPBackend.MATH]),
        torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t),
    ):
        hooked = gradient_graph(obj, batch, names, None)
    with sdpa_kernel([SDPBackend.MATH]):
        loss = model(**inputs).loss
        g = torch.autograd.grad(loss, params, create_graph=True)
    detached = {k: p.detach() for k, p in zip(names, params, strict=True)}

    def hf_loss(p):
        return functional_call(model, p, (), inputs).loss

    def as_flat(parts):
        return torch.cat([t.reshape(-1) for t in parts]).double()

    def gm_hooked(v):
        vs = op.space.unflatten(v.float())
        out = graph_product(hooked, names, vs, False)
        return op.space.flatten(out).div_(n).double()

    def plain_graph(v):
        vs = op.space.unflatten(v.float())
        return as_flat(torch.autograd.grad(g, params, [vs[k] for k in names], retain_graph=True))

    def plain_func(v):
        vs = op.space.unflatten(v.float())
        with sdpa_kernel([SDPBackend.MATH]):
            out = jvp(grad(hf_loss), (detached,), (vs,))[1]
        return as_flat([out[k] for k in names])

    runs = {
        "gmcurv": op.matvec,
        "gmcurv (hooked graph)": gm_hooked,
        "plain kept graph": plain_graph,
        "plain torch.func": plain_func,
    }
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(op.size, generator=gen, dtype=torch.float64)
    ref = plain_graph(v)
    agree = {k: float((f(v) - ref).norm() / ref.norm()) for k, f in runs.items()}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    wall: dict[str, list[float]] = {k: [] for k in runs}
    order = list(runs)
    rng = random.Random(0)
    for _ in range(ROUNDS):
        rng.shuffle(order)
        for k in order:
            c0, w0 = time.thread_time(), time.perf_counter()
            runs[k](v)
            cpu[k].append(time.thread_time() - c0)
            wall[k].append(time.perf_counter() - w0)
    base = statistics.median(cpu["plain kept graph"])
    return {
        "family": fam,
        "n_params": op.size,
        "loss_gmcurv": float(obj.per_example_loss(batch).mean()),
        "outputs_loss": float(loss),
        "rel_diff_vs_plain_graph": agree,
        "cpu_ms": {k: round(1e3 * statistics.median(x), 3) for k, x in cpu.items()},
        "wall_ms": {k: round(1e3 * statistics.median(x), 3) for k, x in wall.items()},
        "cpu_ms_min": {k: round(1e3 * min(x), 3) for k, x in cpu.items()},
        "cpu_ratio_vs_plain_graph": {
            k: round(statistics.median(x) / base, 3) for k, x in cpu.items()
        },
        "cpu_min_ratio_vs_plain_graph": {
            k: round(min(x) / min(cpu["plain kept graph"]), 3) for k, x in cpu.items()
        },
        "rounds": ROUNDS,
    }


THREADS = {  # name -> environment: one thread, the default (all cores), passive OpenMP waits
    "1": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    "default": {},
    "default, OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
}


def whole_command(entry: dict, tmp: Path, threads: str) -> dict:
    """``gmcurv spectrum MODEL DATA --json`` (default options) in a fresh process."""
    env = {**os.environ, "GMCURV_NO_CONFIG": "1", **THREADS[threads]}
    out = tmp / "spectrum.json"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "gmcurv",
            "spectrum",
            entry["model"],
            entry["data"],
            "--json",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    row = {
        "threads": threads,
        "exit": p.returncode,
        "wall": round(wall, 2),
        "cpu": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 2),
    }
    if p.returncode == 0:
        doc = json.loads(out.read_text())
        row["timings"] = {k: round(v, 2) for k, v in doc["timings"].items()}
        block = doc["results"]["hessian"]
        row["n_matvecs"] = block["n_matvecs"]
        row["trace"] = block["trace"]["value"]
        row["top_node"] = max(max(r) for r in block["quadrature"]["nodes"])
    else:
        row["stderr_tail"] = p.stderr[-800:]
    return row


def main() -> None:
    if "--markdown" in sys.argv:
        print(markdown(json.loads(OUT.read_text())))
        return
    if "--child" in sys.argv:
        fam, spec = sys.argv[sys.argv.index("--child") + 1 :][:2]
        e = json.loads(spec)
        print(json.dumps(per_product(fam, e["model"], e["data"])))
        return
    fams = [a for a in sys.argv[1:] if a in FAMILIES] or list(FAMILIES)
    results: dict = {"uptime_start": os.popen("uptime").read().strip(), "families": {}}
    with tempfile.TemporaryDirectory(prefix="gmcurv-spectrum-") as tmp:
        built = build(Path(tmp))
        for fam in fams:
            e = built[fam]
            p = subprocess.run(
                [sys.executable, __file__, "--child", fam, json.dumps(e)],
                capture_output=True,
                text=True,
            )
            lines = p.stdout.strip().splitlines()
            res = json.loads(lines[-1]) if lines else {"stderr": p.stderr[-2000:]}
            res["commands"] = [whole_command(e, Path(tmp), t) for t in THREADS]
            results["families"][fam] = res
            print(fam, json.dumps(res["cpu_ratio_vs_plain_graph"] if lines else res), flush=True)
    results["uptime_end"] = os.popen("uptime").read().strip()
    OUT.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results))


def markdown(results: dict) -> str:
    keys = ("gmcurv", "gmcurv (hooked graph)", "plain kept graph", "plain torch.func")
    lines = [
        f"uptime at start: `{results['uptime_start']}`; at end: `{results['uptime_end']}`",
        "",
        "Per product, 1 thread, thread-CPU ms: median (x plain kept graph) / minimum (x plain's "
        "minimum); relative difference of gmcurv's and torch.func's product from the plain one; "
        "gmcurv's mean loss / "
        "`outputs.loss`:",
        "",
        "| family | P | " + " | ".join(keys) + " | rel. diff gmcurv / torch.func | loss ratio |",
        "|---|---|" + "---|" * (len(keys) + 2),
    ]
    for fam, r in results["families"].items():
        cells = [
            f"{r['cpu_ms'][k]:.2f} ({r['cpu_ratio_vs_plain_graph'][k]:.2f}x) / "
            f"{r['cpu_ms_min'][k]:.2f} ({r['cpu_min_ratio_vs_plain_graph'][k]:.2f}x)"
            for k in keys
        ]
        diff = r["rel_diff_vs_plain_graph"]
        diff = f"{diff['gmcurv']:.1e} / {diff['plain torch.func']:.1e}"
        ratio = r["loss_gmcurv"] / r["outputs_loss"]
        lines.append(
            f"| {fam} | {r['n_params']} | " + " | ".join(cells) + f" | {diff} | {ratio:.6f} |"
        )
    lines += [
        "",
        "Whole command, `gmcurv spectrum M D --json` (3 probes x 50 steps, fresh process):",
        "",
        "| family | threads | exit | wall s | CPU s | products | startup | load | hessian "
        "| trace | top node |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for fam, r in results["families"].items():
        for c in r["commands"]:
            t = c.get("timings", {})
            lines.append(
                f"| {fam} | {c['threads']} | {c['exit']} | {c['wall']} | {c['cpu']} | "
                f"{c.get('n_matvecs', '')} | {t.get('startup', '')} | {t.get('load', '')} | "
                f"{t.get('hessian', '')} | {c.get('trace', '')} | {c.get('top_node', '')} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
