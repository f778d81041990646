"""Pruning benchmark: OBS from decomposed gradients (Woodbury) against magnitude and OBD.

Parts (``--part``, default all):

- ``quality``: loss and accuracy on the 540 held-out digits after removing 30/50/70/90 % of
  the prunable weights of (a) the bundled sample ``digits_mlp`` (64-128-64-10 ReLU) and (b)
  ``digits_wide`` (64-256-256-128-10 ReLU, ~116k weights) trained here on the sample's 1,024
  training images (not shipped). Criteria: magnitude, OBD, OBS (masking only), OBS + one-shot
  exact update, OBS + iterative update (default rounds; block-diagonal and full Fisher).
- ``scaling``: time and peak extra memory of the damped inverse-Fisher diagonal and the OBS
  update of one linear layer as N and the layer size grow (synthetic factors, each config in
  its own process), against an explicit dense ``P x P`` inverse where that fits.
- ``cli``: wall time of ``gmcurv saliency`` and ``gmcurv saliency --prune 0.5`` on the sample.

Run: ``flock /tmp/gmcurv-bench.lock python bench/saliency/bench_saliency.py``; writes
``bench/saliency/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
LEVELS = [0.3, 0.5, 0.7, 0.9]


# ------------------------------------------------------------------------------ utilities
def rss_bytes(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    """Reset VmHWM (Linux >= 4.0) so the next reading is the peak from now on."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# -------------------------------------------------------------------------------- quality
def train_wide(workdir: Path) -> Path:
    """A wider/deeper digits MLP (full-batch Adam), saved with gmcurv metadata."""
    from gmcurv.io.checkpoint import gmcurv_metadata, save_checkpoint
    from gmcurv.io.data import load_data
    from gmcurv.io.samples import sample_data

    torch.manual_seed(0)
    data = load_data(sample_data())
    batch = next(data.batches(data.n))
    x, y = batch.inputs, batch.targets
    sizes = [64, 256, 256, 128, 10]
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-3)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    path = workdir / "digits_wide.safetensors"
    state = {f"net.{k}": v for k, v in model.state_dict().items()}
    save_checkpoint(path, state, gmcurv_metadata("mlp:relu", "cross_entropy"))
    return path


def point(ev) -> dict:
    return {"loss": ev.loss.value, "accuracy": ev.accuracy.value}


def quality_one(name: str, path: Path, n_fisher: int, rounds: int) -> dict:
    from gmcurv.io.checkpoint import load_model
    from gmcurv.io.data import load_data
    from gmcurv.io.samples import sample_data
    from gmcurv.objective import Objective
    from gmcurv.saliency import prune_model, saliency_analysis

    loaded = load_model(path)
    obj = Objective.build(loaded.model, loaded.loss)
    data = load_data(sample_data(), samples=n_fisher)
    test = load_data(sample_data().parent / "test")
    t0 = time.perf_counter()
    a = saliency_analysis(obj, data, eval_data=test, levels=LEVELS)
    t_analysis = time.perf_counter() - t0
    out: dict = {
        "model": name,
        "n_params": obj.space.size,
        "n_prunable": a.n_prunable,
        "n_fisher": data.n,
        "n_eval": test.n,
        "fisher": a.fisher,
        "damping": a.damping,
        "eps": a.eps,
        "baseline": point(a.baseline),
        "analysis_seconds": t_analysis,
        "curves": {},
        "seconds": {},
    }
    labels = {
        "magnitude": "magnitude",
        "obd": "OBD",
        "obs": "OBS",
        "obs+update": "OBS+update (one shot)",
    }
    for key, label in labels.items():
        out["curves"][label] = {
            f"{p.fraction:g}": {"loss": p.loss.value, "accuracy": p.accuracy.value}
            for p in a.sweep[key]
        }
    variants = {
        f"OBS+update ({rounds} rounds, block)": {"structure": "block"},
        f"OBS+update ({rounds} rounds, full F)": {"structure": "global"},
        f"magnitude+update ({rounds} rounds)": {"criterion": "magnitude", "update": True},
    }
    for label, kw in variants.items():
        curve, secs = {}, {}
        for f in LEVELS:
            t0 = time.perf_counter()
            r = prune_model(obj, data, f, eval_data=test, rounds=rounds, **kw)
            secs[f"{f:g}"] = time.perf_counter() - t0
            curve[f"{f:g}"] = point(r.after)
            print(f"  {name} {label} {f:g}: acc {r.after.accuracy.value:.4f} "
                  f"({secs[f'{f:g}']:.1f}s)", flush=True)  # fmt: skip
        out["curves"][label] = curve
        out["seconds"][label] = secs
    return out


