"""``gmcurv report``: one self-contained HTML page (sections, commands, embedded figures, no
network), and a real headless Chromium rendering it without console errors (skipped when
Chromium is absent)."""

from __future__ import annotations

import base64
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from helpers import write_data, write_mlp

from gmcurv.cli.app import app
from gmcurv.cli.report import SECTIONS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _Page(HTMLParser):
    """Sections, the command shown in each, images and external references of a page."""

    def __init__(self):
        super().__init__()
        self.sections: dict[str, dict] = {}
        self.current: str | None = None
        self.in_cmd = False
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            v = a.get(key) or ""
            if v and not v.startswith(("data:", "#")):
                self.external.append(v)
        if tag == "section":
            self.current = a["id"]
            self.sections[self.current] = {"cmd": "", "images": [], "pre": 0}
        elif self.current and tag == "code" and a.get("class") == "cmd":
            self.in_cmd = True
        elif self.current and tag == "img":
            self.sections[self.current]["images"].append(a["src"])
        elif self.current and tag == "pre":
            self.sections[self.current]["pre"] += 1

    def handle_endtag(self, tag):
        if tag == "code":
            self.in_cmd = False
        if tag == "section":
            self.current = None

    def handle_data(self, data):
        if self.in_cmd and self.current:
            self.sections[self.current]["cmd"] += data


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from typer.testing import CliRunner

    tmp = tmp_path_factory.mktemp("report")
    model = write_mlp(tmp / "model.safetensors", sizes=(5, 6, 3))
    data = write_data(tmp / "data.safetensors", n=16, d=5)
    out = tmp / "report.html"
    args = ["report", model, data, "-o", out, "--curvature", "fisher", "--seed", "3"]
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return out


def test_page_has_every_section_with_its_command_and_figure(page):
    text = page.read_text()
    p = _Page()
    p.feed(text)
    assert list(p.sections) == list(SECTIONS)
    assert not p.external  # self-contained: nothing loaded from elsewhere
    commands = {
        "model": "gmcurv info",
        "traces": "gmcurv trace",
        "eigenvalues": "gmcurv trace",
        "spectrum": "gmcurv spectrum",
        "saliency": "gmcurv saliency",
        "landscape": "gmcurv landscape",
    }
    for key, sec in p.sections.items():
        assert sec["cmd"].startswith(commands[key]), (key, sec["cmd"])
        assert "model.safetensors" in sec["cmd"]
        assert ("--seed 3" in sec["cmd"]) == (key != "model")  # info takes no --seed
        assert "gmcurv-report-" not in sec["cmd"]  # no temporary paths shown
        assert sec["pre"] == 1, key
        if key != "model":
            (src,) = sec["images"]
            assert src.startswith("data:image/png;base64,")
            assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "--plot traces.png" in p.sections["traces"]["cmd"]
    assert "After pruning" in text and "Fisher (empirical): trace" in text


def test_sections_subset_and_bad_options(runner, tmp_path):
    model = write_mlp(tmp_path / "m.safetensors", sizes=(5, 6, 3))
    data = write_data(tmp_path / "d.safetensors", n=8, d=5)
    out = tmp_path / "r.html"
    r = runner.invoke(app, ["report", str(model), "--sections", "model", "-o", str(out)])
    assert r.exit_code == 0, r.output
    p = _Page()
    p.feed(out.read_text())
    assert list(p.sections) == ["model"]
    for args, message in [
        (["--sections", "model,nope"], "unknown section"),
        (["-o", str(tmp_path / "r.pdf")], "HTML page"),
        (["-o", str(model)], "HTML page"),
        (["-o", str(tmp_path / "missing" / "r.html")], "does not exist"),
    ]:
        r = runner.invoke(app, ["report", str(model), str(data), *args])
        assert r.exit_code == 2 and message in r.output, r.output
    r = runner.invoke(app, ["report", str(model), "-o", str(out)])
    assert r.exit_code == 2 and "needs DATA" in r.output
    # a section whose command fails: the page says so, the exit code is the command's
    bad = tmp_path / "bad.html"
    args = ["report", str(model), "--sections", "model", "--arch", "mlp:nope", "-o", str(bad)]
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "section 'Model summary' failed" in r.output
    assert 'class="error"' in bad.read_text() and "nope" in bad.read_text()


def _chromium(url: str, tmp: Path) -> tuple[str, str]:
    """DOM after load and the browser's log, from a fresh headless profile."""
    proc = subprocess.run(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", f"--user-data-dir={tmp / 'profile'}",
            "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
            "--dump-dom", url,
        ],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, proc.stderr


def _console_errors(log: str) -> list[str]:
    """The page's console messages (Chromium logs them as ``INFO:CONSOLE``); the report's
    page writes none unless something failed, so any one is an error."""
    return [line for line in log.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed")
def test_chromium_renders_the_page_without_console_errors(page, tmp_path):
    dom, log = _chromium(page.as_uri(), tmp_path)
    for key in SECTIONS:
        assert f'id="{key}"' in dom
    assert 'data-images="ok"' in dom  # every embedded figure decoded
    assert not _console_errors(log), _console_errors(log)
    # the detector itself: a page with an undecodable figure is caught
    bad = tmp_path / "bad.html"
    bad.write_text(page.read_text().replace("base64,iVBOR", "base64,AAAA", 1))
    dom, log = _chromium(bad.as_uri(), tmp_path)
    assert 'data-images="broken"' in dom and _console_errors(log)
