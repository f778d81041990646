"""Ctrl-C and ``kill``: one line on stderr, no traceback, no stray temporaries.

`install` runs first thing in the console entry point — before the heavy imports (torch,
typer), so a signal during start-up is handled too. On SIGINT the process exits 130, on
SIGTERM 143 (128 + signal number, the shell convention), after deleting the temporaries of
atomic writes still in flight (`gmcurv.io.fileio.LIVE_TEMPORARIES`); a target file is either
complete (renamed into place) or untouched. Only the standard library is imported here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
_WORDS = {signal.SIGINT: "interrupted (SIGINT)", signal.SIGTERM: "terminated (SIGTERM)"}


def _handler(signum: int, frame: object) -> None:
    fileio = sys.modules.get("gmcurv.io.fileio")  # imported only if a write may be running
    if fileio is not None:
        if fileio.signals_deferred():  # mid-step of an atomic write: handled when it ends
            fileio.PENDING_SIGNALS.append(signum)
            return
        fileio.remove_live_temporaries()
    with contextlib.suppress(OSError):
        os.write(2, f"gmcurv: {_WORDS.get(signum, f'signal {signum}')}\n".encode())
    os._exit(EXIT_CODES.get(signum, 128 + signum))


def install() -> None:
    """Handle SIGINT and SIGTERM for the rest of the process (main thread only)."""
    for sig in EXIT_CODES:
        try:
            signal.signal(sig, _handler)
        except (ValueError, OSError):  # not the main thread, or an embedded interpreter
            return
