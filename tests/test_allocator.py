"""`gmcurv.memory.keep_freed_memory`: the command line's malloc setting (issue 13)."""

from __future__ import annotations

import pytest

from gmcurv.memory import _glibc, keep_freed_memory


@pytest.mark.skipif(not _glibc(), reason="glibc's mallopt only")
def test_applied_on_glibc(monkeypatch):
    for var in ("GLIBC_TUNABLES", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"):
        monkeypatch.delenv(var, raising=False)
    assert keep_freed_memory() is True


@pytest.mark.parametrize(
    ("var", "value"),
    [("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1"), ("MALLOC_TRIM_THRESHOLD_", "1")],
)
def test_user_tuning_wins(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    assert keep_freed_memory() is False


def test_commands_set_it_at_startup(monkeypatch):
    """Compute commands call it in their start-up stage (not timed as compute)."""
    from gmcurv.cli import session

    calls = []
    monkeypatch.setattr(session, "keep_freed_memory", lambda: calls.append(1) or True)
    session.warm_up_autograd()
    assert calls == [1]
