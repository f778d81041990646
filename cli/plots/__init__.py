"""Plots (matplotlib, headless). One module per command; this one holds the shared saver.

The format follows the file extension (.png, .svg, .pdf); files are written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gmcurv.errors import ConfigError
from gmcurv.io.fileio import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def pyplot():
    """matplotlib on the headless backend, imported on the first plot (not at start-up)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}


def check_plot_path(path: Path) -> str:
    """The matplotlib format for `path`, or a clear error."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(
            f"cannot write plot {path}: unknown extension {path.suffix!r}",
            hint="use a .png, .svg or .pdf file name",
        )
    return fmt


def save_figure(fig: Figure, path: Path, dpi: int = 150) -> Path:
    """Save atomically in the format given by the extension, then close the figure."""
    fmt = check_plot_path(path)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight"))
    finally:
        pyplot().close(fig)
    return path


def new_figure(*args, **kwargs):
    """``plt.subplots`` with gmcurv's defaults."""
    kwargs.setdefault("figsize", (7, 4.5))
    kwargs.setdefault("layout", "constrained")
    return pyplot().subplots(*args, **kwargs)


def readable_log_axis(ax, which: str = "y") -> None:
    """On a log axis spanning less than two decades, plain tick labels at round values
    (``1.2``, not ``1.2×10⁰``); wider ranges keep matplotlib's powers of ten."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

    axis = ax.yaxis if which == "y" else ax.xaxis
    lo, hi = ax.get_ylim() if which == "y" else ax.get_xlim()
    if lo <= 0 or hi / lo >= 100:
        return
    axis.set_major_locator(MaxNLocator(6))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.6g}"))
    axis.set_minor_formatter(NullFormatter())


def two_se(e: dict | None) -> float:
    """Two standard errors of an estimate: estimator noise, else sampling error over examples
    (the closed forms are exact on the sample but not the population); 0 when neither."""
    if not e:
        return 0.0
    se = e.get("stderr")
    if se is None:
        se = e.get("data_stderr")
    return 2 * (se or 0.0)
