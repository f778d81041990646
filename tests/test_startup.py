"""Start-up: ``--help``, ``COMMAND --help`` and ``check`` import neither torch nor matplotlib
(checked through ``sys.modules`` in a fresh interpreter, not by timing)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from gmcurv.cli.app import COMMAND_HELP, COMMANDS

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from gmcurv.cli.app import COMMANDS, app
    from typer.main import get_command

    cli = get_command(app)
    calls = [["--help"]] + [[c, "--help"] for c in COMMANDS] + [["head", "train", "--help"]]
    calls.append(["check", sys.argv[1], "fisher.trace > 100"])
    calls.append(["check", sys.argv[2], "fisher.trace > 100"])  # an error message, exit 2
    codes = []
    for args in calls:
        try:
            codes.append(cli.main(args, prog_name="gmcurv", standalone_mode=False) or 0)
        except SystemExit as e:
            codes.append(e.code)
        except BaseException as e:  # typer.Exit from check
            codes.append(getattr(e, "exit_code", repr(e)))
    heavy = [m for m in ("torch", "matplotlib", "numpy") if m in sys.modules]
    print(json.dumps({"codes": codes, "heavy": heavy}))
    """
)


def test_help_and_check_import_neither_torch_nor_matplotlib(tmp_path):
    report = tmp_path / "r.json"
    trace = {"value": 3.0, "stderr": None, "n_samples": 1, "method": "exact", "converged": True}
    report.write_text(
        json.dumps({"schema_version": "1.0", "results": {"fisher": {"trace": trace}}})
    )
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(report), str(bad)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env={**__import__("os").environ, "GMCURV_NO_CONFIG": "1"},
    )
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["heavy"] == [], doc
    assert all(code in (0, None) for code in doc["codes"][:-1]), doc
    assert doc["codes"][-1] == 2, doc


def test_static_command_help_matches_docstrings():
    """`gmcurv --help` lists commands from COMMAND_HELP (no imports): keep it in sync."""
    import typer

    from gmcurv.cli.app import load_command

    assert set(COMMAND_HELP) == set(COMMANDS)
    for name in COMMANDS:
        command = load_command(name)
        text = (command.help or "").strip().splitlines()[0].rstrip(";")
        assert COMMAND_HELP[name].startswith(text.rstrip(".")), (name, text)
    assert isinstance(typer.Typer(), typer.Typer)


def test_constants_copied_into_the_cli_match_the_engine():
    from gmcurv import hessian, saliency, woodbury
    from gmcurv.cli import lora as cli_lora
    from gmcurv.cli import saliency as cli_saliency
    from gmcurv.cli import trace as cli_trace
    from gmcurv.lora.curvature import SCALES

    assert cli_trace.DEFAULT_TRACE_RTOL == hessian.DEFAULT_TRACE_RTOL
    assert cli_saliency.DEFAULT_ROUNDS == saliency.DEFAULT_ROUNDS
    assert cli_saliency.LEVELS == saliency.LEVELS
    assert cli_saliency.DEFAULT_DAMPING == woodbury.DEFAULT_DAMPING
    assert cli_lora.SCALES == SCALES
