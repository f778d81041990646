"""Plots of ``gmcurv lora``: singular values of each update and, with curvature, the loss
change the quadratic model predicts against the one measured when merged.

Drawn from the report's results only, never from tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gmcurv.cli.plots import new_figure, readable_log_axis, save_figure


def plot_lora(results: dict[str, Any], path: Path) -> Path:
    """Left: singular values per layer (log scale), one line per adapted layer. Right (when
    curvature was computed): ΔL(α) predicted by the Hessian and Fisher quadratic models and
    measured (± 2 s.e. over examples), per adapter."""
    adapters = results.get("adapters", {})
    curved = {n: a["curvature"] for n, a in adapters.items() if "curvature" in a}
    panels = 2 if curved else 1
    fig, axes = new_figure(1, panels, figsize=(6.5 * panels, 4.5))
    axes = list(axes) if panels > 1 else [axes]
    ax = axes[0]
    markers = "osd^v<>p*h"
    several = len(adapters) > 1
    for i, (name, a) in enumerate(adapters.items()):  # colour: adapter; marker: layer
        for j, (module, f) in enumerate(a["layers"].items()):
            sv = [e["value"] for e in f["singular_values"]]
            positive = [v for v in sv if v and v > 0]
            if not positive:
                continue
            ax.plot(
                range(1, len(positive) + 1), positive, marker=markers[j % len(markers)],
                color=f"C{i % 10}" if several else f"C{j % 10}", linewidth=1,
                label=f"{name}: {module}" if several else module,
            )  # fmt: skip
    ax.set_yscale("log")
    readable_log_axis(ax)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("index k")
    ax.set_ylabel("singular value σₖ(s·B·A)")
    ax.set_title("singular values of each update")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    if curved:
        ax = axes[1]
        for i, (name, c) in enumerate(curved.items()):
            color = f"C{i}"
            pts = c["points"]
            xs = [p["scale"] for p in pts]
            order = sorted(range(len(xs)), key=xs.__getitem__)
            xs = [xs[j] for j in order]

            meas = [pts[j]["measured"]["value"] for j in order]
            err = [2 * (pts[j]["measured"].get("data_stderr") or 0.0) for j in order]
            ax.errorbar(
                xs, meas, yerr=err, color=color, marker="o", linestyle="none",
                label=f"{name}: measured (± 2 s.e.)", capsize=3,
            )  # fmt: skip
            g, h, f = (c[k]["value"] for k in ("first_order", "hessian_qf", "fisher_qf"))
            lo, hi = min(0.0, *xs), max(0.0, *xs)
            grid = [lo + (hi - lo) * k / 100 for k in range(101)]
            ax.plot(grid, [a * g + 0.5 * a * a * h for a in grid], color=color, linestyle="--",
                    label=f"{name}: αgᵀdθ + ½α²dθᵀH dθ")  # fmt: skip
            ax.plot(grid, [a * g + 0.5 * a * a * f for a in grid], color=color, linestyle=":",
                    label=f"{name}: αgᵀdθ + ½α²dθᵀF dθ")  # fmt: skip
        ax.axhline(0.0, color="0.7", linewidth=0.8)
        ax.set_xlabel("merge scale α")
        ax.set_ylabel("ΔL = L(θ + α dθ) − L(θ)")
        ax.set_title("loss change: quadratic model vs measured")
        ax.legend(fontsize="small")
    return save_figure(fig, path)
