"""``gmcurv report``: one self-contained HTML page with every analysis of a checkpoint.

The page is assembled from the other commands, run in this process exactly as a user would
run them (``info``, ``trace``, ``spectrum``, ``saliency``, ``landscape``, each with ``-o`` and
``--plot`` into a temporary directory): no computation of its own, the same numbers, tables
and figures, and each section shows the command that reproduces it. Figures are embedded as
base64 PNG and tables as pre-rendered text, so the file needs no network and no scripts
beyond a check that the images decoded.
"""

from __future__ import annotations

import html
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from gmcurv.cli import options as o
from gmcurv.errors import ConfigError

SECTIONS = ("model", "traces", "eigenvalues", "spectrum", "saliency", "landscape")

HtmlOutputOpt = Annotated[
    Path,
    typer.Option("--output", "-o", help="The HTML file to write.", show_default=True),
]
SectionsOpt = Annotated[
    str,
    typer.Option(
        "--sections",
        help=f"Comma-separated sections to include (of {', '.join(SECTIONS)}).",
    ),
]
CurvatureAllOpt = Annotated[
    o.Curvature,
    typer.Option("--curvature", help="Curvature(s) of the traces section."),
]


@dataclass
class Section:
    """One part of the page: what ran, its tables (as text) and figure (PNG bytes)."""

    key: str
    title: str
    command: list[str]
    text: str = ""
    png: bytes | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    exit_code: int = 0


def _parse_sections(text: str) -> list[str]:
    wanted = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in wanted if s not in SECTIONS]
    if bad or not wanted:
        raise ConfigError(
            f"--sections {text!r}: unknown section(s) {', '.join(bad) or '(none given)'}",
            hint=f"choose from {', '.join(SECTIONS)}",
        )
    return [s for s in SECTIONS if s in wanted]


def _accepted(command: str) -> set[str]:
    """Parameter names a gmcurv command accepts."""
    from gmcurv.cli.app import load_command

    return {p.name for p in load_command(command).params}  # type: ignore[union-attr]


def _flags(command: str, shared: dict[str, Any]) -> list[str]:
    accepted = _accepted(command)
    out: list[str] = []
    for name, value in shared.items():
        if value is None or name not in accepted:
            continue
        out += ["--" + name.replace("_", "-"), str(getattr(value, "value", value))]
    return out


def _run(argv: list[str]) -> tuple[int, str]:
    """Run a gmcurv command in this process; (exit code, what it printed on stderr)."""
    import contextlib
    import io

    from gmcurv.cli import session as session_mod
    from gmcurv.cli.app import app

    err = io.StringIO()
    # the command's notes and errors, kept for the page; the console's own file setting
    # (None: whatever sys.stderr is at print time) is put back afterwards
    saved = session_mod.stderr._file
    session_mod.stderr.file = err
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            code = app(args=argv, prog_name="gmcurv", standalone_mode=False)
    except SystemExit as e:  # pragma: no cover - standalone_mode=False returns instead
        code = e.code if isinstance(e.code, int) else 1
    finally:
        session_mod.stderr._file = saved
    return int(code or 0), err.getvalue()


def _render_text(doc: dict[str, Any], command: str) -> str:
    """The command's own tables, rendered from its JSON report at 100 columns."""
    import importlib
    import io

    from rich.console import Console

    from gmcurv.results import DataInfo, ModelInfo, Report

    module = importlib.import_module(f"gmcurv.cli.{command}")
    report = Report(
        command=doc["command"],
        config=doc["config"],
        seed=doc["seed"],
        device=doc["device"],
        dtype=doc["dtype"],
        model=ModelInfo(**doc["model"]) if doc.get("model") else None,
        data=DataInfo(**doc["data"]) if doc.get("data") else None,
        results=doc["results"],
        timings=doc.get("timings", {}),
        warnings=doc.get("warnings", []),
    )
    console = Console(width=100, file=io.StringIO(), record=True, color_system=None)
    module.render(report, console)
    return console.export_text()


def _shown_command(argv: list[str], tmp: Path, names: dict[str, str]) -> str:
    """The argv a user would type: temporary paths replaced by plain file names."""
    shown = []
    for a in argv:
        p = str(a)
        if p.startswith(str(tmp)):
            p = names.get(Path(p).name, Path(p).name)
        shown.append(p)
    return "gmcurv " + shlex.join(shown)


