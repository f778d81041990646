"""Plots of ``gmcurv saliency``: per-tensor saliency distributions and pruning curves.

Drawn from the report's results only (quantiles and sweep points), never from tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gmcurv.cli.plots import new_figure, readable_log_axis, save_figure
from gmcurv.cli.render import shorten_names

_COLORS = {
    "magnitude": "tab:gray",
    "obd": "tab:blue",
    "obs": "tab:orange",
    "obs+update": "tab:red",
    "obd-hessian": "tab:green",
}


def _box(stats: dict[str, Any]) -> dict[str, float] | None:
    """matplotlib ``bxp`` stats from the quantile estimates (whiskers at 5 % and 95 %)."""
    keys = ("p05", "p25", "median", "p75", "p95")
    vals = [stats.get(k, {}).get("value") for k in keys]
    if any(v is None for v in vals):
        return None
    positive = [v for v in vals if v > 0]
    if not positive:
        return None
    floor = max(positive) * 1e-12  # zeros (dead units) would stretch the log axis
    lo, q1, med, q3, hi = (max(v, floor) for v in vals)
    return {"whislo": lo, "q1": q1, "med": med, "q3": q3, "whishi": hi, "fliers": []}


def plot_saliency(results: dict[str, Any], path: Path) -> Path:
    """Three panels: saliency boxes per tensor and criterion (log scale), loss and accuracy
    against sparsity for every criterion (the ``--prune`` result marked when present)."""
    fig, (ax_box, ax_loss, ax_acc) = new_figure(1, 3, figsize=(16, 4.8))
    layers = results.get("layers", {})
    crits = [c for c in results.get("criteria", []) if c != "magnitude"]  # |w| is no loss
    width = 0.8 / max(1, len(crits))
    for j, crit in enumerate(crits):
        boxes, positions = [], []
        for i, info in enumerate(layers.values()):
            b = _box(info["saliency"].get(crit, {}))
            if b is not None:
                boxes.append(b)
                positions.append(i - 0.4 + width * (j + 0.5))
        if boxes:
            art = ax_box.bxp(
                boxes,
                positions=positions,
                widths=width * 0.9,
                patch_artist=True,
                showfliers=False,
                manage_ticks=False,
            )
            for patch in art["boxes"]:
                patch.set_facecolor(_COLORS.get(crit, "tab:purple"))
                patch.set_alpha(0.6)
            ax_box.plot([], [], "s", color=_COLORS.get(crit, "tab:purple"), label=crit)
    ax_box.set_yscale("log")
    ax_box.set_xticks(range(len(layers)))
    ax_box.set_xticklabels(shorten_names(list(layers), 20), rotation=30, ha="right")
    ax_box.set_xlabel("prunable tensor")
    ax_box.set_ylabel("saliency: predicted loss increase")
    ax_box.set_title("saliency per tensor (boxes 25-75 %, whiskers 5-95 %)", fontsize=11)
    if crits:
        ax_box.legend(fontsize=8)

    base = results.get("baseline", {})
    for crit, points in results.get("sweep", {}).items():
        xs = [100 * p["fraction"] for p in points]
        color = _COLORS.get(crit, "tab:purple")
        ax_loss.plot(xs, [p["loss"]["value"] for p in points], "o-", color=color, label=crit)
        accs = [p["accuracy"]["value"] if p.get("accuracy") else None for p in points]
        if all(a is not None for a in accs):
            ax_acc.plot(xs, [100 * a for a in accs], "o-", color=color, label=crit)
    if base.get("loss"):
        ax_loss.axhline(base["loss"]["value"], color="black", lw=0.8, ls=":", label="unpruned")
    if base.get("accuracy"):
        ax_acc.axhline(
            100 * base["accuracy"]["value"], color="black", lw=0.8, ls=":", label="unpruned"
        )
    pr = results.get("prune")
    if pr:
        x = 100 * pr["fraction"]
        label = "--prune " + pr["criterion"] + ("+update" if pr["update"] else "")
        ax_loss.plot([x], [pr["after"]["loss"]["value"]], "k*", ms=12, label=label)
        if pr["after"].get("accuracy"):
            ax_acc.plot([x], [100 * pr["after"]["accuracy"]["value"]], "k*", ms=12, label=label)
    ax_loss.set_yscale("log")
    readable_log_axis(ax_loss)
    ax_loss.set_xlabel("pruned weights (%)")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss after pruning")
    ax_loss.legend(fontsize=8)
    ax_acc.set_xlabel("pruned weights (%)")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title("accuracy after pruning")
    if ax_acc.lines:
        ax_acc.legend(fontsize=8)
    fisher = results.get("fisher", {}).get("type", "?")
    eps = results.get("damping", {}).get("eps")
    fig.suptitle(f"gmcurv saliency — {fisher} Fisher, eps {eps:.3g}" if eps else "gmcurv saliency")
    return save_figure(fig, path)
