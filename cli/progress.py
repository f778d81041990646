"""Progress on stderr: a transient rich bar, advanced by the engine's progress callbacks.

The engine never prints: it calls ``progress(k)`` (k more units of work done) and, where a
command runs several phases, ``phase(label, total)`` (the next phase starts; ``total`` units
or None when not known in advance). `Session.progress` hands the engine an `Advance` that
forwards both to a sink: the rich bar (counts, elapsed, ETA), or a `Recorder` in tests and
audits (`recording`), which keeps what a bar would have shown without drawing anything.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from gmcurv.cli.consoles import stderr


class Sink(Protocol):
    """Where an `Advance` sends its calls."""

    def advance(self, k: float) -> None: ...

    def phase(self, label: str, total: int | None) -> None: ...

    def update(self, completed: float | None, total: int | None) -> None: ...


@dataclass
class Advance:
    """What `Session.progress` yields: ``advance(k)`` moves the bar by `k`;
    ``advance.phase(label, total)`` starts the next phase on the same bar (count back to 0,
    a fresh ETA)."""

    sink: Sink

    def __call__(self, k: float = 1) -> None:
        self.sink.advance(k)

    def phase(self, label: str, total: int | None) -> None:
        self.sink.phase(label, total)

    def update(self, completed: float | None = None, total: int | None = None) -> None:
        """Set the count (e.g. a resumed run's step) and/or the total once it is known."""
        self.sink.update(completed, total)


@dataclass
class _RichSink:
    bar: Any  # rich.progress.Progress
    task: Any

    def advance(self, k: float) -> None:
        self.bar.advance(self.task, k)

    def phase(self, label: str, total: int | None) -> None:
        # a fresh task: `reset` keeps the previous total when given None (a count-less
        # phase after a counted one would show the old total, its count stuck at 0)
        self.bar.remove_task(self.task)
        self.task = self.bar.add_task(label, total=total)

    def update(self, completed: float | None, total: int | None) -> None:
        kw = {k: v for k, v in (("completed", completed), ("total", total)) if v is not None}
        self.bar.update(self.task, **kw)


@contextlib.contextmanager
def rich_bar(label: str, total: int | None, disabled: bool) -> Iterator[Advance]:
    """A transient rich progress bar on stderr: spinner, label, bar, done/total (none while
    the total is unknown), elapsed, ETA."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Count(MofNCompleteColumn):
        def render(self, task):  # a spinner phase has no count to show ("0/?")
            return Text("") if task.total is None else super().render(task)

    bar = Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        Count(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
        disable=disabled,
    )
    with bar:
        yield Advance(_RichSink(bar, bar.add_task(label, total=total)))


@dataclass
class Phase:
    """One phase as a bar would have shown it."""

    label: str
    total: int | None
    disabled: bool
    done: float = 0.0
    advances: int = 0  # calls of advance(k)
    started: float = field(default_factory=time.perf_counter)
    first_advance: float | None = None  # seconds after the start
    ended: float | None = None  # seconds after the start

    @property
    def seconds(self) -> float:
        return self.ended if self.ended is not None else time.perf_counter() - self.started


@dataclass
class Recorder:
    """A sink that records every phase (label, total, units done, timing) and draws nothing."""

    phases: list[Phase] = field(default_factory=list)

    @contextlib.contextmanager
    def bar(self, label: str, total: int | None, disabled: bool) -> Iterator[Advance]:
        self._start(label, total, disabled)
        try:
            yield Advance(self)
        finally:
            self._end()

    def _start(self, label: str, total: int | None, disabled: bool) -> None:
        self.phases.append(Phase(label, total, disabled))

    def _end(self) -> None:
        p = self.phases[-1]
        if p.ended is None:
            p.ended = time.perf_counter() - p.started

    def advance(self, k: float) -> None:
        p = self.phases[-1]
        if p.first_advance is None:
            p.first_advance = time.perf_counter() - p.started
        p.done += k
        p.advances += 1

    def update(self, completed: float | None, total: int | None) -> None:
        p = self.phases[-1]
        if completed is not None:
            self.advance(completed - p.done)
        if total is not None:
            p.total = total

    def phase(self, label: str, total: int | None) -> None:
        disabled = self.phases[-1].disabled
        self._end()
        self._start(label, total, disabled)


BarFactory = Callable[[str, "int | None", bool], contextlib.AbstractContextManager[Advance]]
_factory: BarFactory = rich_bar


def progress_bar(label: str, total: int | None, disabled: bool) -> Any:
    """The bar `Session.progress` opens: rich on stderr, or the active `recording`."""
    return _factory(label, total, disabled)


@contextlib.contextmanager
def recording() -> Iterator[Recorder]:
    """Record progress instead of drawing it, for the duration of the block."""
    global _factory
    recorder, saved = Recorder(), _factory
    _factory = recorder.bar
    try:
        yield recorder
    finally:
        _factory = saved