def quality(rounds: int) -> list[dict]:
    from gmcurv.io.samples import sample_model

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        wide = train_wide(Path(tmp))
        for name, path, n in (
            ("digits_mlp (sample)", sample_model(), 1024),
            ("digits_wide (trained here)", wide, 512),
        ):
            print(f"quality: {name}", flush=True)
            results.append(quality_one(name, path, n, rounds))
    return results


# -------------------------------------------------------------------------------- scaling
def scaling_one(n: int, d: int, tokens: int, dense: bool) -> dict:
    """One linear layer d -> d with bias, synthetic factors; run in a fresh process."""
    from gmcurv.capture import Block, DecomposedGradients
    from gmcurv.factors import LinearFactors
    from gmcurv.woodbury import DampedFisher, default_eps

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(n, 1, tokens, d, generator=g) / d
    x = torch.randn(n, tokens, d, generator=g)
    src = LinearFactors(("w", "b"), ((d, d), (d,)), delta, x, True, True)
    dg = DecomposedGradients((Block("fc", "linear", src),), "empirical", torch.zeros(n))
    eps = default_eps(dg, 1e-2)
    weights = {"w": torch.randn(d, d, generator=g), "b": torch.randn(d, generator=g)}
    removed = {"w": torch.rand(d, d, generator=g) < 0.5}
    out = {"n": n, "d": d, "tokens": tokens, "P": d * d + d, "loadavg": os.getloadavg()[0]}
    base = rss_bytes()
    reset_peak()
    t0 = time.perf_counter()
    D = DampedFisher(dg, eps, "block")
    diag = D.inverse_diagonal()
    out["inverse_diag_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    D.without(removed).remove(weights)
    out["update_seconds"] = time.perf_counter() - t0
    out["peak_extra_bytes"] = rss_bytes("VmHWM") - base
    out["kernel_bytes"] = 8 * n * n
    for _ in range(2):  # shared machine: keep the best of three timings
        t0 = time.perf_counter()
        D = DampedFisher(dg, eps, "block")
        diag = D.inverse_diagonal()
        t1 = time.perf_counter()
        D.without(removed).remove(weights)
        t2 = time.perf_counter()
        out["inverse_diag_seconds"] = min(out["inverse_diag_seconds"], t1 - t0)
        out["update_seconds"] = min(out["update_seconds"], t2 - t1)
    if dense:
        del D
        J = torch.einsum("nto,nti->noi", delta[:, 0].double(), x.double()).reshape(n, -1)
        J = torch.cat([J, delta[:, 0].double().sum(1)], 1)  # bias columns
        base = rss_bytes()
        reset_peak()
        t0 = time.perf_counter()
        H = J.T @ J / n + eps * torch.eye(J.shape[1], dtype=torch.float64)
        Hi = torch.linalg.inv(H)
        ref = torch.diagonal(Hi)
        out["dense_seconds"] = time.perf_counter() - t0
        out["dense_peak_extra_bytes"] = rss_bytes("VmHWM") - base
        got = torch.cat([diag["w"].reshape(-1), diag["b"]])
        out["dense_max_rel_err"] = float(((got - ref).abs() / ref).max())
        del Hi, H
    return out


def scaling() -> list[dict]:
    configs = [(n, 256, 1, False) for n in (256, 512, 1024, 2048)]
    configs += [(1024, d, 1, d <= 96) for d in (64, 96, 128, 512)]
    configs += [(256, 64, 1, True), (256, 128, 8, False), (512, 128, 8, False)]
    results = []
    for n, d, t, dense in configs:
        cmd = [sys.executable, __file__, "--one-scaling", str(n), str(d), str(t), str(int(dense))]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"scaling: {row}", flush=True)
        results.append(row)
    return results


