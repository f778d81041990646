"""``gmcurv trace``: Fisher / GGN / Hessian traces, total and per layer, and top eigenvalues."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from gmcurv.cli import options as o
from gmcurv.cli.exports import SaveDiagonalOpt, check_save_diagonal, write_diagonal
from gmcurv.cli.plots import check_plot_path
from gmcurv.cli.render import (
    fmt,
    fmt_column,
    fmt_estimate,
    fmt_estimates,
    footer,
    header,
    new_table,
    shorten_names,
)
from gmcurv.cli.series import (
    PathsArg,
    refuse_in_series,
    render_series,
    run_series,
    set_config_args,
    split_args,
    with_loss,
)
from gmcurv.cli.session import Session
from gmcurv.errors import ConfigError
from gmcurv.io.fileio import ensure_not_input
from gmcurv.memory import parse_bytes
from gmcurv.results import Report, to_jsonable

LANCZOS_TOL = 1e-3  # default eigenvalue error bound relative to |λ_max|
DEFAULT_TRACE_RTOL = 0.01  # = gmcurv.hessian.DEFAULT_TRACE_RTOL (not imported: start-up)
TRACE_METHODS = (o.Method.auto, o.Method.exact, o.Method.hutchinson, o.Method.hutchpp)
MaxItersOpt = Annotated[
    int | None,
    typer.Option(
        "--max-iters",
        envvar="GMCURV_MAX_ITERS",
        min=1,
        help="Lanczos iteration cap (default: max(4k + 20, 60)).",
        show_default=False,
    ),
]
TraceKOpt = Annotated[
    int,
    typer.Option("--k", "-k", envvar="GMCURV_K", min=0, help="How many top eigenvalues (0: none)."),
]
TraceTolOpt = Annotated[
    float | None,
    typer.Option(
        "--tol",
        envvar="GMCURV_TOL",
        min=0.0,
        help="Relative tolerance: stochastic traces stop at this standard error / |trace| "
        "(default 0.01, capped by --probes); Lanczos at this eigenvalue error / |λ_max| "
        "(default 0.001; Fisher Gram eigenvalues: the kernel's float rounding, u tr F).",
        show_default=False,
    ),
]
PerLayerEigenOpt = Annotated[
    bool,
    typer.Option(
        "--per-layer-eigen/--no-per-layer-eigen",
        envvar="GMCURV_PER_LAYER_EIGEN",
        help="Also each layer's own top eigenvalues (one eigenproblem per layer).",
    ),
]
RestartsOpt = Annotated[
    int,
    typer.Option(
        "--restarts",
        envvar="GMCURV_RESTARTS",
        min=0,
        help="Lanczos restarts in the complement of converged pairs (recovers repeated "
        "eigenvalues; each costs another Lanczos run).",
    ),
]


def capture_phase(prefix: str, n: int, batch_size: int) -> tuple[str, int | None]:
    """The capture's bar: a count of examples per batch, or a spinner with what is done
    when the data is a single batch (a count would sit at 0 until the end)."""
    if n <= batch_size:
        return f"{prefix}capturing gradients (one batch of {n:,} examples)", None
    return f"{prefix}capturing gradients", n


def fisher_results(
    session: Session,
    fisher: str,
    mc_samples: int,
    k: int,
    per_layer: bool,
    batch_size: int,
    seed: int,
    max_memory: str | None,
    per_layer_eigen: bool = False,
    tol: float | None = None,
) -> dict[str, Any]:
    """Run the Fisher closed forms with a progress bar; results as a JSON-able dict.
    `tol`: the eigenvalues' relative error bound (None: the kernel's float precision)."""
    from gmcurv.fisher import fisher_summary

    assert session.objective is not None and session.data is not None
    with (
        session.stage("fisher"),
        session.progress(*capture_phase("Fisher: ", session.data.n, batch_size)) as advance,
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
            per_layer_eigen=per_layer_eigen,
            eigen_progress=advance,
            phase=advance.phase,
            tol=tol,
        )
    return {
        "loss": s.loss,
        "fisher": {
            "type": s.fisher,
            "n_params": s.n_params,
            "trace": s.trace,
            "eigenvalues": s.eigenvalues,
            "rank": s.rank,
            "eigen_tolerance": s.eigen_tolerance,
            "per_layer": s.per_layer,
            "self_check": s.self_check,
        },
    }


def curvature_results(
    session: Session,
    kind: str,
    method: str,
    probes: int,
    k: int,
    per_layer: bool,
    batch_size: int,
    seed: int,
    tol: float,
    max_iters: int | None,
    restarts: int,
    max_memory: str | None,
    rtol: float | None = None,
) -> dict[str, Any]:
    """Hessian or GGN trace (total, per layer) and top eigenvalues, as a JSON-able dict."""
    from gmcurv.hessian import curvature_summary

    assert session.objective is not None and session.data is not None
    label = "Hessian" if kind == "hessian" else "GGN"
    with session.stage(kind), session.progress(f"{label}: products", probes) as advance:
        s = curvature_summary(
            session.objective,
            session.data,
            kind,
            method=method,
            probes=probes,
            k=k,
            per_layer=per_layer,
            seed=seed,
            tol=tol,
            max_iters=max_iters,
            batch_size=batch_size,
            budget_bytes=parse_bytes(max_memory) if max_memory else None,
            progress=advance,
            restarts=restarts,
            rtol=rtol,
            phase=lambda text, total: advance.phase(f"{label}: {text}", total),
            cache=session.cache,
            grow_capture=session.config.get("sources", {}).get("batch_size") == "default",
        )
    for note in s.notes:
        session.note(f"{label}: {note}")
    return {
        "method": s.method,
        "n_params": s.n_params,
        "n_matvecs": s.n_matvecs,
        "trace": s.trace,
        "eigenvalues": s.eigenvalues,
        "per_layer": s.per_layer,
        "stopped": s.stopped,
        "tolerances": {"trace_rel_stderr": rtol, "lanczos": tol},
        "notes": s.notes,
    }


NAMES = ("fisher", "ggn", "hessian")
NAME_WIDTH = 28  # layer names longer than this are shortened from the left in tables


def _label(name: str, block: dict[str, Any]) -> str:
    label = name.upper() if name == "ggn" else name.capitalize()
    return label + (f" ({block['type']})" if name == "fisher" else "")


def _side_by_side(res: dict[str, Any], console: Console) -> None:
    """One table: per-layer traces of every curvature computed, with products used."""
    present = [n for n in NAMES if res.get(n)]
    table = new_table("traces side by side", "layer", *[_label(n, res[n]) for n in present])
    layers: list[str] = []
    for n in present:
        layers += [name for name in res[n].get("per_layer", {}) if name not in layers]
    columns = [
        fmt_estimates([res[n].get("per_layer", {}).get(layer, {}).get("trace") for layer in layers])
        for n in present
    ]
    for i, layer in enumerate(shorten_names(layers, NAME_WIDTH)):
        table.add_row(layer, *[col[i] for col in columns])
    table.add_row("[bold]total[/bold]", *[fmt_estimate(res[n]["trace"]) for n in present])
    table.add_row(
        "[dim]products[/dim]",
        *[
            f"{res[n].get('n_matvecs') or 0:,}" if n != "fisher" else "0 (closed form)"
            for n in present
        ],
    )
    console.print(table)


def render(report: Report, console: Console) -> None:
    header(report, console, "gmcurv trace")
    res = report.to_dict()["results"]
    if "loss" in res:
        console.print(f"mean loss {fmt_estimate(res['loss'])}")
    if sum(1 for n in NAMES if res.get(n)) > 1:
        _side_by_side(res, console)
    for name in NAMES:
        block = res.get(name)
        if not block:
            continue
        label = _label(name, block)
        t = block["trace"]
        with_eig = any(i.get("eigenvalues") for i in block.get("per_layer", {}).values())
        columns = ["layer", "kind", "params", "trace", "share"] + (["λ_max"] if with_eig else [])
        table = new_table(f"{label}: trace {fmt_estimate(t)}", *columns)
        total = t["value"] or 0.0
        per = block.get("per_layer", {})
        traces = fmt_estimates([info["trace"] for info in per.values()])
        lams = fmt_column(
            [(info.get("eigenvalues") or [{}])[0].get("value") for info in per.values()]
        )
        names = shorten_names(list(per), NAME_WIDTH)
        for i, info in enumerate(per.values()):
            lt = info["trace"]
            share = f"{100 * lt['value'] / total:.1f}%" if total else "—"
            row = [names[i], info["kind"], f"{info['n_params']:,}", traces[i], share]
            table.add_row(*row, *([lams[i]] if with_eig else []))
        if block.get("per_layer"):
            console.print(table)
        else:
            console.print(table.title)
        eigs = block.get("eigenvalues") or []
        if eigs:
            vals = ", ".join(fmt_estimate(e) for e in eigs)
            method = eigs[0]["method"]
            extra = f", rank {block['rank']:,}" if block.get("rank") is not None else ""
            rule = block.get("eigen_tolerance") or {}
            if rule.get("rtol") or rule.get("atol"):  # an iterative route's stopping rule
                bound = max(rule["rtol"] * (eigs[0]["value"] or 0.0), rule["atol"])
                extra += f", each within {fmt(bound, 2)}"
            console.print(f"top-{len(eigs)} eigenvalues ({method}{extra}): {vals}")
        n = t["n_samples"]
        what = "N" if name == "fisher" or t.get("stderr") is None else "probes"
        note = f"{what}={n:,}, method {t['method']}"
        if block.get("n_matvecs"):
            product = "Hessian" if name == "hessian" else "GGN"
            note += f", {block['n_matvecs']:,} {product}-vector products"
        if t.get("data_stderr") is not None:
            note += f"; sampling s.e. of the trace over examples ±{fmt(t['data_stderr'], 2)}"
        console.print(f"[dim]{note}[/dim]")
    footer(report, console)


def trace(
    ctx: typer.Context,
    paths: PathsArg = None,
    curvature: o.CurvatureOpt = o.Curvature.fisher,
    fisher: o.FisherOpt = o.FisherType.empirical,
    method: o.MethodOpt = o.Method.auto,
    samples: o.SamplesOpt = None,
    batch_size: o.BatchSizeOpt = 256,
    probes: o.ProbesOpt = 100,
    k: TraceKOpt = 5,
    tol: TraceTolOpt = None,
    max_iters: MaxItersOpt = None,
    restarts: RestartsOpt = 0,
    per_layer: o.PerLayerOpt = True,
    per_layer_eigen: PerLayerEigenOpt = False,
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
    plot: o.PlotOpt = None,
    save_diagonal: SaveDiagonalOpt = None,
    quiet: o.QuietOpt = False,
    fail_if: o.FailIfOpt = None,
    strict: o.StrictOpt = False,
) -> None:
    """Curvature traces, total and per layer, with the top eigenvalues.

    Fisher: exact closed forms on decomposed gradients. GGN / Hessian (--method): exact
    dense matrix for tiny models; otherwise Hutch++ / Hutchinson up to --probes products,
    stopping at --tol relative standard error, every layer from the same products — auto
    takes the GGN trace exactly from C-class factors and estimates only the Hessian's
    difference from it (none for ReLU networks, where it vanishes within layers); top-k
    eigenvalues by Lanczos (--k 0: none).

    Examples: [bold]gmcurv trace[/bold] (bundled sample) ·
    [bold]gmcurv trace model.safetensors data/ --curvature all --plot traces.png[/bold] ·
    [bold]gmcurv trace m.safetensors d/ --fail-if "hessian.trace > 100"[/bold] ·
    [bold]gmcurv trace ckpts/step_*.safetensors d/ --plot sharpness.png[/bold] (a series)
    """
    kinds = list(NAMES) if curvature is o.Curvature.all else [curvature.value]
    learned = method in (o.Method.learned, o.Method.both)  # the GradMetaNet head (cli.learned)
    _check_method(kinds, method, fisher, probes, learned)
    if plot is not None:
        check_plot_path(plot)
    from gmcurv.io.series import resolve_series

    models, data = split_args(paths)
    series = resolve_series(models) if models else None
    many = series is not None and len(series.checkpoints) > 1
    if many:
        refuse_in_series(f"--method {method.value}", learned)
        refuse_in_series("--save-diagonal", save_diagonal is not None)
    for out in (output, plot):  # refuse bad output paths before any compute
        if out is not None:
            ensure_not_input(out, [*models, data])
    if save_diagonal is not None:
        check_save_diagonal(save_diagonal, kinds, [*models, data, output, plot])
    set_config_args(ctx, models, data)
    session = Session.open(
        ctx, series.checkpoints[0].path if series else None, data, arch=arch, loss=loss,
        samples=samples, device=device, dtype=dtype, mode=mode, layers=layers, seed=seed,
        quiet=quiet, json_mode=json,
    )  # fmt: skip
    if method is o.Method.learned:
        from gmcurv.cli import learned as lh

        results = lh.learned_trace(session, kinds, seed)
        session.finish(
            session.report(results), lh.render_learned("gmcurv trace"), output, fail_if, strict
        )
        return

    def compute(s: Session) -> dict[str, Any]:
        """One checkpoint's results (the session's current model)."""
        results: dict[str, Any] = {}
        if "fisher" in kinds:
            results = fisher_results(
                s, fisher.value, mc_samples, k, per_layer, batch_size, seed, max_memory,
                per_layer_eigen, tol,
            )  # fmt: skip
        hm = method.value if method not in (o.Method.gram, o.Method.both) else "auto"
        for kind in ("ggn", "hessian"):
            if kind in kinds:
                results[kind] = curvature_results(
                    s, kind, hm, probes, k, per_layer, batch_size, seed,
                    LANCZOS_TOL if tol is None else tol, max_iters, restarts, max_memory,
                    DEFAULT_TRACE_RTOL if tol is None else tol,
                )  # fmt: skip
        return results

    if many:
        assert series is not None
        results = {
            "series": run_series(
                session, series, with_loss(compute, batch_size), arch=arch, loss=loss,
                layers=layers, mode=mode,
            )
        }  # fmt: skip
        _plot(session, plot, "series", results["series"])
        session.finish(session.report(results), render_series, output, fail_if, strict)
        return
    results = compute(session)
    if save_diagonal is not None:
        results["diagonal"] = write_diagonal(
            session, save_diagonal, kinds[0], fisher=fisher.value, mc_samples=mc_samples,
            probes=probes, seed=seed, batch_size=batch_size,
            budget_bytes=parse_bytes(max_memory) if max_memory else None,
        )  # fmt: skip
    shown = render
    if method is o.Method.both:
        from gmcurv.cli import learned as lh

        results["learned"] = lh.compare_trace(session, results, seed)
        shown = lh.render_with_comparison(render)
    _plot(session, plot, "traces", results)
    session.finish(session.report(results), shown, output, fail_if, strict)


def _check_method(
    kinds: list[str], method: o.Method, fisher: o.FisherType, probes: int, learned: bool
) -> None:
    """--method against the curvatures asked for, and --probes for a standard error."""
    if learned:
        from gmcurv.cli import learned as lh

        lh.check_kinds(kinds, fisher.value)
    if (
        kinds == ["fisher"]
        and not learned
        and method not in (o.Method.auto, o.Method.exact, o.Method.gram)
    ):
        raise ConfigError(
            f"--method {method.value} does not apply to the Fisher",
            hint="the Fisher uses exact closed forms on decomposed gradients (--method auto)",
        )
    if kinds != ["fisher"] and not learned and method not in TRACE_METHODS:
        raise ConfigError(
            f"--method {method.value} does not estimate GGN/Hessian traces",
            hint="use auto, exact, hutchinson or hutchpp",
        )
    if method in (o.Method.hutchinson, o.Method.hutchpp) and probes < 2:
        raise ConfigError("--probes must be at least 2 for a standard error", hint="--probes 100")


def _plot(session: Session, plot: Path | None, kind: str, results: Any) -> None:
    """--plot (main rank only): the traces of one checkpoint, or a series over checkpoints."""
    if plot is None or not session.comm.main:
        return
    if kind == "series":
        from gmcurv.cli.plots.series import plot_series as draw
    else:
        from gmcurv.cli.plots.spectrum import plot_traces as draw
    with session.stage("plot"):
        ensure_not_input(plot, session.inputs)
        draw(to_jsonable(results), plot)
    session.note(f"plot written to {plot}")


def register(app: typer.Typer) -> None:
    app.command("trace")(trace)
