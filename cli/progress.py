"""Progress on stderr: a transient rich bar, advanced by the engine's progress callbacks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from gmcurv.cli.consoles import stderr


@dataclass
class Advance:
    """What `Session.progress` yields: ``advance(k)`` moves the bar by `k`;
    ``advance.phase(label, total)`` starts the next phase on the same bar."""

    bar: Progress
    task: Any

    def __call__(self, k: int = 1) -> None:
        self.bar.advance(self.task, k)

    def phase(self, label: str, total: int | None) -> None:
        self.bar.reset(self.task, total=total, description=label)


@contextlib.contextmanager
def progress_bar(label: str, total: int | None, disabled: bool) -> Iterator[Advance]:
    """A transient rich progress bar on stderr."""
    bar = Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
        disable=disabled,
    )
    with bar:
        yield Advance(bar, bar.add_task(label, total=total))
