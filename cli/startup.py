"""Start-up without the cyclic garbage collector; collection as usual from the compute on.

A command imports torch (and, through torch's first backward, sympy): about a million
long-lived objects. Every full collection during those imports walks all of them (tens to
hundreds of ms each, several per command), and so does the interpreter's last collection
at exit. None of them is garbage. So the command line `hold`\\ s the collector off from
process entry; `release`, once start-up is over and before load and compute, moves every
object alive into the permanent generation (`gc.freeze`: never scanned again, not even at
exit) and turns collection back on, so that long runs still collect the cycles they make.

Only a process that called `hold` is affected: importing `gmcurv.cli` (tests, notebooks,
``report`` running commands in-process) leaves the collector alone.

At the end, `run_then_exit` skips the interpreter's teardown (freeing every module and
object one by one: about 0.2 s once torch is loaded, more than a whole ``--help``): the
command's files are closed by then (atomic writes), so it flushes stdout and stderr, runs
the ``atexit`` handlers and ends the process with the command's exit code. It falls back
to the ordinary exit when anything could still need the teardown: a non-integer exit
status, a thread other than daemons still running, a flush that fails (a closed pipe), or
``GMCURV_DEBUG`` set. Standard library only.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import NoReturn

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


BUSY: str | None = None  # why `passive_waits` chose sleeping threads (None: it did not)


def passive_waits() -> None:
    """On a busy machine, idle OpenMP threads sleep at once instead of spinning: with the
    1-minute load average above the core count as the command starts, and no policy set
    by the user, ``OMP_WAIT_POLICY=PASSIVE`` (torch's OpenMP runtime reads it when torch
    loads, so this runs at process entry; `BUSY` says why, for a note). Threads spinning
    at every parallel region's barrier wait for team-mates preempted by the other jobs:
    W2 ``trace --k 0`` at load 5 took 0.7-2.0 s of compute spinning, 0.06-0.2 s sleeping;
    on an idle machine spinning is faster (27 vs 31 ms), so it stays (`bench/cli/BUSY.md`)."""
    global BUSY
    if "OMP_WAIT_POLICY" in os.environ:
        return
    try:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
    except (OSError, AttributeError):  # no load average on this system
        return
    if load > cores:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        BUSY = f"load {load:.1f} on {cores} cores"


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


def run_then_exit(command: Callable[[], object]) -> NoReturn:
    """Run the command line (``typer``'s app, which ends in ``SystemExit``), then
    `exit_now` with its status."""
    try:
        command()
    except SystemExit as e:
        exit_now(e.code)
    exit_now(0)


def exit_now(code: object) -> NoReturn:
    """End the process with `code` after flushing stdio and running the ``atexit``
    handlers, without the interpreter's teardown (or with it: see the module doc)."""
    if code is not None and not isinstance(code, int):
        raise SystemExit(code)  # a message: Python prints it
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if os.environ.get("GMCURV_DEBUG") or any(not t.daemon for t in others):
        raise SystemExit(code)
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):  # a closed pipe or stream: Python's own exit reports it
        raise SystemExit(code) from None
    atexit._run_exitfuncs()  # what the ordinary exit runs first
    os._exit(code or 0)
