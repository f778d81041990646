"""The two consoles of the front end: results on stdout, notes/progress/warnings on stderr."""

from __future__ import annotations

from rich.console import Console

stdout = Console(highlight=False, soft_wrap=False)
stderr = Console(stderr=True, highlight=False)


def note(text: str, quiet: bool = False) -> None:
    """A dim ``note:`` line on stderr (not with --quiet)."""
    if not quiet:
        stderr.print(f"[dim]note:[/dim] {text}")
