"""`gmcurv.memory.keep_freed_memory`: the command line's malloc setting (issue 13)."""

from __future__ import annotations

import os
import subprocess
import sys

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
    """Compute commands call it in their start-up stage (not timed as compute), large
    blocks included: a one-pass Fisher trace re-makes large blocks too (GPT-2 124M)."""
    from gmcurv.cli import session

    calls = []
    monkeypatch.setattr(session, "keep_freed_memory", lambda **k: calls.append(k) or True)
    session.warm_up_autograd()
    assert calls == [{"large": True}]


@pytest.mark.skipif(not _glibc(), reason="mallopt is glibc's")
def test_large_setting_applies_in_a_fresh_process():
    """``large=True`` is applied (mallopt accepted every parameter) and the process still
    computes; the setting only moves where malloc takes memory from."""
    code = (
        "import torch\n"
        "from gmcurv.memory import keep_freed_memory\n"
        "ok = keep_freed_memory(large=True)\n"
        "x = torch.ones(1 << 24); del x\n"
        "print(ok, float(torch.ones(1 << 24).sum()))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", str(float(1 << 24))]
