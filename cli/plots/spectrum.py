"""Plots of ``gmcurv spectrum``, ``eigen`` and ``trace``: spectral density (log scale, like
PyHessian's figure), top eigenvalues and per-layer trace bars.

Drawn from the report's results only, never from tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gmcurv.cli.plots import new_figure, save_figure

COLORS = {"fisher": "tab:blue", "ggn": "tab:orange", "hessian": "tab:green"}
NAMES = ("fisher", "ggn", "hessian")
LABELS = {"fisher": "Fisher", "ggn": "GGN", "hessian": "Hessian"}


def _eigen_bars(ax, results: dict[str, Any], with_errors: bool) -> None:
    """Top-k eigenvalues per curvature as grouped bars at integer positions i = 1..k."""
    present = [n for n in NAMES if (results.get(n) or {}).get("eigenvalues")]
    width = 0.8 / max(1, len(present))
    k = 0
    for j, name in enumerate(present):
        eigs = results[name]["eigenvalues"]
        k = max(k, len(eigs))
        xs = [i + 1 - 0.4 + width * (j + 0.5) for i in range(len(eigs))]
        ax.bar(
            xs,
            [e["value"] for e in eigs],
            width * 0.9,
            yerr=[e.get("residual") or 0.0 for e in eigs] if with_errors else None,
            capsize=4 if with_errors else 0,
            ecolor="black",
            color=COLORS[name],
            label=LABELS[name],
        )
    ax.set_xticks(range(1, k + 1))
    ax.set_xlabel("index i (λ₁ ≥ λ₂ ≥ …)")
    ax.set_ylabel("eigenvalue λᵢ")
    if present:
        ax.legend()  # names the curvature even when there is one
    ax.axhline(0, color="black", linewidth=0.5)


def plot_spectrum(results: dict[str, Any], path: Path) -> Path:
    """Smoothed eigenvalue density on a log scale (cut, not clamped, six decades below its
    peak), with the Lanczos quadrature nodes as a rug along the bottom."""
    import numpy as np

    fig, ax = new_figure()
    for name in ("ggn", "hessian"):
        block = results.get(name)
        if not block:
            continue
        grid = np.asarray(block["grid"], dtype=float)
        dens = np.asarray(block["density"], dtype=float)
        top = float(dens.max()) if dens.size else 1.0
        shown = np.where(dens >= top * 1e-6, dens, np.nan)  # below: a gap, not a floor
        sigma = block.get("sigma")
        extra = f", Gaussian σ={sigma:.2g}" if sigma else ""
        ax.semilogy(grid, shown, color=COLORS[name], label=f"{LABELS[name]} density{extra}")
        nodes = [x for row in block["quadrature"]["nodes"] for x in row]
        ax.plot(
            nodes,
            [0.03] * len(nodes),
            "|",
            color=COLORS[name],
            alpha=0.6,
            markersize=12,
            transform=ax.get_xaxis_transform(),
            label=f"{LABELS[name]} quadrature nodes (Ritz values)",
        )
        ax.set_ylim(bottom=top * 1e-6 / 3)
    ax.set_xlabel("eigenvalue λ")
    ax.set_ylabel("spectral density (log scale)")
    ax.set_title("eigenvalue spectral density (stochastic Lanczos quadrature)")
    ax.legend(loc="upper right", fontsize=9)
    return save_figure(fig, path)


def plot_eigenvalues(results: dict[str, Any], path: Path) -> Path:
    """Top-k eigenvalues per curvature as bars, Ritz residuals as error bars."""
    fig, ax = new_figure()
    _eigen_bars(ax, results, with_errors=True)
    ax.set_title("top eigenvalues (error bars: Ritz residual ‖Av − λv‖)")
    return save_figure(fig, path)


def plot_traces(results: dict[str, Any], path: Path) -> Path:
    """Per-layer traces of every curvature side by side (bars with ± 2 s.e.: the estimator's
    for stochastic traces, over examples for exact ones), and the top eigenvalues."""
    from gmcurv.cli.plots import two_se
    from gmcurv.cli.render import shorten_names

    fig, (ax, ax_eig) = new_figure(1, 2, figsize=(13, 4.8))
    present = [n for n in NAMES if results.get(n)]
    layers: list[str] = []
    for n in present:
        layers += [k for k in results[n].get("per_layer", {}) if k not in layers]
    width = 0.8 / max(1, len(present))
    for j, name in enumerate(present):
        per = results[name].get("per_layer", {})
        xs, ys, err = [], [], []
        for i, layer in enumerate(layers):
            t = per.get(layer, {}).get("trace")
            if t is None or t.get("value") is None:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(t["value"])
            err.append(two_se(t))
        total = results[name]["trace"]["value"]
        ax.bar(
            xs,
            ys,
            width * 0.9,
            yerr=err,
            capsize=3,
            color=COLORS[name],
            ecolor="black",
            label=f"{LABELS[name]} (total {total:.4g})",
        )
    names = shorten_names(layers, 18)
    ax.set_xticks(range(len(layers)))
    many = len(layers) > 6 or max((len(n) for n in names), default=0) > 10
    ax.set_xticklabels(names, rotation=30 if many else 0, ha="right" if many else "center")
    ax.set_xlabel("layer (parameter block)")
    ax.set_ylabel("trace of the layer's diagonal block")
    ax.set_title("per-layer traces (± 2 s.e.: estimator, or over examples when exact)")
    if present:
        ax.legend()
    ax.axhline(0, color="black", linewidth=0.5)
    _eigen_bars(ax_eig, results, with_errors=False)
    ax_eig.set_title("top eigenvalues")
    return save_figure(fig, path)
