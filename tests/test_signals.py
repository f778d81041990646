"""Ctrl-C and kill: exit 130 / 143 with one line on stderr, never a traceback, and no
stray temporaries or partial outputs — tested on real child processes (`python -m gmcurv`)
killed during start-up, during compute and the moment an output's temporary appears."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gmcurv.cli import signals
from gmcurv.io.fileio import LIVE_TEMPORARIES, atomic_write

ROOT = Path(__file__).resolve().parents[1]
linux = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")


def test_handler_removes_the_live_temporary(tmp_path, monkeypatch, capfd):
    """A signal in the middle of an atomic write: the temporary goes, the target is never
    created, the exit code is 128 + signal, one line on stderr."""
    codes, at_exit = [], []

    def fake_exit(code):  # what a real os._exit would leave behind
        codes.append(code)
        at_exit.extend(p.name for p in tmp_path.iterdir())
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", fake_exit)
    target = tmp_path / "out.json"

    def write(tmp: Path) -> None:
        tmp.write_text("half")
        assert str(tmp) in LIVE_TEMPORARIES
        signals._handler(signal.SIGTERM, None)

    with pytest.raises(SystemExit):
        atomic_write(target, write)
    assert codes == [143] and at_exit == []
    assert list(tmp_path.iterdir()) == [] and not LIVE_TEMPORARIES
    err = capfd.readouterr().err
    assert err.strip() == "gmcurv: terminated (SIGTERM)"


def test_a_signal_between_mkstemp_and_registration_waits_for_the_step(tmp_path, monkeypatch):
    """Another thread (torch's pool) may take the signal while this one holds it blocked;
    Python then runs the handler here, possibly right after mkstemp. It postpones itself
    until the temporary is registered, so the temporary is still removed."""
    import tempfile

    codes = []

    def fake_exit(code):
        codes.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", fake_exit)
    real_mkstemp = tempfile.mkstemp

    def mkstemp_then_signal(*args, **kwargs):
        created = real_mkstemp(*args, **kwargs)
        os.close(created[0])
        signals._handler(signal.SIGTERM, None)  # where Python may run it
        assert codes == [], "the handler must wait for the registration"
        return os.open(created[1], os.O_RDWR), created[1]

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_then_signal)
    previous = signal.signal(signal.SIGTERM, signals._handler)
    try:
        with pytest.raises(SystemExit):
            atomic_write(tmp_path / "out.json", lambda tmp: tmp.write_text("x"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert codes == [143] and list(tmp_path.iterdir()) == [] and not LIVE_TEMPORARIES


def _spawn(args: list[str], cwd: Path, stderr_file: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GMCURV_NO_CONFIG": "1", "COLUMNS": "120"}
    env.pop("GMCURV_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "gmcurv", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=stderr_file.open("wb"),
    )


def _handlers_installed(pid: int) -> bool:
    """SIGTERM is caught (bit 15 of SigCgt): gmcurv's handler is in place."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    line = next((ln for ln in text.splitlines() if ln.startswith("SigCgt:")), "SigCgt: 0")
    return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))


def _wait(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.002)
    return False


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def _one_line(stderr_file: Path, word: str) -> None:
    err = stderr_file.read_text()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1] == f"gmcurv: {word}", err


@linux
@pytest.mark.parametrize(("sig", "code", "word"), [
    (signal.SIGINT, 130, "interrupted (SIGINT)"),
    (signal.SIGTERM, 143, "terminated (SIGTERM)"),
])  # fmt: skip
def test_signal_during_start_up(tmp_path, sig, code, word):
    """Right after the handlers are installed, before torch has finished importing."""
    err = tmp_path / "err"
    proc = _spawn(["trace", "-o", "out.json"], tmp_path, err)
    assert _wait(lambda: _handlers_installed(proc.pid), proc), "handlers never installed"
    proc.send_signal(sig)
    assert proc.wait(60) == code
    _one_line(err, word)
    assert err.read_text().strip().count("\n") == 0  # exactly one line
    assert not (tmp_path / "out.json").exists() and _leftovers(tmp_path) == []


@linux
def test_sigint_during_compute_leaves_nothing(tmp_path):
    """SIGINT while the landscape grid is being evaluated: no -o, no grid, no temporary."""
    err = tmp_path / "err"
    args = ["landscape", "--steps", "301", "-o", "out.json", "--save-grid", "g.npz", "-n", "512"]
    proc = _spawn(args, tmp_path, err)
    assert _wait(lambda: "note:" in err.read_text(), proc), err.read_text()  # loading
    time.sleep(1.0)
    assert proc.poll() is None, "finished before the signal"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130
    _one_line(err, "interrupted (SIGINT)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["err"]


@linux
def test_sigterm_the_moment_a_temporary_appears(tmp_path):
    """Kill `saliency --prune` as soon as its checkpoint's temporary shows up: afterwards
    there is no temporary, and the target is either absent or complete."""
    from safetensors.torch import load_file

    err = tmp_path / "err"
    proc = _spawn(
        [
            "saliency",
            "--prune",
            "0.5",
            "--criterion",
            "magnitude",
            "-n",
            "64",
            "--save-pruned",
            "out.safetensors",
            "-q",
        ],
        tmp_path,
        err,
    )
    seen = _wait(lambda: bool(_leftovers(tmp_path)), proc, timeout=300)
    if seen:
        proc.send_signal(signal.SIGTERM)
    rc = proc.wait(120)
    assert rc in ((143, 0) if seen else (0,)), err.read_text()
    if rc == 143:
        _one_line(err, "terminated (SIGTERM)")
    assert _leftovers(tmp_path) == []
    out = tmp_path / "out.safetensors"
    if out.exists():
        assert load_file(str(out))  # complete, never a torn file
