"""The ``gmcurv`` command: one Typer app, one module per command.

Errors from the engine (`gmcurv.errors`) become one message on stderr and their exit
code (2 bad input, 3 non-convergence); anything unexpected becomes a one-line internal
error (exit 4) — never a traceback unless ``GMCURV_DEBUG=1``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import types
from typing import Any

import typer
from rich.markup import escape
from typer.core import TyperGroup

from gmcurv import __version__
from gmcurv.cli.consoles import stderr
from gmcurv.cli.options import default_map
from gmcurv.errors import GmcurvError

INTERNAL_ERROR = 4
HELP_OPTION_NAMES = ["-h", "--help"]


def _deferred(module: str, name: str) -> type:
    """A stand-in for ``module.name`` that imports the real class on first real use."""

    def real() -> Any:
        return getattr(importlib.import_module(module), name)

    class Deferred(type):
        def __getattr__(cls, attr: str) -> Any:
            return getattr(real(), attr)

        def __call__(cls, *args: Any, **kwargs: Any) -> Any:
            return real()(*args, **kwargs)

        def __instancecheck__(cls, obj: object) -> bool:
            return isinstance(obj, real())

    return Deferred(name, (), {"__module__": module})


def import_rich_utils_lightly() -> None:
    """Import ``typer.rich_utils`` (the help formatter) without ``rich.markdown`` (markdown_it,
    pygments) and ``rich.traceback`` (attrs): it imports them at the top but uses them only for
    markdown help and pretty tracebacks, both off here. Each is stood in for by a class that
    loads the real one when called; the real modules stay importable afterwards."""
    if "typer.rich_utils" in sys.modules:
        return
    stubs = {}
    for module, name in (("rich.markdown", "Markdown"), ("rich.traceback", "Traceback")):
        if module not in sys.modules:
            stubs[module] = sys.modules[module] = types.ModuleType(module)
            setattr(stubs[module], name, _deferred(module, name))
    try:
        importlib.import_module("typer.rich_utils")
    finally:
        for module, stub in stubs.items():
            if sys.modules.get(module) is stub:
                del sys.modules[module]


import_rich_utils_lightly()

# Typer either uses click or vendors it (typer._click): take the exceptions from whichever
# implementation its group class is built on, so usage errors keep click's exit code 2.
_click = importlib.import_module(TyperGroup.__mro__[1].__module__.rsplit(".", 1)[0])
_PASS_THROUGH = tuple(
    {
        exc
        for mod in (_click.exceptions, typer)
        for name in ("ClickException", "Exit", "Abort")
        if isinstance(exc := getattr(mod, name, None), type)
    }
)


class GmcurvGroup(TyperGroup):
    """Turns engine errors into messages and exit codes; routes warnings to stderr.

    Commands load on first use (`load_command`): listing them for ``--help`` uses
    `COMMAND_HELP` and imports none of them, so neither torch nor matplotlib.
    """

    _listing = False

    def list_commands(self, ctx):
        return [name for name in COMMANDS if name in self.commands or _available(name)]

    def get_command(self, ctx, name):
        if name not in self.commands and name in COMMANDS:
            if self._listing:
                return _stub(name)
            command = load_command(name)
            if command is None:
                return None
            self.commands[name] = command
        return super().get_command(ctx, name)

    def format_help(self, ctx, formatter):
        self._listing = True
        try:
            return super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def get_help_option(self, ctx):
        return _unset_help_is_false(super().get_help_option(ctx))

    def make_context(self, info_name, args, parent=None, **extra):
        # config-file defaults are read per invocation, from the working directory
        try:
            extra.setdefault("default_map", default_map(COMMANDS))
        except GmcurvError as e:
            _print_error(e.message, e.hint)
            raise typer.Exit(e.exit_code) from None
        return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: typer.Context):
        from gmcurv.cli.session import warnings_to_stderr  # not needed for the command list

        with warnings_to_stderr(), _leave_process_group():
            try:
                return super().invoke(ctx)
            except GmcurvError as e:
                if os.environ.get("GMCURV_DEBUG"):
                    raise
                dist = sys.modules.get("gmcurv.distributed")  # not loaded: no process group
                comm = dist.current() if dist is not None else None
                if comm and comm.active and not comm.main and isinstance(e, dist.DistributedError):
                    raise typer.Exit(e.exit_code) from None  # rank 0 reports it
                # one write per line: under torchrun the ranks share stderr
                who = f"[dim]rank {comm.rank}:[/dim] " if comm and comm.active else ""
                stderr.print(
                    f"{who}[bold red]error:[/bold red] {escape(e.message)}",
                    markup=True,
                    highlight=False,
                    soft_wrap=True,
                )
                if e.hint:
                    stderr.print(f"[dim]hint:[/dim] {escape(e.hint)}", soft_wrap=True)
                raise typer.Exit(e.exit_code) from None
            except _click.exceptions.UsageError as e:
                _print_error(e.format_message(), usage_hint(e))
                raise typer.Exit(2) from None
            except _PASS_THROUGH:
                raise
            except KeyboardInterrupt:
                stderr.print("[red]interrupted[/red]")
                raise typer.Exit(130) from None
            except MemoryError:
                if os.environ.get("GMCURV_DEBUG"):
                    raise
                stderr.print(
                    "[bold red]error:[/bold red] out of memory",
                )
                stderr.print(
                    "[dim]hint:[/dim] lower --batch-size or --samples, or restrict --layers"
                )
                raise typer.Exit(2) from None
            except Exception as e:
                if os.environ.get("GMCURV_DEBUG"):
                    raise
                stderr.print(
                    f"[bold red]internal error:[/bold red] {type(e).__name__}: {e}",
                    soft_wrap=True,
                )
                stderr.print(
                    "[dim]hint:[/dim] rerun with GMCURV_DEBUG=1 for the traceback and report it"
                )
                raise typer.Exit(INTERNAL_ERROR) from None


def _unset_help_is_false(option):
    """Typer coerces an unset flag (None) through a pydantic adapter, importing pydantic
    (~0.1 s) for a group's help flag before a subcommand's ``--help`` is seen: default it
    to False, a bool, which typer passes through."""
    if option is not None and option.default is None:
        option.default = False
    return option


def _help_flags_default_false(command) -> None:
    """`_unset_help_is_false` for a loaded command group (``head``) and its subgroups."""
    for sub in getattr(command, "commands", {}).values():
        _help_flags_default_false(sub)
    if hasattr(command, "commands"):
        ctx = _click.Context(command, help_option_names=HELP_OPTION_NAMES)
        _unset_help_is_false(command.get_help_option(ctx))


def _print_error(message: str, hint: str | None) -> None:
    stderr.print(
        f"[bold red]error:[/bold red] {message}", markup=True, highlight=False, soft_wrap=True
    )
    if hint:
        stderr.print(f"[dim]hint:[/dim] {hint}", soft_wrap=True, highlight=False)


def _call(f, *args):
    try:
        return f(*args) if callable(f) else f
    except Exception:
        return None


def usage_hint(e: Exception) -> str:
    """A fix for a command-line usage error: the accepted values of the option at fault,
    where a bad default came from (environment, config file), and where the help is."""
    ctx = getattr(e, "ctx", None)
    where = f"gmcurv {ctx.info_name} --help" if ctx is not None and ctx.parent else "gmcurv --help"
    param = getattr(e, "param", None)
    if param is None:
        return f"see {where} for the commands and options"
    accepted = ""
    kind = _call(getattr(param, "bare_type", None)) or str(getattr(param, "type", ""))
    shown = str(_call(getattr(param, "display_type", None), ctx) or "")
    lo, hi = getattr(param, "min", None), getattr(param, "max", None)
    what = "an integer" if "int" in str(kind).lower() else "a number"
    if "|" in shown:
        accepted = "one of " + shown.strip("<>").replace("|", ", ")
    elif lo is not None or hi is not None:
        bounds = [f">= {lo}" if lo is not None else "", f"<= {hi}" if hi is not None else ""]
        accepted = f"{what} {' and '.join(b for b in bounds if b)}"
    elif str(kind).lower() in ("int", "float"):
        accepted = what
    name = (getattr(param, "opts", None) or [param.name])[0]
    origin = ""
    envvar = getattr(param, "envvar", None)
    if isinstance(envvar, str) and os.environ.get(envvar):
        origin = f" (currently from the environment variable {envvar})"
    elif ctx is not None and ctx.default_map and param.name in ctx.default_map:
        from gmcurv.cli.options import read_config_file

        origin = f" (currently from {read_config_file()[1]})"
    return f"give {name} {accepted or 'a valid value'}{origin}; see {where}"


@contextlib.contextmanager
def _leave_process_group():
    try:
        yield
    finally:
        if "gmcurv.distributed" in sys.modules:  # nothing to leave if torch never loaded
            sys.modules["gmcurv.distributed"].shutdown()


COMMANDS = [
    "info", "trace", "eigen", "spectrum", "saliency", "landscape", "lora", "head", "check",
    "report",
]  # fmt: skip
# one line per command for ``gmcurv --help`` (the first line of its docstring; a test keeps
# them in sync), so that listing the commands imports none of them
COMMAND_HELP = {
    "info": "Architecture, layers (and how each is captured), parameter counts and metadata.",
    "trace": "Curvature traces, total and per layer, with the top eigenvalues.",
    "eigen": "Top-k eigenvalues with residuals and a converged flag.",
    "spectrum": "Eigenvalue spectral density (stochastic Lanczos quadrature, Gaussian broadening).",
    "saliency": "Pruning saliency (magnitude, OBD, OBS) per tensor and what pruning would cost.",
    "landscape": "Loss on a 1-D / 2-D grid around the weights: L(θ0 + α d1 + β d2).",
    "lora": "LoRA adapters: features of ΔW = s·B·A that do not depend on the factorisation.",
    "head": "Build the model zoo, train, evaluate and describe the GradMetaNet head.",
    "check": "Exit 1 if any RULE holds for REPORT.",
    "report": "One self-contained HTML page with every analysis, each with its command.",
}


def _available(name: str) -> bool:
    return importlib.util.find_spec(f"gmcurv.cli.{name}") is not None


def _stub(name: str):
    """A placeholder carrying only the short help (for the command list)."""
    from typer.core import TyperCommand

    return TyperCommand(name, help=COMMAND_HELP.get(name, ""))


def load_command(name: str):
    """Import ``gmcurv.cli.<name>`` and build its click command (None if absent)."""
    try:
        module = importlib.import_module(f"gmcurv.cli.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"gmcurv.cli.{name}":
            raise
        return None
    sub = typer.Typer(rich_markup_mode="rich")
    module.register(sub)
    group = typer.main.get_group(sub)
    command = group.commands.get(name)
    _help_flags_default_false(command)
    return command


app = typer.Typer(
    cls=GmcurvGroup,
    name="gmcurv",
    help="Curvature and loss-landscape analysis for PyTorch checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": HELP_OPTION_NAMES},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gmcurv {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """Curvature and loss-landscape analysis for PyTorch checkpoints.

    With MODEL and DATA left out, commands run on the bundled sample model.
    """


def main() -> None:
    """Run the command line (SIGINT -> exit 130, SIGTERM -> 143, see `signals`; the garbage
    collector held through start-up, see `startup`). The ``gmcurv`` script enters through
    `gmcurv.__main__.main`, which does both before this module is imported."""
    from gmcurv.cli import signals, startup

    startup.hold()
    signals.install()
    startup.run_then_exit(app)