def collect(
    model: Path | None,
    data: Path | None,
    sections: list[str],
    shared: dict[str, Any],
    curvature: str,
    tmp: Path,
    progress=None,
) -> list[Section]:
    """Run each command the sections need and gather their tables and figures."""
    import json

    from gmcurv.cli.plots.spectrum import plot_eigenvalues

    pos = [str(p) for p in (model, data) if p is not None]
    plan: list[tuple[str, str, str, list[str]]] = []  # key, title, command, extra args
    if "model" in sections:
        plan.append(("model", "Model summary", "info", []))
    if "traces" in sections or "eigenvalues" in sections:
        plan.append(("traces", "Curvature traces", "trace", ["--curvature", curvature]))
    if "spectrum" in sections:
        plan.append(("spectrum", "Hessian eigenvalue spectrum", "spectrum", []))
    if "saliency" in sections:
        plan.append(("saliency", "Pruning saliency and sweep", "saliency", []))
    if "landscape" in sections:
        plan.append(("landscape", "Loss landscape (random plane)", "landscape", []))
    out: list[Section] = []
    for key, title, command, extra in plan:
        if progress:
            progress(f"{title}: gmcurv {command}")
        json_path, png = tmp / f"{key}.json", tmp / f"{key}.png"
        argv = [command, *(pos[:1] if command == "info" else pos), *extra]
        argv += _flags(command, shared)
        if command != "info":
            argv += ["--plot", str(png)]
        shown = _shown_command(argv, tmp, {png.name: f"{key}.png"})
        argv += ["-o", str(json_path), "-q"]
        sec = Section(key, title, argv, notes=[shown])
        code, err = _run(argv)
        if code != 0 or not json_path.exists():
            sec.error = err.strip() or f"gmcurv {command} exited with code {code}"
            sec.exit_code = code or 4
            out.append(sec)
            continue
        doc = json.loads(json_path.read_text())
        sec.text = _render_text(doc, command)
        sec.png = png.read_bytes() if png.exists() else None
        if key == "traces" and "traces" in sections:
            out.append(sec)
        if key == "traces" and "eigenvalues" in sections:
            eig_png = tmp / "eigenvalues.png"
            plot_eigenvalues(doc["results"], eig_png)  # the same numbers, their own figure
            out.append(
                Section(
                    "eigenvalues",
                    "Top eigenvalues",
                    argv,
                    text=_eigen_text(doc["results"]),
                    png=eig_png.read_bytes(),
                    notes=[shown + "   (the top-k eigenvalues of the traces run, -k)"],
                )
            )
        elif key != "traces":
            out.append(sec)
    return out


def _eigen_text(results: dict[str, Any]) -> str:
    from gmcurv.cli.render import fmt

    lines = []
    for name in ("fisher", "ggn", "hessian"):
        block = results.get(name) or {}
        eigs = block.get("eigenvalues") or []
        if eigs:
            vals = ", ".join(fmt(e["value"]) for e in eigs)
            lines.append(f"{name}: {vals}   ({eigs[0]['method']})")
    return "\n".join(lines) or "no eigenvalues computed"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
nav a { margin-right: 1em; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; font-size: 12px; line-height: 1.3; }
code.cmd { display: block; background: #272822; color: #f8f8f2; padding: .5em .8em;
           white-space: pre-wrap; font-size: 13px; }