# ------------------------------------------------------------------------------------ cli
def cli_timing() -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, args in (
            ("gmcurv saliency", ["saliency", "-q"]),
            ("gmcurv saliency --prune 0.5", ["saliency", "--prune", "0.5", "-q"]),
            ("gmcurv info (startup reference)", ["info", "-q"]),
        ):
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "gmcurv", *args],
                cwd=tmp,
                check=True,
                capture_output=True,
                env={**os.environ, "GMCURV_NO_CONFIG": "1"},
            )
            out[label] = time.perf_counter() - t0
            print(f"cli: {label}: {out[label]:.2f}s", flush=True)
        out["loadavg"] = os.getloadavg()[0]
    return out


# ------------------------------------------------------------------------------- markdown
def markdown(doc: dict) -> str:
    """The tables of RESULTS.md from results.json."""
    lines = []
    q = doc.get("quality")
    if q:
        for m in q["models"]:
            base = m["baseline"]
            lines += [
                f"**{m['model']}**: {m['n_params']:,} parameters ({m['n_prunable']:,} prunable "
                f"weights), Fisher on {m['n_fisher']:,} training images ({m['fisher']}, eps "
                f"{m['eps']:.3g} = {m['damping']:g} x tr(F)/P), evaluated on {m['n_eval']} "
                f"held-out images; unpruned {100 * base['accuracy']:.1f} % / loss "
                f"{base['loss']:.3f}.",
                "",
                "| criterion | " + " | ".join(f"{100 * f:g} %" for f in q["levels"]) + " |",
                "|---|" + "---:|" * len(q["levels"]),
            ]
            for label, curve in m["curves"].items():
                cells = [
                    f"{100 * curve[f'{f:g}']['accuracy']:.1f} % / {curve[f'{f:g}']['loss']:.3f}"
                    for f in q["levels"]
                ]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            secs = m.get("seconds", {})
            if secs:
                timing = "; ".join(
                    f"{k}: " + ", ".join(f"{float(v):.1f}" for v in s.values())
                    for k, s in secs.items()
                )
                lines += ["", f"Seconds per level (30/50/70/90 %): {timing}; the analysis "
                          f"(all one-shot curves): {m['analysis_seconds']:.1f} s.", ""]  # fmt: skip
    sc = doc.get("scaling")
    if sc:
        lines += [
            "| N | layer (I=O) | tokens | P | inverse diagonal (s) | OBS update, 50 % (s) | "
            "peak extra memory | N² kernel | dense P x P inverse (s / memory) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sc:
            dense = (
                f"{r['dense_seconds']:.1f} s / {r['dense_peak_extra_bytes'] / 1e6:.0f} MB"
                if "dense_seconds" in r
                else "—"
            )
            lines.append(
                f"| {r['n']} | {r['d']} | {r['tokens']} | {r['P']:,} | "
                f"{r['inverse_diag_seconds']:.2f} | {r['update_seconds']:.2f} | "
                f"{r['peak_extra_bytes'] / 1e6:.0f} MB | {r['kernel_bytes'] / 1e6:.1f} MB | "
                f"{dense} |"
            )
        lines.append("")
    cli = doc.get("cli_seconds")
    if cli:
        lines += ["| command (bundled sample) | wall time |", "|---|---:|"]
        lines += [f"| `{k}` | {v:.1f} s |" for k, v in cli.items() if k != "loadavg"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["all", "quality", "scaling", "cli"], default="all")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--out", type=Path, default=HERE / "results.json")
    ap.add_argument("--one-scaling", nargs=4, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--markdown", action="store_true", help="print RESULTS.md tables and exit")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.out.read_text())))
        return
    if args.one_scaling:
        n, d, t, dense = args.one_scaling
        print(json.dumps(scaling_one(n, d, t, bool(dense))))
        return
    from gmcurv import __version__
    from gmcurv.saliency import DEFAULT_ROUNDS

    torch.set_num_threads(2)
    rounds = args.rounds or DEFAULT_ROUNDS
    doc = json.loads(args.out.read_text()) if args.out.is_file() else {}
    doc["meta"] = {
        "gmcurv_version": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": os.getloadavg()[0],
    }
    if args.part in ("all", "quality"):
        doc["quality"] = {"rounds": rounds, "levels": LEVELS, "models": quality(rounds)}
    if args.part in ("all", "scaling"):
        doc["scaling"] = scaling()
    if args.part in ("all", "cli"):
        doc["cli_seconds"] = cli_timing()
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
