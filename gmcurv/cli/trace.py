"""``gmcurv trace``: Fisher / GGN / Hessian traces, total and per layer, and top eigenvalues."""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console

from gmcurv.cli import options as o
from gmcurv.cli.render import fmt, fmt_estimate, footer, header, new_table
from gmcurv.cli.session import Session
from gmcurv.errors import ConfigError
from gmcurv.fisher import fisher_summary
from gmcurv.memory import parse_bytes
from gmcurv.results import Report


def fisher_results(
    session: Session,
    fisher: str,
    mc_samples: int,
    k: int,
    per_layer: bool,
    batch_size: int,
    seed: int,
    max_memory: str | None,
) -> dict[str, Any]:
    """Run the Fisher closed forms with a progress bar; results as a JSON-able dict."""
    assert session.objective is not None and session.data is not None
    with (
        session.stage("fisher"),
        session.progress("Fisher: capturing gradients", session.data.n) as advance,
    ):
        s = fisher_summary(
            session.objective,
            session.data,
            batch_size=batch_size,
            fisher=fisher,
            mc_samples=mc_samples,
            seed=seed,
            k=k,
            per_layer=per_layer,
            budget_bytes=parse_bytes(max_memory) if max_memory else None,
            progress=advance,
        )
    return {
        "loss": s.loss,
        "fisher": {
            "type": s.fisher,
            "n_params": s.n_params,
            "trace": s.trace,
            "eigenvalues": s.eigenvalues,
            "rank": s.rank,
            "per_layer": s.per_layer,
        },
    }


def render(report: Report, console: Console) -> None:
    header(report, console, "gmcurv trace")
    res = report.to_dict()["results"]
    if "loss" in res:
        console.print(f"mean loss {fmt_estimate(res['loss'])}")
    for name in ("fisher", "ggn", "hessian"):
        block = res.get(name)
        if not block:
            continue
        label = name.upper() if name == "ggn" else name.capitalize()
        if name == "fisher":
            label += f" ({block['type']})"
        t = block["trace"]
        table = new_table(
            f"{label}: trace {fmt_estimate(t)}",
            "layer",
            "kind",
            "params",
            "trace",
            "share",
            "λ_max",
        )
        total = t["value"] or 0.0
        for layer, info in block.get("per_layer", {}).items():
            lt = info["trace"]
            eig = info.get("eigenvalues") or []
            share = f"{100 * lt['value'] / total:.1f}%" if total else "—"
            table.add_row(
                layer,
                info["kind"],
                f"{info['n_params']:,}",
                fmt_estimate(lt),
                share,
                fmt(eig[0]["value"]) if eig else "—",
            )
        if block.get("per_layer"):
            console.print(table)
        else:
            console.print(table.title)
        eigs = block.get("eigenvalues") or []
        if eigs:
            vals = ", ".join(fmt_estimate(e) for e in eigs)
            method = eigs[0]["method"]
            extra = f", rank {block['rank']:,}" if block.get("rank") is not None else ""
            console.print(f"top-{len(eigs)} eigenvalues ({method}{extra}): {vals}")
        n = t["n_samples"]
        note = f"N={n:,}, method {t['method']}"
        if t.get("data_stderr") is not None:
            note += f"; sampling s.e. of the trace over examples ±{fmt(t['data_stderr'], 2)}"
        console.print(f"[dim]{note}[/dim]")
    footer(report, console)


def trace(
    ctx: typer.Context,
    model: o.ModelArg = None,
    data: o.DataArg = None,
    curvature: o.CurvatureOpt = o.Curvature.fisher,
    fisher: o.FisherOpt = o.FisherType.empirical,
    method: o.MethodOpt = o.Method.auto,
    samples: o.SamplesOpt = None,
    batch_size: o.BatchSizeOpt = 256,
    probes: o.ProbesOpt = 100,
    k: o.KOpt = 5,
    per_layer: o.PerLayerOpt = True,
    layers: o.LayersOpt = None,
    mc_samples: o.McSamplesOpt = 1,
    device: o.DeviceOpt = "auto",
    dtype: o.DTypeOpt = o.DType.float32,
    seed: o.SeedOpt = 0,
    mode: o.ModeOpt = o.Mode.eval,
    arch: o.ArchOpt = None,
    loss: o.LossOpt = None,
    max_memory: o.MaxMemoryOpt = None,
    json: o.JsonOpt = False,
    output: o.OutputOpt = None,
    quiet: o.QuietOpt = False,
    fail_if: o.FailIfOpt = None,
    strict: o.StrictOpt = False,
) -> None:
    """Curvature traces, total and per layer, with the top eigenvalues.

    Examples: [bold]gmcurv trace[/bold] (bundled sample) ·
    [bold]gmcurv trace model.safetensors data/ --fisher mc --json[/bold] ·
    [bold]gmcurv trace m.safetensors d/ --fail-if "fisher.trace > 100"[/bold]
    """
    if curvature is not o.Curvature.fisher:
        raise ConfigError(
            f"--curvature {curvature.value} is not available in this build",
            hint="use --curvature fisher",
        )
    if method not in (o.Method.auto, o.Method.exact, o.Method.gram):
        raise ConfigError(
            f"--method {method.value} does not apply to the Fisher",
            hint="the Fisher uses exact closed forms on decomposed gradients (--method auto)",
        )
    session = Session.open(
        ctx,
        model,
        data,
        arch=arch,
        loss=loss,
        samples=samples,
        device=device,
        dtype=dtype,
        mode=mode,
        layers=layers,
        seed=seed,
        quiet=quiet,
        json_mode=json,
    )
    results = fisher_results(
        session, fisher.value, mc_samples, k, per_layer, batch_size, seed, max_memory
    )
    session.finish(session.report(results), render, output, fail_if, strict)


def register(app: typer.Typer) -> None:
    app.command("trace")(trace)
