"""Rich rendering helpers shared by the commands (tables only; no computation)."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from gmcurv.results import Report


def fmt(x: float | None, digits: int = 4) -> str:
    """Compact number: 4 significant digits, scientific when large or small."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e5:
        return f"{x:.{digits}g}"
    return f"{x:.{max(1, digits - 1)}e}"


def fmt_estimate(e: dict[str, Any] | None, digits: int = 4) -> str:
    """``value ± stderr`` (stderr omitted when exact); ``value [lo, hi]`` for a learned
    estimate with a calibrated interval."""
    if e is None:
        return "—"
    text = fmt(e.get("value"), digits)
    if e.get("stderr") is not None:
        text += f" ± {fmt(e['stderr'], 2)}"
    if e.get("interval") is not None:
        lo, hi = e["interval"]
        text += f" [{fmt(lo, 3)}, {fmt(hi, 3)}]"
    if e.get("converged") is False:
        text += " [yellow](not converged)[/yellow]"
    return text


def header(report: Report, console: Console, title: str) -> None:
    """One line saying what was analysed."""
    parts = [f"[bold]{title}[/bold]"]
    if report.model:
        parts.append(
            f"model [cyan]{report.model.path}[/cyan] ({report.model.arch}, "
            f"{report.model.n_params:,} params)"
        )
    if report.data:
        parts.append(f"data [cyan]{report.data.path}[/cyan] (N={report.data.n:,})")
    console.print(" · ".join(parts), soft_wrap=True)


# the options and derived choices that change the numbers, shown with their source
CHOICES = ("arch", "loss", "label_shift", "fisher", "mode", "dtype", "weights_dtype")


def choices(config: dict[str, Any]) -> str:
    """``loss cross_entropy (built-in default: ...) · mode eval (default) · ...``."""
    sources = config.get("sources", {})
    parts = []
    for key in CHOICES:
        if key not in config or config[key] is None:
            continue
        value = config[key]
        value = ("on" if value else "off") if isinstance(value, bool) else value
        name = key.replace("_", " ")
        parts.append(f"{name} {value} ({sources.get(key, 'default')})")
    return " · ".join(parts)


def footer(report: Report, console: Console) -> None:
    total = sum(report.timings.values())
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in report.timings.items())
    made = choices(report.config)
    if made:
        console.print(Text(made, style="dim"), soft_wrap=True)  # Text: no markup in values
    console.print(
        f"[dim]{report.device}, {report.dtype}, seed {report.seed} · {total:.2f}s ({stages})[/dim]",
        soft_wrap=True,
    )


def new_table(title: str | None = None, *columns: str, **kw: Any) -> Table:
    table = Table(title=title, title_justify="left", header_style="bold", **kw)
    for i, col in enumerate(columns):
        # the name column is never cut with "…" (shorten names from the left with
        # `shorten_names`; a name without spaces is as wide as its longest word, so it stays
        # whole unless the table cannot fit at all, and then folds)
        table.add_column(
            col, justify="left" if i == 0 else "right", overflow="fold" if i == 0 else "ellipsis"
        )
    return table


def shorten_names(names: list[str], width: int) -> list[str]:
    """Names cut from the left to at most `width` characters (``…h.11.attn.c_attn``), at a
    separator where one fits, so the distinguishing tail stays; names that would then collide are
    kept whole (the table wraps them rather than showing two identical cells)."""

    def cut(name: str) -> str:
        if len(name) <= width:
            return name
        # the longest tail that starts after a separator (. _ - /) and fits beside the "…"
        starts = [i + 1 for i, ch in enumerate(name) if ch in "._-/"]
        tails = [name[i:] for i in starts if len(name) - i + 1 <= width and i < len(name)]
        return "…" + (tails[0] if tails else name[-(width - 1) :])

    short = [cut(n) for n in names]
    counts: dict[str, int] = {}
    for s in short:
        counts[s] = counts.get(s, 0) + 1
    return [s if counts[s] == 1 else n for s, n in zip(short, names, strict=True)]


def fmt_column(values: list[float | None], digits: int = 4, max_digits: int = 8) -> list[str]:
    """`fmt` of a column's values with the fewest significant digits (at least `digits`)
    at which distinct values read differently, so rows can be told apart."""
    distinct = {v for v in values if v is not None}
    for d in range(digits, max_digits + 1):
        texts = [fmt(v, d) for v in values]
        shown = {t for v, t in zip(values, texts, strict=True) if v is not None}
        if len(shown) == len(distinct):
            return texts
    return [fmt(v, max_digits) for v in values]


def fmt_estimates(estimates: list[dict[str, Any] | None], digits: int = 4) -> list[str]:
    """`fmt_estimate` of a column of estimates, values to the digits that tell rows apart."""
    values = fmt_column([None if e is None else e.get("value") for e in estimates], digits)
    out = []
    for e, text in zip(estimates, values, strict=True):
        if e is None:
            out.append("—")
            continue
        if e.get("stderr") is not None:
            text += f" ± {fmt(e['stderr'], 2)}"
        if e.get("converged") is False:
            text += " [yellow](not converged)[/yellow]"
        out.append(text)
    return out
