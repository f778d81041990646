"""Memory budget: estimate big allocations before making them, fail with a clear fix.

The budget is ``--max-memory`` (default: half the memory available now); `preflight` stops
an allocation that would exceed it with the option that fixes the overrun. Capture's own
estimate (one example forward, no backward) is `gmcurv.capture_budget`.
"""

from __future__ import annotations

import math
import os
import re

from gmcurv.errors import ConfigError, MemoryBudgetError

DENSE_GRAM_LIMIT = 2048  # above N*C = this, Lanczos on the implicit K = J J^T (no dense K)

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


# glibc's own ceilings for its dynamic thresholds (64-bit): DEFAULT_MMAP_THRESHOLD_MAX and
# twice it for trimming; `keep_freed_memory` starts a process at them
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # mallopt parameters
_USER_MALLOC = (
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
)


def keep_freed_memory(large: bool = False) -> bool:
    """Let glibc's malloc reuse freed memory instead of handing it back to the kernel and
    faulting it in again: allocations below `MMAP_THRESHOLD` come from the heap, and up
    to `TRIM_THRESHOLD` of free heap top is kept. These are the ceilings glibc's dynamic
    thresholds move towards anyway; set from the start, the temporaries of every
    curvature product (tens of MB, freed and re-made per product) stop costing minor page
    faults (e.g. a 100-probe Hessian trace of a small transformer: 1.0M faults and 4 s of
    system time -> 0.09M and 0.7 s). Larger tensors are still mmapped and returned at
    once. A process-wide setting, for the command line (the library leaves the caller's
    process alone); skipped off glibc and when the user tunes malloc
    (``GLIBC_TUNABLES``'s malloc entries, ``MALLOC_TRIM_THRESHOLD_`` ...). True when applied.

    `large`: no allocation is mmapped at all (``M_MMAP_MAX = 0``), so the large temporaries
    of repeated curvature products are reused too — on GPT-2 124M a Hessian-vector product
    makes about 2 GB of them (vocabulary-sized logits and tied tables), each freshly
    faulted in before: on a 2-layer GPT-2 proxy 0.49M minor faults and 1.8-2.0 of 13-14
    CPU s per product (system time) -> none. A one-pass trace frees and re-makes large
    blocks too (the capture's activations, then the self-check's gradient, then the
    kernels): the default ``trace`` of GPT-2 124M takes 3.8-4.1 s instead of 4.4-4.9 s.
    The heap is then never trimmed either: the process keeps its peak memory (peak RSS
    +2-11 % on GPT-2), which a command that exits gives back at once."""
    if not _glibc():
        return False
    if "malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(
        k in os.environ for k in _USER_MALLOC
    ):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        if large:  # nothing mmapped, nothing trimmed (-1: never)
            return bool(ok and libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, -1))
        return bool(ok and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):  # no mallopt in this C library
        return False


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # no such name on this system
        return False


def parse_bytes(text: str) -> int:
    """``'4GB'``, ``'512MiB'``, ``'1e9'`` -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    fix = "write a positive size, e.g. --max-memory 4GB or 512MiB"
    if not m or m[2].lower() not in _UNITS:
        raise ConfigError(f"--max-memory {text!r}: cannot read a memory size", hint=fix)
    value = float(m[1]) * _UNITS[m[2].lower()]
    if not (math.isfinite(value) and 1 <= value < 2**63):
        raise ConfigError(f"--max-memory {text!r}: not a usable memory size", hint=fix)
    return int(value)


def check_memory_option(value: str | None) -> str | None:
    """Parse-time check of ``--max-memory`` (typer callback): the engine never sees a bad size."""
    if value is not None:
        parse_bytes(value)
    return value


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
