"""Plot of a checkpoint series (``gmcurv trace CKPT... DATA --plot``): λ_max, traces and the
loss against the training step (or the checkpoint's position when steps are unknown).

Drawn from the report's ``results.series`` block only, never from tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gmcurv.cli.plots import new_figure, save_figure, two_se
from gmcurv.cli.plots.spectrum import COLORS, LABELS, NAMES


def plot_series(series: dict[str, Any], path: Path) -> Path:
    """Three panels sharing the x axis: λ_max, trace (± 2 s.e.) and mean loss (± 2 s.e.)."""
    rows = series["checkpoints"]
    by_step = series["x"] == "step"
    xs = [r["step"] if by_step else r["index"] for r in rows]
    fig, (ax_eig, ax_tr, ax_loss) = new_figure(1, 3, figsize=(14, 4.2))
    for name in NAMES:
        blocks = [r["results"].get(name) for r in rows]
        if not any(blocks):
            continue
        color, label = COLORS[name], LABELS[name]
        pts = [(x, b["eigenvalues"][0]["value"]) for x, b in zip(xs, blocks, strict=True)
               if b and b.get("eigenvalues")]  # fmt: skip
        if pts:
            ax_eig.plot(*zip(*pts, strict=True), "o-", color=color, label=label)
        tr = [(x, b["trace"]) for x, b in zip(xs, blocks, strict=True) if b]
        ax_tr.errorbar(
            [x for x, _ in tr],
            [t["value"] for _, t in tr],
            yerr=[two_se(t) for _, t in tr],
            fmt="o-",
            color=color,
            capsize=3,
            label=label,
        )
    losses = [(x, r["results"]["loss"]) for x, r in zip(xs, rows, strict=True)
              if r["results"].get("loss")]  # fmt: skip
    if losses:
        ax_loss.errorbar(
            [x for x, _ in losses],
            [e["value"] for _, e in losses],
            yerr=[two_se(e) for _, e in losses],
            fmt="o-",
            color="black",
            capsize=3,
            label="mean loss",
        )
    xlabel = "training step" if by_step else "checkpoint (order given)"
    titles = (
        "sharpness λ_max",
        "trace (± 2 s.e. where not exact)",
        "mean loss on DATA (± 2 s.e. over examples)",
    )
    ylabels = ("largest eigenvalue λ_max", "trace", "loss")
    for ax, title, ylabel in zip((ax_eig, ax_tr, ax_loss), titles, ylabels, strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if len(ax.get_legend_handles_labels()[0]) > 1:
            ax.legend(fontsize=9)
        if not by_step:
            ax.set_xticks(xs)
    if len(xs) > 2 and by_step and min(xs) > 0 and max(xs) / min(xs) > 100:
        for ax in (ax_eig, ax_tr, ax_loss):
            ax.set_xscale("log")
    return save_figure(fig, path)
