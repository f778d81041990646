"""``gmcurv check``: gate a saved JSON report in CI (exit 1 when a rule is breached)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from gmcurv.cli.render import fmt, new_table
from gmcurv.cli.session import stderr, stdout
from gmcurv.errors import ConfigError
from gmcurv.results import SCHEMA_VERSION
from gmcurv.rules import evaluate, parse_rules


def check(
    report: Annotated[Path, typer.Argument(help="A JSON report written by --json or -o.")],
    rules: Annotated[
        list[str],
        typer.Argument(
            help="Rules such as 'fisher.trace > 100'; the check fails (exit 1) if any holds."
        ),
    ],
    json_out: Annotated[bool, typer.Option("--json", help="Print verdicts as JSON.")] = False,
) -> None:
    """Exit 1 if any RULE holds for REPORT.

    Example: [bold]gmcurv check report.json "fisher.trace > 100"[/bold]
    """
    try:
        doc = json.loads(report.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{report}: no such file", hint="pass a report written by -o") from None
    except (OSError, ValueError, RecursionError) as e:
        raise ConfigError(
            f"{report}: not a JSON report ({e})",
            hint="write one with gmcurv <command> ... -o report.json",
        ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), dict):
        raise ConfigError(
            f"{report}: not a gmcurv report (no 'results' object)",
            hint="write one with gmcurv <command> ... -o report.json",
        )
    if doc.get("schema_version") != SCHEMA_VERSION:
        stderr.print(
            f"[yellow]warning:[/yellow] {report} has schema_version "
            f"{doc.get('schema_version')!r}, this gmcurv reads {SCHEMA_VERSION}"
        )
    parsed = [r for text in rules for r in parse_rules(text)]
    verdicts = evaluate(doc, parsed)
    if json_out:
        typer.echo(
            json.dumps(
                [
                    {"rule": str(v.rule), "actual": v.actual, "breached": v.breached}
                    for v in verdicts
                ],
                indent=2,
            )
        )
    else:
        table = new_table(f"gmcurv check {report}", "rule", "actual", "result")
        for v in verdicts:
            table.add_row(
                str(v.rule), fmt(v.actual), "[red]FAIL[/red]" if v.breached else "[green]ok[/green]"
            )
        stdout.print(table)
    if any(v.breached for v in verdicts):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("check")(check)
