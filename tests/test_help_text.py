"""Help text renders as written: rich turns ``:name:`` into an emoji (``module:factory:``
became 🏭 in ``--arch``'s help), so no command's help may contain one."""

from __future__ import annotations

import re

import pytest

from gmcurv.cli.app import app

EMOJI = re.compile("[\U0001f000-\U0001faff\u2600-\u27bf]")
COMMANDS = ["trace", "eigen", "spectrum", "saliency", "landscape", "lora", "info", "report"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_no_emoji(runner, command):
    r = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert not EMOJI.findall(r.output), EMOJI.findall(r.output)
