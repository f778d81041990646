"""Plots (matplotlib, headless). One module per command; this one holds the shared saver.

The format follows the file extension (.png, .svg, .pdf); files are written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gmcurv.errors import ConfigError
from gmcurv.fileio import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _pyplot():
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
        _pyplot().close(fig)
    return path


def new_figure(*args, **kwargs):
    """``plt.subplots`` with gmcurv's defaults."""
    kwargs.setdefault("figsize", (7, 4.5))
    kwargs.setdefault("layout", "constrained")
    return _pyplot().subplots(*args, **kwargs)
