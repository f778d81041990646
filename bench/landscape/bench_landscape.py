"""Loss-landscape benchmark: a 41 x 41 grid with gmcurv against ``loss-landscapes`` 3.0.6.

Workloads: the bundled sample ``digits_mlp`` (64-128-64-10 ReLU, N = 1,024) and W1 of
``bench/workloads.py`` (784-256-256-10 ReLU MLP, N = 512, synthetic data). float32, CPU.

Same run, same directions, same grid:

- **gmcurv**: `gmcurv.landscape.landscape` on filter-normalised random directions (seed 0,
  biases fixed), ``α, β ∈ linspace(-1, 1, 41)``, the data in one batch (as the peer's metric
  takes it), the default chunking (vmapped points per forward from the memory budget).
  The timing includes the centre and the quadratic-fit stencil (11 more points).
- **loss-landscapes `planar_interpolation`** with the *same* directions: start model
  ``θ0 - d1 - d2`` and end models ``start + 41 h d1``, ``start + 41 h d2`` (``h = 2/40``), so
  its steps are ``h d1`` and ``h d2``. Its serpentine walk evaluates even rows at
  ``β = -1 + (j+1) h`` and odd rows at ``β = -1 + j h``: the odd rows are exactly our grid and
  are compared point by point; the centre ``(0, 0)`` is its element ``[20][19]``.
- **loss-landscapes `random_plane`** (its own filter-normalised directions, 41 steps): the
  peer's native API, timing only (it costs the same per point).

Centre check: our centre value against ``loss_landscapes.point`` at the unmodified model
and against a plain ``cross_entropy`` of the model's outputs.

Run: ``flock /tmp/gmcurv-bench.lock python bench/landscape/bench_landscape.py``; writes
``bench/landscape/results.json``. Peers: ``bench/requirements-landscape.txt``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
STEPS = 41


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def workload(name: str, workdir: Path):
    """(model, x, y, data path) in float32, eval mode."""
    if name == "sample":
        from gmcurv.io.checkpoint import load_model
        from gmcurv.io.data import load_data
        from gmcurv.io.samples import sample_data, sample_model

        model = load_model(sample_model()).model.eval()
        data = load_data(sample_data())
        batch = next(data.batches(data.n))
        x, y = batch.inputs, batch.targets
    else:
        from workloads import build

        w = build(name)
        model, x, y = w.model, w.x, w.y
    path = workdir / f"{name}.safetensors"
    save_file({"inputs": x.contiguous(), "targets": y.contiguous()}, str(path))
    return model, x, y, path


def set_params(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> torch.nn.Module:
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            p.copy_(values[name])
    return out


def run(name: str, repeats: int, workdir: Path) -> dict:
    import loss_landscapes
    import loss_landscapes.metrics

    from gmcurv.io.data import load_data
    from gmcurv.landscape import grid_axis, landscape, random_directions
    from gmcurv.objective import Objective

    model, x, y, path = workload(name, workdir)
    n = int(x.shape[0])
    objective = Objective.build(model, "cross_entropy")
    data = load_data(path)
    dirs = random_directions(objective.params, 2, seed=0)
    axis = grid_axis(-1.0, 1.0, STEPS)
    h = 2.0 / (STEPS - 1)

    metric = loss_landscapes.metrics.Loss(F.cross_entropy, x, y)
    theta = {k: p.detach().clone() for k, p in model.named_parameters()}
    zero = {k: torch.zeros_like(v) for k, v in theta.items()}
    d1 = {**zero, **dirs[0]}
    d2 = {**zero, **dirs[1]}
    start = {k: theta[k] - d1[k] - d2[k] for k in theta}
    end1 = {k: start[k] + STEPS * h * d1[k] for k in theta}
    end2 = {k: start[k] + STEPS * h * d2[k] for k in theta}
    m_start, m_end1, m_end2 = (set_params(model, v) for v in (start, end1, end2))

    # interleaved repeats (gmcurv, planar, random_plane, gmcurv, ...): the minimum of each
    # is the least disturbed by other jobs on a shared machine
    ours_times, planar_times, plane_times = [], [], []
    res = planar = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = landscape(objective, data, dirs, axis, axis.clone(), batch_size=n)
        ours_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        planar = loss_landscapes.planar_interpolation(
            m_start, m_end1, m_end2, metric, steps=STEPS, deepcopy_model=True
        )
        planar_times.append(time.perf_counter() - t0)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        loss_landscapes.random_plane(
            model, metric, distance=1, steps=STEPS, normalization="filter", deepcopy_model=True
        )
        plane_times.append(time.perf_counter() - t0)
    assert res is not None and planar is not None
    ours = res.loss.numpy()

    # ------------------------------------------------------------------------ agreement
    with torch.no_grad():
        plain = float(F.cross_entropy(model(x), y))
    peer_point = float(loss_landscapes.point(copy.deepcopy(model), metric))
    odd = np.asarray(planar)[1::2]  # rows i = 1, 3, ...: β_j = -1 + j h, our grid
    diff_odd = np.abs(odd - ours[1::2])
    center_ours = float(res.center_loss)
    center_grid = float(ours[STEPS // 2, STEPS // 2])
    center_peer_planar = float(np.asarray(planar)[STEPS // 2][STEPS // 2 - 1])
    best = min(ours_times)
    return {
        "workload": name,
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_examples": n,
        "grid": [STEPS, STEPS],
        "points_gmcurv": res.n_points,
        "chunk": res.chunk,
        "vmapped": res.vmapped,
        "seconds": {
            "gmcurv": ours_times,
            "loss_landscapes_planar_interpolation": planar_times,
            "loss_landscapes_random_plane": plane_times,
        },
        "best_seconds": {
            "gmcurv": best,
            "loss_landscapes_planar_interpolation": min(planar_times),
            "loss_landscapes_random_plane": min(plane_times),
        },
        "speedup_vs": {
            "planar_interpolation": min(planar_times) / best,
            "random_plane": min(plane_times) / best,
        },
        "center": {
            "gmcurv_center": center_ours,
            "gmcurv_grid_center": center_grid,
            "plain_cross_entropy": plain,
            "loss_landscapes_point": peer_point,
            "loss_landscapes_planar_center": center_peer_planar,
            "abs_diff_gmcurv_vs_point": abs(center_ours - peer_point),
            "abs_diff_gmcurv_vs_planar_center": abs(center_ours - center_peer_planar),
        },
        "shared_grid_points": int(diff_odd.size),
        "max_abs_diff_shared_points": float(diff_odd.max()),
        "max_rel_diff_shared_points": float((diff_odd / np.abs(ours[1::2])).max()),
        "load_avg_after": load_avg(),
    }


def markdown(doc: dict) -> str:
    rows = [
        "| workload | threads | params | N | gmcurv (s) | planar_interpolation (s) | "
        "random_plane (s) | speed-up vs planar / random_plane | centre: gmcurv vs peer point |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in doc["results"]:
        b, c = r["best_seconds"], r["center"]
        rows.append(
            f"| {r['workload']} | {r['threads']} | {r['n_params']:,} | {r['n_examples']:,} | "
            f"{b['gmcurv']:.2f} | "
            f"{b['loss_landscapes_planar_interpolation']:.2f} | "
            f"{b['loss_landscapes_random_plane']:.2f} | "
            f"{r['speedup_vs']['planar_interpolation']:.2f}x / "
            f"{r['speedup_vs']['random_plane']:.2f}x | "
            f"{c['gmcurv_center']:.7f} vs {c['loss_landscapes_point']:.7f} "
            f"(diff {c['abs_diff_gmcurv_vs_point']:.1e}) |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="sample,W1")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--threads",
        default="1,2",
        help="torch thread counts to run, each for both libraries (comma-separated)",
    )
    ap.add_argument("--markdown", action="store_true", help="print the table of results.json")
    args = ap.parse_args()
    out = HERE / "results.json"
    if args.markdown:
        print(markdown(json.loads(out.read_text())))
        return
    import loss_landscapes  # noqa: F401  (fail early if the peer is missing)

    machine = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loss_landscapes": "3.0.6",
        "cpus": os.cpu_count(),
        "load_avg_before": load_avg(),
    }
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for threads, name in itertools.product(
            [int(t) for t in args.threads.split(",")], args.workloads.split(",")
        ):
            torch.set_num_threads(threads)
            print(f"[{name}, {threads} threads] ...", file=sys.stderr, flush=True)
            results.append({"threads": threads, **run(name, args.repeats, Path(tmp))})
            r = results[-1]
            print(
                f"[{name}, {threads} threads] gmcurv {r['best_seconds']['gmcurv']:.2f}s, planar "
                f"{r['best_seconds']['loss_landscapes_planar_interpolation']:.2f}s, random_plane "
                f"{r['best_seconds']['loss_landscapes_random_plane']:.2f}s",
                file=sys.stderr,
                flush=True,
            )
    machine["load_avg_after"] = load_avg()
    doc = {"benchmark": "landscape 41x41", "machine": machine, "results": results}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(markdown(doc))


if __name__ == "__main__":
    main()
