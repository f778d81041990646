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


def plot_spectrum(results: dict[str, Any], path: Path) -> Path:
    """Smoothed eigenvalue density on a log scale, with the quadrature nodes as ticks."""
    fig, ax = new_figure()
    for name in ("ggn", "hessian"):
        block = results.get(name)
        if not block:
            continue
        grid, dens = block["grid"], block["density"]
        top = max(dens) if dens else 1.0
        floor = top * 1e-8  # the log axis needs a floor; PyHessian's figure does the same
        ax.semilogy(grid, [max(d, floor) for d in dens], color=COLORS[name], label=LABELS[name])
        nodes = [x for row in block["quadrature"]["nodes"] for x in row]
        ax.plot(nodes, [floor] * len(nodes), "|", color=COLORS[name], alpha=0.5, markersize=10)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)")
    ax.set_title("eigenvalue spectral density")
    ax.legend(loc="upper right")
    return save_figure(fig, path)


def plot_eigenvalues(results: dict[str, Any], path: Path) -> Path:
    """Top-k eigenvalues per curvature as bars, residuals as error bars."""
    fig, ax = new_figure()
    present = [n for n in NAMES if results.get(n, {}).get("eigenvalues")]
    width = 0.8 / max(1, len(present))
    for j, name in enumerate(present):
        eigs = results[name]["eigenvalues"]
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(eigs))]
        ax.bar(
            xs,
            [e["value"] for e in eigs],
            width * 0.9,
            yerr=[e.get("residual") or 0.0 for e in eigs],
            color=COLORS[name],
            label=LABELS[name],
        )
    ax.set_xlabel("eigenvalue index (descending)")
    ax.set_ylabel("eigenvalue")
    ax.set_title("top eigenvalues")
    if present:
        k = max(len(results[n]["eigenvalues"]) for n in present)
        ax.set_xticks(range(k))
        ax.legend()
    ax.axhline(0, color="black", linewidth=0.5)
    return save_figure(fig, path)


def plot_traces(results: dict[str, Any], path: Path) -> Path:
    """Per-layer traces of every curvature side by side (bars with ±2 stderr), and the top
    eigenvalues."""
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
            err.append(2 * (t.get("stderr") or 0.0))
        total = results[name]["trace"]["value"]
        ax.bar(
            xs,
            ys,
            width * 0.9,
            yerr=err,
            color=COLORS[name],
            label=f"{LABELS[name]} (tr {total:.4g})",
        )
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("trace of the layer's diagonal block")
    ax.set_title("per-layer traces (±2 s.e.)")
    if present:
        ax.legend()
    ax.axhline(0, color="black", linewidth=0.5)
    width = 0.8 / max(1, len(present))
    for j, name in enumerate(present):
        eigs = results[name].get("eigenvalues") or []
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(eigs))]
        ax_eig.bar(
            xs, [e["value"] for e in eigs], width * 0.9, color=COLORS[name], label=LABELS[name]
        )
    ax_eig.set_xlabel("eigenvalue index (descending)")
    ax_eig.set_title("top eigenvalues")
    ax_eig.axhline(0, color="black", linewidth=0.5)
    return save_figure(fig, path)