img { max-width: 100%; height: auto; display: block; margin: 1em 0; }
.error { color: #b00020; white-space: pre-wrap; }
footer { color: #777; font-size: 12px; margin-top: 3em; }
"""

_CHECK = """
window.addEventListener("load", function () {
  var bad = Array.prototype.filter.call(document.images, function (i) {
    return !(i.complete && i.naturalWidth > 0);
  });
  document.body.setAttribute("data-images", bad.length ? "broken" : "ok");
  if (bad.length) { console.error("gmcurv report: " + bad.length + " figure(s) did not decode"); }
});
"""


def to_html(sections: list[Section], title: str, subtitle: str) -> str:
    """The page: navigation, then per section the command, the figure and the tables."""
    import base64

    nav = " ".join(f'<a href="#{s.key}">{html.escape(s.title)}</a>' for s in sections)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'\">",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p><nav>{nav}</nav>",
    ]
    for s in sections:
        parts.append(f'<section id="{s.key}" class="section"><h2>{html.escape(s.title)}</h2>')
        for note in s.notes:
            parts.append(f'<code class="cmd">{html.escape(note)}</code>')
        if s.error:
            parts.append(f'<p class="error">{html.escape(s.error)}</p>')
        if s.png:
            data = base64.b64encode(s.png).decode("ascii")
            parts.append(f'<img alt="{html.escape(s.title)}" src="data:image/png;base64,{data}">')
        if s.text:
            parts.append(f"<pre>{html.escape(s.text)}</pre>")
        parts.append("</section>")
    parts.append(f"<footer>{html.escape(subtitle)}</footer>")
    parts.append(f"<script>{_CHECK}</script></body></html>")
    return "\n".join(parts) + "\n"


def report(
    ctx: typer.Context,
    model: o.ModelArg = None,
    data: o.DataArg = None,
    output: HtmlOutputOpt = Path("report.html"),
    sections: SectionsOpt = ",".join(SECTIONS),
    curvature: CurvatureAllOpt = o.Curvature.all,
    samples: o.SamplesOpt = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            "-b",
            min=1,
            help="Examples per batch (default: each command's own).",
            show_default=False,
        ),
    ] = None,
    device: o.DeviceOpt = "auto",
    dtype: o.DTypeOpt = o.DType.float32,
    seed: o.SeedOpt = 0,
    mode: o.ModeOpt = o.Mode.eval,
    arch: o.ArchOpt = None,
    loss: o.LossOpt = None,
    quiet: o.QuietOpt = False,
) -> None:
    """One self-contained HTML page with every analysis, each with its command.

    Model summary, traces, eigenvalues, spectrum, saliency sweep and a landscape, each
    with the command that reproduces it.

    Runs the other commands in this process (same numbers, tables and figures) and embeds
    their output; the page loads nothing from the network.

    Examples: [bold]gmcurv report -o report.html[/bold] (bundled sample) ·
    [bold]gmcurv report m.safetensors d/ --sections model,traces,landscape -o r.html[/bold]
    """
    import datetime
    import tempfile

    from gmcurv import __version__
    from gmcurv.cli.session import stderr
    from gmcurv.io.fileio import atomic_write_text, ensure_not_input

    wanted = _parse_sections(sections)
    if output.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"-o {output}: the report is an HTML page", hint="use a .html file name")
    if model is not None and data is None and any(s != "model" for s in wanted):
        raise ConfigError(
            "gmcurv report needs DATA for every section but the model summary",
            hint="gmcurv report MODEL DATA -o report.html (or --sections model)",
        )
    ensure_not_input(output, [model, data])
    if not output.expanduser().parent.exists():
        raise ConfigError(
            f"cannot write {output}: directory {output.parent} does not exist",
            hint="create the directory first or choose another output path",
        )
    values = {
        "samples": samples,
        "batch_size": batch_size,
        "device": device,
        "dtype": dtype,
        "seed": seed,
        "mode": mode,
        "arch": arch,
        "loss": getattr(loss, "value", loss),
    }

    def given(name: str) -> bool:  # passed on only when set (else each command's default)
        src = ctx.get_parameter_source(name)
        return src is not None and src.name != "DEFAULT"

    shared = {k: v for k, v in values.items() if given(k)}

    def progress(text: str) -> None:
        if not quiet:
            stderr.print(f"[dim]report:[/dim] {text}")

    with tempfile.TemporaryDirectory(prefix="gmcurv-report-") as tmp:
        parts = collect(model, data, wanted, shared, curvature.value, Path(tmp), progress)
    failed = [s for s in parts if s.error]
    what = f"{model or 'bundled sample model'} on {data or 'its sample data'}"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = to_html(parts, "gmcurv report", f"{what} · gmcurv {__version__} · {stamp}")
    atomic_write_text(output, page)
    for s in failed:
        stderr.print(f"[yellow]warning:[/yellow] section {s.title!r} failed: {s.error}")
    if not quiet:
        stderr.print(f"[dim]note:[/dim] report written to {output} ({len(parts)} sections)")
    if failed:  # the page is written anyway; exit with the failed command's code
        raise typer.Exit(max(s.exit_code for s in failed))


def register(app: typer.Typer) -> None:
    app.command("report")(report)
