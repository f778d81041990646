"""A directory output (``saliency --prune`` into ``save_pretrained``'s layout) is written
whole into a temporary beside the target and moved in: a signal or an error before the move
leaves nothing; into an existing directory each file is replaced atomically."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from gmcurv.cli import signals
from gmcurv.io.fileio import LIVE_TEMPORARIES, atomic_directory


def test_signal_mid_write_leaves_no_directory(tmp_path, monkeypatch, capfd):
    codes = []

    def fake_exit(code):
        codes.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", fake_exit)

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"half")
        assert str(tmp) in LIVE_TEMPORARIES
        signals._handler(signal.SIGTERM, None)

    with pytest.raises(SystemExit):
        atomic_directory(tmp_path / "pruned", write)
    assert codes == [143] and list(tmp_path.iterdir()) == [] and not LIVE_TEMPORARIES
    assert capfd.readouterr().err.strip() == "gmcurv: terminated (SIGTERM)"


def test_error_leaves_nothing_and_existing_directory_is_updated(tmp_path):
    def fail(tmp: Path) -> None:
        (tmp / "a").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_directory(tmp_path / "out", fail)
    assert list(tmp_path.iterdir()) == []

    out = atomic_directory(tmp_path / "out", lambda t: (t / "a").write_text("1"))
    assert (out / "a").read_text() == "1" and oct(out.stat().st_mode & 0o777) != "0o700"
    (out / "keep").write_text("mine")
    atomic_directory(out, lambda t: (t / "a").write_text("2"))
    assert (out / "a").read_text() == "2" and (out / "keep").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporaries left
