"""Memory preflight: estimate big allocations before making them, fail with a clear fix."""

from __future__ import annotations

import os
import re

from gmcurv.errors import ConfigError, MemoryBudgetError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "m": 1e6,
    "mb": 1e6,
    "g": 1e9,
    "gb": 1e9,
    "t": 1e12,
    "tb": 1e12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def available_bytes() -> int:
    """Memory available to this process now (Linux /proc/meminfo; else total physical)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 8 * 2**30


def parse_bytes(text: str) -> int:
    """``'4GB'``, ``'512MiB'``, ``'1e9'`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m[2].lower() not in _UNITS:
        raise ConfigError(f"cannot read memory size {text!r}", hint="write e.g. 4GB or 512MiB")
    return int(float(m[1]) * _UNITS[m[2].lower()])


def default_budget() -> int:
    """Half of the memory available now."""
    return available_bytes() // 2


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"  # pragma: no cover


def preflight(need: float, budget: int | None, what: str, fix: str) -> None:
    """Raise `MemoryBudgetError` if `need` bytes exceed the budget."""
    limit = default_budget() if budget is None else budget
    if need > limit:
        raise MemoryBudgetError(
            f"{what} needs about {human(need)}, over the memory budget of {human(limit)}",
            hint=f"{fix}; or raise --max-memory",
        )
