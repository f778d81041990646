"""Start-up: ``--help``, ``COMMAND --help`` and ``check`` import neither torch nor matplotlib
(nor numpy, scipy, transformers, safetensors; the help screens not even pydantic or
rich.markdown), checked through ``sys.modules`` in a fresh interpreter, not by timing; and
the start-up collector policy (`gmcurv.cli.startup`): off through start-up, on (start-up's
objects frozen) for load and compute, untouched by commands run in-process."""

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

    HEAVY = ("torch", "matplotlib", "numpy", "scipy", "transformers", "safetensors")
    HELP_ONLY = ("pydantic", "rich.markdown", "rich.traceback", "markdown_it", "gmcurv.cli.session")

    def loaded(names):
        return [m for m in names if m in sys.modules]

    cli = get_command(app)
    codes = []

    def run(args):
        try:
            codes.append(cli.main(args, prog_name="gmcurv", standalone_mode=False) or 0)
        except SystemExit as e:
            codes.append(e.code)
        except BaseException as e:  # typer.Exit from check
            codes.append(getattr(e, "exit_code", repr(e)))

    run(["--help"])
    root = loaded(HEAVY + HELP_ONLY)
    helps = [[c, "--help"] for c in COMMANDS] + [["head", s, "--help"] for s in HEAD]
    for args in helps:
        run(args)
    after_help = loaded(HEAVY + HELP_ONLY[:-1])
    run(["check", sys.argv[1], "fisher.trace > 100"])
    run(["check", sys.argv[2], "fisher.trace > 100"])  # an error message, exit 2
    heavy = loaded(HEAVY)
    print(json.dumps({"codes": codes, "root": root, "help": after_help, "heavy": heavy}))
    """
).replace("HEAD", repr(["zoo", "train", "eval", "info"]))


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
    assert doc["root"] == [], doc  # `gmcurv --help`: not even a command module
    assert doc["help"] == [], doc  # every `gmcurv COMMAND --help`
    assert doc["heavy"] == [], doc  # and `gmcurv check`
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


def test_help_formatter_without_markdown_still_works():
    """typer.rich_utils is imported with stand-ins for rich.markdown / rich.traceback
    (`import_rich_utils_lightly`); they load the real classes on first use."""
    code = textwrap.dedent(
        """
        import sys
        import gmcurv.cli.app
        import typer.rich_utils as r
        assert "rich.markdown" not in sys.modules and "rich.traceback" not in sys.modules
        m = r.Markdown("# title")
        import rich.markdown, rich.traceback
        assert type(m) is rich.markdown.Markdown and isinstance(m, r.Markdown)
        real = rich.traceback.Traceback.from_exception
        assert r.Traceback.from_exception.__func__ is real.__func__
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip() == "ok"


# ----------------------------------------------------------- the start-up collector policy
ENTRY = textwrap.dedent(
    """
    import atexit, gc, json, sys
    state = {}

    def dump():  # registered first: runs last, after the command
        heavy = [m for m in ("torch", "matplotlib", "sympy") if m in sys.modules]
        omp = __import__("os").environ.get("OMP_WAIT_POLICY")
        print(json.dumps({**state, "heavy": heavy, "enabled_at_exit": gc.isenabled(), "omp": omp}))

    atexit.register(dump)
    if sys.argv[-1] == "spy":  # spy on start-up (torch's lazy imports) and on the compute
        sys.argv.pop()
        from gmcurv.cli import session, trace

        warm, compute = session.warm_up_autograd, trace.fisher_results

        def warm_spy(*a, **k):
            state["startup"] = {"enabled": gc.isenabled()}
            return warm(*a, **k)

        def compute_spy(*a, **k):
            state["compute"] = {"enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}
            return compute(*a, **k)

        session.warm_up_autograd, trace.fisher_results = warm_spy, compute_spy
    import runpy
    sys.argv = ["gmcurv", *sys.argv[1:]]
    runpy.run_module("gmcurv", run_name="__main__", alter_sys=True)
    """
)


