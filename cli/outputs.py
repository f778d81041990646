"""Where a command's results go: every output path checked before any compute, then the
report printed (rich or JSON), written to ``-o`` and gated by ``--fail-if`` / ``--strict``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console

from gmcurv.cli.consoles import note, stderr, stdout
from gmcurv.errors import ConfigError, ConvergenceError
from gmcurv.io.fileio import atomic_write_text, check_writable, ensure_not_input
from gmcurv.results import Report, iter_estimates
from gmcurv.rules import evaluate, parse_rules

# output options (parameter name -> option) checked by `check_output_paths`
OUTPUT_OPTIONS = {
    "output": "-o/--output",
    "plot": "--plot",
    "report_path": "--report",
    "save_pruned": "--save-pruned",
    "save_grid_to": "--save-grid",
    "save_vectors_to": "--save-vectors",
    "export": "--export",
}


def check_output_paths(
    ctx: typer.Context, inputs: list[Path], extra: dict[str, Path | None] | None = None
) -> None:
    """Every output path of the command (`OUTPUT_OPTIONS` plus `extra`) is refused before
    any compute when it is an input (or inside one), when two outputs coincide, or when its
    directory is missing or not writable."""
    outputs = {
        option: Path(value)
        for name, option in OUTPUT_OPTIONS.items()
        if isinstance(value := ctx.params.get(name), (str, Path))
    }
    outputs.update({k: Path(v) for k, v in (extra or {}).items() if v is not None})
    seen: dict[Path, str] = {}
    for option, path in outputs.items():
        if option == "--export" and (path.is_dir() or not path.suffix):
            ensure_not_input(path, inputs, option)  # a directory of adapters
            continue
        if option == "--save-pruned" and (path.is_dir() or path.suffix != ".safetensors"):
            from gmcurv.io.pruned import check_directory_output

            ensure_not_input(path, inputs, option)  # a save_pretrained-layout directory
            check_directory_output(path, option)
            continue
        ensure_not_input(path, inputs, option)
        check_writable(path, option)
        key = path.expanduser().resolve()
        if key in seen:
            raise ConfigError(
                f"{seen[key]} and {option} both name {path}",
                hint="give each output its own file name",
            )
        seen[key] = option


def publish(
    report: Report,
    render: Callable[[Report, Console], None],
    *,
    output: Path | None,
    fail_if: list[str] | None,
    strict: bool,
    main: bool,
    inputs: list[Path],
    json_mode: bool,
    quiet: bool,
) -> None:
    """Print, write ``-o``, then gate: exit 1 on a breached rule, 3 on non-convergence.
    Off the main rank (torchrun) nothing is printed or written; a breach still exits 1."""
    rules = [r for text in (fail_if or []) for r in parse_rules(text)]
    doc = report.to_dict()
    verdicts = evaluate(doc, rules) if rules else []  # bad paths fail before output
    breached = [v for v in verdicts if v.breached]
    if not main:
        if breached:
            raise typer.Exit(1)
        return
    if output is not None:
        ensure_not_input(output, inputs)
        atomic_write_text(output, report.to_json() + "\n")
    if json_mode:
        typer.echo(report.to_json())
    else:
        render(report, stdout)
        if output is not None:
            note(f"report written to {output}", quiet)
    for v in verdicts:
        mark = "[red]FAIL[/red]" if v.breached else "[green]ok[/green]"
        if not quiet or v.breached:
            stderr.print(f"{mark} {v.rule} (actual {v.actual:.6g})")
    if strict:
        stuck = [p for p, e in iter_estimates(doc.get("results", {})) if not e["converged"]]
        if stuck:
            raise ConvergenceError(
                f"{len(stuck)} estimate(s) did not converge: {', '.join(stuck[:5])}",
                hint="raise --max-iters / --probes, or loosen --tol",
            )
    if breached:
        raise typer.Exit(1)
