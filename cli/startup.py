"""Start-up without the cyclic garbage collector; collection as usual from the compute on.

A command imports torch (and, through torch's first backward, sympy): about a million
long-lived objects. Every full collection during those imports walks all of them (tens to
hundreds of ms each, several per command), and so does the interpreter's last collection
at exit. None of them is garbage. So the command line `hold`\\ s the collector off from
process entry; `release`, once start-up is over and before load and compute, moves every
object alive into the permanent generation (`gc.freeze`: never scanned again, not even at
exit) and turns collection back on, so that long runs still collect the cycles they make.

Only a process that called `hold` is affected: importing `gmcurv.cli` (tests, notebooks,
``report`` running commands in-process) leaves the collector alone. Standard library only.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

_held = False  # this module turned the collector off (and has not turned it back on)
_pins = 0  # open `pinned` blocks: `release` waits for the outermost to end


def hold() -> None:
    """Turn the cyclic collector off for start-up (the command line's process entry)."""
    global _held
    if not _held and gc.isenabled():
        gc.disable()
        _held = True


def release() -> None:
    """Start-up is over: freeze what it created and collect from now on (no-op when not
    held, or inside `pinned`)."""
    global _held
    if _held and _pins == 0:
        gc.freeze()
        gc.enable()
        _held = False


def held() -> bool:
    """Whether `hold` has the collector off now."""
    return _held


@contextlib.contextmanager
def pinned() -> Iterator[None]:
    """Keep the collector held through a block (a session's start-up: torch's lazy imports
    included), then `release` it."""
    global _pins
    _pins += 1
    try:
        yield
    finally:
        _pins -= 1
        release()