def _entry(*args: str, cwd) -> dict:
    """``python -m gmcurv ARGS`` (the console script's entry, `gmcurv.__main__.main`)."""
    out = subprocess.run(
        [sys.executable, "-c", ENTRY, *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env={**__import__("os").environ, "GMCURV_NO_CONFIG": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_help_through_the_entry_point_imports_neither_torch_nor_matplotlib(tmp_path):
    for args in (["--help"], ["trace", "--help"]):
        doc = _entry(*args, cwd=tmp_path)
        assert doc["heavy"] == [], (args, doc)


def test_collector_is_off_for_start_up_and_on_with_imports_frozen_for_compute(tmp_path):
    """The command line holds the cyclic collector through start-up (torch's lazy imports)
    and turns it back on, the start-up's objects frozen, before load and compute."""
    doc = _entry("trace", "-q", "-o", str(tmp_path / "r.json"), "spy", cwd=tmp_path)
    assert doc["startup"] == {"enabled": False}, doc
    assert doc["compute"]["enabled"] is True, doc
    assert doc["compute"]["frozen"] > 10_000, doc  # torch's modules, out of every collection
    assert doc["enabled_at_exit"] is True
    assert json.loads((tmp_path / "r.json").read_text())["results"]["fisher"]["trace"]["value"] > 0


def test_startup_hold_pinned_release():
    import gc

    from gmcurv.cli import startup

    assert gc.isenabled() and not startup.held()
    frozen = gc.get_freeze_count()
    startup.release()  # not held (a library or test process): the collector is left alone
    assert gc.isenabled() and gc.get_freeze_count() == frozen
    try:
        startup.hold()
        assert not gc.isenabled() and startup.held()
        with startup.pinned():
            with startup.pinned():
                startup.release()  # inside a session's start-up: still held
                assert not gc.isenabled()
            assert not gc.isenabled()  # the outermost block releases
        assert gc.isenabled() and not startup.held()
        assert gc.get_freeze_count() >= frozen
        startup.release()  # twice: no-op
        assert gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()
        startup._held = False


def test_commands_run_in_process_leave_the_collector_alone(runner, tmp_path):
    """``CliRunner`` (and ``report``'s in-process commands) do not go through the process
    entry: no command turns the collector off or freezes the caller's objects."""
    import gc

    from gmcurv.cli.app import app

    frozen = gc.get_freeze_count()
    res = runner.invoke(app, ["info", "-q", "--json"])
    assert res.exit_code == 0, res.output
    assert gc.isenabled() and gc.get_freeze_count() == frozen


EXIT = textwrap.dedent(
    """
    import atexit, sys, threading, time
    from gmcurv.cli import startup
    atexit.register(lambda: print("atexit ran"))
    if sys.argv[1] == "thread":  # a thread still working: the ordinary exit waits for it
        threading.Thread(target=lambda: (time.sleep(0.3), print("thread done"))).start()
    print("buffered", end=" ")
    startup.run_then_exit(lambda: sys.exit(3))
    """
)


def test_exit_without_teardown_flushes_runs_atexit_and_keeps_the_code():
    for mode, expected in (("plain", "buffered atexit ran"), ("thread", "thread done")):
        out = subprocess.run(
            [sys.executable, "-c", EXIT, mode], capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 3, out.stderr
        assert expected in out.stdout and "atexit ran" in out.stdout, out.stdout


def test_passive_waits_only_on_a_busy_machine_unless_the_user_chose(monkeypatch, tmp_path):
    """`passive_waits`: OMP_WAIT_POLICY=PASSIVE (and `BUSY` for a note) when the 1-minute
    load average is above the core count at entry; idle: unset; a user's policy kept. The
    real entry point sets it before torch loads (the process's environment at exit)."""
    import os

    from gmcurv.cli import startup

    monkeypatch.setattr(startup, "BUSY", None)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.1, 0.1))
    startup.passive_waits()
    assert "OMP_WAIT_POLICY" not in os.environ and startup.BUSY is None
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0 * (os.cpu_count() or 1), 1.0, 1.0))
    startup.passive_waits()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and "cores" in (startup.BUSY or "")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setattr(startup, "BUSY", None)
    startup.passive_waits()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE" and startup.BUSY is None
    assert _entry("--help", cwd=tmp_path)["omp"] == "ACTIVE"  # the user's, through the entry
