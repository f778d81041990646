"""Safe file output: atomic writes, hashing, and the rule that outputs never overwrite inputs."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from gmcurv.errors import ConfigError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def ensure_not_input(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> Path:
    """Refuse an output path that is (or lies inside / contains) one of the inputs."""
    out = Path(output).expanduser().resolve()
    for item in inputs:
        if item is None:
            continue
        src = Path(item).expanduser().resolve()
        if out == src or (src.is_dir() and src in out.parents):
            raise ConfigError(
                f"refusing to write {output}: it would overwrite the input {item}",
                hint="choose another output path with -o/--output",
            )
    return out


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` on a temporary file beside `path`, then rename it into place.

    A crash or an exception leaves `path` untouched (either the old file or none).
    """
    target = Path(path).expanduser()
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.exists():
        raise ConfigError(
            f"cannot write {target}: directory {parent} does not exist",
            hint="create the directory first or choose another output path",
        )
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write bytes atomically (see `atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text atomically (see `atomic_write`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))
