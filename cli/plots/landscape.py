"""Plots of ``gmcurv landscape``: a line (1-D), a contour map or a 3-D surface (2-D), annotated
with the centre loss and the sharpness along each direction.

Drawn from the report's ``landscape`` block only, never from tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator

from gmcurv.cli.plots import new_figure, pyplot, save_figure

# the checkpoints of --to A --to B: distinct colours and shapes (the centre is a black dot)
CHECKPOINT_STYLES = (("tab:red", "s"), ("tab:orange", "D"))


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.4g}"


def annotation(block: dict[str, Any]) -> str:
    """The text box: centre loss, then per direction its curvature (and eigenvalue)."""
    center = block["center"]
    lines = [f"centre loss {_fmt(center['loss']['value'])}"]
    if center.get("accuracy"):
        lines[0] += f", acc {_fmt(center['accuracy']['value'])}"
    for name, d in block["directions"].items():
        s = block["sharpness"][name]
        text = f"{name}: curvature {_fmt(s['value'])} (‖{name}‖={_fmt(d['norm'])})"
        lam = d.get("eigenvalue")
        if lam:
            text += f", λ={_fmt(lam['value'])}"
        lines.append(text)
    return "\n".join(lines)


def _labels(block: dict[str, Any]) -> tuple[str, str]:
    kind = block["directions_kind"]
    if kind == "checkpoint":
        names = [Path(d["checkpoint"]).name for d in block["directions"].values()]
        return f"α (→ {names[0]})", (f"β (→ {names[1]})" if len(names) > 1 else "β")
    return (f"α (d1, {kind})", f"β (d2, {kind})")


def _box(ax, text: str) -> None:
    ax.text(
        0.02,
        0.98,
        text,
        transform=ax.transAxes,
        va="top",
        ha="left",
        fontsize=8,
        bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85, "edgecolor": "0.7"},
    )


def plot_landscape(block: dict[str, Any], path: Path, surface: bool = False) -> Path:
    """1-D: loss against α with the fitted parabola at the centre; 2-D: filled contours
    (or a 3-D surface) with the centre and any checkpoints marked."""
    grid = block["grid"]
    alphas = np.asarray(grid["alphas"], dtype=float)
    loss = np.asarray(grid["loss"], dtype=float)
    center = block["center"]["loss"]["value"]
    xlabel, ylabel = _labels(block)
    checkpoints = [d for d in block["directions"].values() if d.get("checkpoint")]
    if block["dimensions"] == 1:
        fig, ax = new_figure()
        ax.plot(alphas, loss, color="tab:blue", lw=1.5, label="loss")
        fit = block["sharpness"]["d1"]["value"]
        slope = block["directions"]["d1"].get("slope") or 0.0
        half = max(4 * block["spacing"], (alphas[-1] - alphas[0]) / 8)
        t = np.linspace(-half, half, 101)
        ax.plot(t, center + slope * t + 0.5 * fit * t**2, "--", color="tab:orange", lw=1,
                label="quadratic fit at the centre")  # fmt: skip
        ax.plot([0.0], [center], "o", color="black", label="centre (MODEL)", zorder=5)
        for i, d in enumerate(checkpoints):
            color, marker = CHECKPOINT_STYLES[i % len(CHECKPOINT_STYLES)]
            ax.plot([1.0], [d["checkpoint_loss"]], marker, color=color, markersize=9,
                    markeredgecolor="black", clip_on=False, zorder=6,
                    label=Path(d["checkpoint"]).name)  # fmt: skip
        span = loss.max() - loss.min()
        ax.set_ylim(loss.min() - 0.05 * span, loss.max() + 0.05 * span + 1e-12)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss")
        _outside(fig, ax, annotation(block))
        ax.set_title("loss along a line through the weights")
        return save_figure(fig, path)
    betas = np.asarray(grid["betas"], dtype=float)
    B, A = np.meshgrid(betas, alphas)  # loss[i, j] is (alphas[i], betas[j])
    marks = [(0.0, 0.0, "centre (MODEL)", "black", "o")]
    for i, d in enumerate(checkpoints):
        color, marker = CHECKPOINT_STYLES[i % len(CHECKPOINT_STYLES)]
        marks.append((1.0 if i == 0 else 0.0, 1.0 if i == 1 else 0.0,
                      Path(d["checkpoint"]).name, color, marker))  # fmt: skip
    if surface:
        plt = pyplot()  # headless backend

        fig = plt.figure(figsize=(7.5, 6), layout="constrained")
        ax = fig.add_subplot(projection="3d")
        surf = ax.plot_surface(A, B, loss, cmap="viridis", linewidth=0, antialiased=True)
        fig.colorbar(surf, ax=ax, shrink=0.6, pad=0.1, label="loss", ticks=MaxNLocator(6))
        ax.scatter([0.0], [0.0], [center], color="black", s=20)  # type: ignore[arg-type]
        ax.set_xlabel(xlabel, labelpad=8)
        ax.set_ylabel(ylabel, labelpad=8)
        ax.zaxis.set_major_locator(MaxNLocator(5))
        ax.set_zlabel("loss", labelpad=14)
        ax.text2D(0.0, 1.0, annotation(block), transform=ax.transAxes, fontsize=8, va="top")
        return save_figure(fig, path)
    fig, ax = new_figure(figsize=(6.5, 6.5))
    if loss.max() > loss.min():
        levels = MaxNLocator(nbins=24).tick_values(float(loss.min()), float(loss.max()))
    else:
        levels = 10
    filled = ax.contourf(A, B, loss, levels=levels, cmap="viridis")
    ax.contour(A, B, loss, levels=levels, colors="white", linewidths=0.4, alpha=0.6)
    fig.colorbar(filled, ax=ax, label="loss", ticks=MaxNLocator(7))
    for x, y, label, color, marker in marks:
        ax.plot([x], [y], marker, color=color, markeredgecolor="white", markersize=10,
                clip_on=False, zorder=6, label=label)  # fmt: skip
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_aspect("equal", adjustable="box")
    _outside(fig, ax, annotation(block))
    ax.set_title("loss landscape")
    return save_figure(fig, path)


def _outside(fig, ax, text: str) -> None:
    """Legend and the numbers (as its title) in one box below the axes, where they hide no
    data or marker and the layout makes room for them."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="outside lower center",
        ncols=min(3, max(1, len(labels))),
        fontsize=8,
        title=text,
        title_fontsize=8,
        alignment="left",
    )
