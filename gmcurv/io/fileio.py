"""Safe file output: atomic writes, hashing, and the rule that outputs never overwrite inputs."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from gmcurv.errors import ConfigError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def ensure_not_input(
    output: str | os.PathLike,
    inputs: Iterable[str | os.PathLike | None],
    option: str | None = None,
) -> Path:
    """Refuse an output path that is (or lies inside / contains) one of the inputs; the
    message names `option` (the flag that chose the path) when given."""
    out = Path(output).expanduser().resolve()
    what = f"{option} {output}" if option else str(output)
    hint = f"choose another path for {option}" if option else "choose another output path"
    for item in inputs:
        if item is None:
            continue
        src = Path(item).expanduser().resolve()
        if out == src:
            raise ConfigError(
                f"refusing to write {what}: it would overwrite the input {item}", hint=hint
            )
        if src.is_dir() and src in out.parents:
            raise ConfigError(
                f"refusing to write {what}: it lies inside the input directory {item} "
                "(outputs never overwrite or add to inputs)",
                hint=hint,
            )
    return out


def check_writable(output: str | os.PathLike, option: str | None = None) -> Path:
    """Refuse, before any compute, an output whose directory is missing, is a file or is
    read-only, or that names an existing directory."""
    target = Path(output).expanduser()
    parent = target.parent if str(target.parent) else Path(".")
    what = f"{option} {output}" if option else str(output)
    hint = f"choose another path for {option}" if option else "choose another output path"
    if target.is_dir():
        raise ConfigError(f"cannot write {what}: it is a directory", hint=hint)
    if not parent.exists():
        raise ConfigError(
            f"cannot write {what}: directory {parent} does not exist",
            hint="create the directory first, or " + hint,
        )
    if not parent.is_dir():
        raise ConfigError(f"cannot write {what}: {parent} is not a directory", hint=hint)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {what}: {parent} is read-only", hint=hint)
    return target


# temporaries being written right now: a signal handler removes them before exiting
LIVE_TEMPORARIES: set[str] = set()
# signals a handler postponed (`signals_deferred()` was true); re-raised when the step ends
PENDING_SIGNALS: list[int] = []
_deferring = 0


def signals_deferred() -> bool:
    """Whether a temporary is being created+registered or renamed+unregistered right now: a
    signal handler then appends its signal to `PENDING_SIGNALS` and returns."""
    return _deferring > 0


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM for a few system calls (so a temporary is never unregistered).

    Blocking them in this thread is not enough: another thread (torch's pool) may take the
    signal, and Python then runs the handler here at the next bytecode. So a handler that
    sees `signals_deferred()` records the signal instead, and it is raised again on exit.
    """
    global _deferring
    blockable = hasattr(signal, "pthread_sigmask")
    if blockable:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if blockable:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        if not _deferring and PENDING_SIGNALS:
            signal.raise_signal(PENDING_SIGNALS.pop(0))


def remove_live_temporaries() -> None:
    """Delete every temporary `atomic_write` / `atomic_directory` has not renamed yet
    (signal path)."""
    for name in list(LIVE_TEMPORARIES):
        with contextlib.suppress(OSError):
            if os.path.isdir(name) and not os.path.islink(name):
                shutil.rmtree(name, ignore_errors=True)
            else:
                os.unlink(name)
        LIVE_TEMPORARIES.discard(name)


def _registered_temporary(target: Path, parent: Path, directory: bool) -> Path:
    """An empty temporary file (or directory) ``.<name>.*.tmp`` beside `target`, created and
    registered in `LIVE_TEMPORARIES` as one step (a signal between the two leaves nothing)."""
    with _signals_deferred():
        try:
            if directory:
                name = tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
            else:
                fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
                os.close(fd)
        except OSError as e:
            raise ConfigError(
                f"cannot write {target}: {e.strerror}", hint="choose another output path"
            ) from None
        LIVE_TEMPORARIES.add(name)
    return Path(name)


def _usual_permissions(path: Path, mode: int) -> None:
    """Give `path` `mode` less the process's umask (what ``open``/``mkdir`` would give)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` on a temporary file beside `path`, then rename it into place.

    A crash or an exception leaves `path` untouched (either the old file or none).
    """
    target = Path(path).expanduser()
    parent = target.parent if str(target.parent) else Path(".")
    check_writable(target)
    tmp = _registered_temporary(target, parent, directory=False)
    tmp_name = str(tmp)
    try:
        write(tmp)
        _usual_permissions(tmp, 0o666)  # mkstemp creates 0600
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        with _signals_deferred():  # renamed and unregistered as one step
            os.replace(tmp, target)
            LIVE_TEMPORARIES.discard(tmp_name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        LIVE_TEMPORARIES.discard(tmp_name)
        raise
    return target


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write bytes atomically (see `atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text atomically (see `atomic_write`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_directory(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)` on a temporary directory beside `path`, then move it into place:
    renamed whole when `path` does not exist, else file by file (each an atomic replace).

    A crash, an exception or a signal before the move leaves `path` untouched.
    """
    target = Path(path).expanduser()
    parent = target.parent if str(target.parent) else Path(".")
    tmp = _registered_temporary(target, parent, directory=True)
    tmp_name = str(tmp)
    try:
        write(tmp)
        _usual_permissions(tmp, 0o777)  # mkdtemp creates 0700
        with _signals_deferred():
            if not target.exists():
                os.rename(tmp, target)
            else:
                for f in sorted(tmp.iterdir()):
                    os.replace(f, target / f.name)
                tmp.rmdir()
            LIVE_TEMPORARIES.discard(tmp_name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        LIVE_TEMPORARIES.discard(tmp_name)
        raise
    return target
