"""``gmcurv spectrum``: eigenvalue spectral density by stochastic Lanczos quadrature."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

import typer
from rich.console import Console

from gmcurv.cli import options as o
from gmcurv.cli.plots import check_plot_path
from gmcurv.cli.render import fmt, fmt_estimate, footer, header, new_table
from gmcurv.cli.session import Session
from gmcurv.errors import ConfigError
from gmcurv.io.fileio import ensure_not_input
from gmcurv.memory import parse_bytes
from gmcurv.results import Report, to_jsonable


class SpectrumCurvature(str, Enum):
    hessian = "hessian"
    ggn = "ggn"


CurvOpt = Annotated[
    SpectrumCurvature,
    typer.Option("--curvature", envvar="GMCURV_CURVATURE", help="Which curvature matrix."),
]
StepsOpt = Annotated[
    int,
    typer.Option(
        "--max-iters",
        "--steps",
        envvar="GMCURV_MAX_ITERS",
        min=1,
        help="Lanczos steps per probe (quadrature nodes; moments exact to degree 2m-1).",
    ),
]
SigmaOpt = Annotated[
    float,
    typer.Option(
        "--sigma",
        min=1e-9,
        help="Gaussian broadening, relative to the width of the spectrum.",
    ),
]
PointsOpt = Annotated[int, typer.Option("--points", min=10, help="Grid points of the density.")]
METHODS = (o.Method.auto, o.Method.exact, o.Method.lanczos)


def render(report: Report, console: Console) -> None:
    header(report, console, "gmcurv spectrum")
    res = report.to_dict()["results"]
    for name in ("hessian", "ggn"):
        block = res.get(name)
        if not block:
            continue
        label = "Hessian" if name == "hessian" else "GGN"
        nodes = [x for row in block["quadrature"]["nodes"] for x in row]
        table = new_table(f"{label} spectrum ({block['method']})", "quantity", "value")
        table.add_row("λ range (nodes)", f"[{fmt(min(nodes))}, {fmt(max(nodes))}]")
        table.add_row("trace (P · mean λ)", fmt_estimate(block["trace"]))
        for i, m in enumerate(block["moments"]):
            table.add_row(f"mean λ^{i + 1}", fmt_estimate(m))
        table.add_row("probes × steps", f"{block['probes']} × {max(block['quadrature']['steps'])}")
        table.add_row("products", f"{block['n_matvecs']:,}")
        table.add_row("broadening σ", fmt(block["sigma"]))
        console.print(table)
    footer(report, console)


def spectrum(
    ctx: typer.Context,
    model: o.ModelArg = None,
    data: o.DataArg = None,
    curvature: CurvOpt = SpectrumCurvature.hessian,
    method: o.MethodOpt = o.Method.auto,
    probes: o.ProbesOpt = 3,
    steps: StepsOpt = 50,
    sigma: SigmaOpt = 0.01,
    points: PointsOpt = 1000,
    samples: o.SamplesOpt = None,
    batch_size: o.BatchSizeOpt = 256,
    layers: o.LayersOpt = None,
    device: o.DeviceOpt = "auto",
    dtype: o.DTypeOpt = o.DType.float32,
    seed: o.SeedOpt = 0,
    mode: o.ModeOpt = o.Mode.eval,
    arch: o.ArchOpt = None,
    loss: o.LossOpt = None,
    max_memory: o.MaxMemoryOpt = None,
    json: o.JsonOpt = False,
    output: o.OutputOpt = None,
    plot: o.PlotOpt = None,
    quiet: o.QuietOpt = False,
    fail_if: o.FailIfOpt = None,
    strict: o.StrictOpt = False,
) -> None:
    """Eigenvalue spectral density (stochastic Lanczos quadrature, Gaussian broadening).

    --probes independent Lanczos runs of --max-iters steps; node weights are the squared
    first components of the Ritz vectors. Tiny models (--method auto/exact) use the exact
    spectrum of the dense matrix.

    Examples: [bold]gmcurv spectrum --plot esd.png[/bold] ·
    [bold]gmcurv spectrum m.safetensors d/ --probes 5 --max-iters 80 --json[/bold]
    """
    if method not in METHODS:
        raise ConfigError(
            f"--method {method.value} does not give a spectral density",
            hint="use auto, exact or lanczos (stochastic Lanczos quadrature)",
        )
    if plot is not None:
        check_plot_path(plot)
    session = Session.open(
        ctx, model, data, arch=arch, loss=loss, samples=samples, device=device, dtype=dtype,
        mode=mode, layers=layers, seed=seed, quiet=quiet, json_mode=json,
    )  # fmt: skip
    if plot is not None:
        ensure_not_input(plot, session.inputs)
    assert session.objective is not None and session.data is not None
    kind = curvature.value
    with session.stage(kind), session.progress(f"{kind}: Lanczos quadrature", None) as advance:
        from gmcurv.density import spectrum_summary

        s = spectrum_summary(
            session.objective,
            session.data,
            kind,
            method=method.value,
            probes=probes,
            steps=steps,
            seed=seed,
            points=points,
            rel_sigma=sigma,
            batch_size=batch_size,
            budget_bytes=parse_bytes(max_memory) if max_memory else None,
            progress=advance,
            phase=lambda text, n: advance.phase(f"{kind}: {text}", n),
        )
    for note in s.notes:
        session.note(note)
    q = s.quadrature
    block: dict[str, Any] = {
        "method": s.method,
        "n_params": s.n_params,
        "n_matvecs": s.n_matvecs,
        "probes": q.probes,
        "sigma": s.sigma,
        "trace": s.trace,
        "moments": s.moments,
        "grid": s.grid,
        "density": s.density,
        "quadrature": {
            "nodes": [row[:m] for row, m in zip(q.nodes.tolist(), q.steps, strict=True)],
            "weights": [row[:m] for row, m in zip(q.weights.tolist(), q.steps, strict=True)],
            "steps": q.steps,
        },
        "notes": s.notes,
    }
    results = {kind: block}
    if plot is not None and session.comm.main:
        from gmcurv.cli.plots.spectrum import plot_spectrum

        with session.stage("plot"):
            plot_spectrum(to_jsonable(results), plot)
        session.note(f"plot written to {plot}")
    session.finish(session.report(results), render, output, fail_if, strict)


def register(app: typer.Typer) -> None:
    app.command("spectrum")(spectrum)
