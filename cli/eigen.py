"""``gmcurv eigen``: top-k eigenvalues of the Hessian, GGN or Fisher (+ eigenvectors)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from gmcurv.cli import options as o
from gmcurv.cli.plots import check_plot_path
from gmcurv.cli.render import fmt, footer, header, new_table
from gmcurv.cli.session import Session
from gmcurv.cli.trace import MaxItersOpt, RestartsOpt
from gmcurv.errors import ConfigError
from gmcurv.io.fileio import atomic_write, ensure_not_input
from gmcurv.memory import parse_bytes
from gmcurv.results import Report, to_jsonable


class EigenCurvature(str, Enum):
    hessian = "hessian"
    ggn = "ggn"
    fisher = "fisher"


EigenTolOpt = Annotated[
    float | None,
    typer.Option(
        "--tol",
        envvar="GMCURV_TOL",
        min=0.0,
        callback=o.finite,
        help="Relative tolerance: Lanczos stops when every eigenvalue error bound is at most "
        "this times |λ_max| (default 0.001); Fisher Gram eigenvalues by default to the "
        "kernel's float rounding (u tr F).",
        show_default=False,
    ),
]
CurvOpt = Annotated[
    EigenCurvature,
    typer.Option("--curvature", envvar="GMCURV_CURVATURE", help="Which curvature matrix."),
]
SaveVectorsOpt = Annotated[
    Path | None,
    typer.Option(
        "--save-vectors",
        help="Write the unit eigenvectors to this .safetensors file, in the model's "
        "parameter layout (keys eigvec.<i>.<parameter>).",
        show_default=False,
    ),
]
if TYPE_CHECKING:
    from gmcurv.hessian import EigenSummary

METHODS = (o.Method.auto, o.Method.exact, o.Method.lanczos, o.Method.gram)


def save_vectors(path: Path, summary: EigenSummary, model_sha256: str | None) -> None:
    """Eigenvectors as ``eigvec.<i>.<param>`` tensors, eigenvalues in the metadata (atomic)."""
    from safetensors.torch import save_file

    assert summary.vectors is not None
    tensors = {
        f"eigvec.{i}.{name}": t.detach().cpu().contiguous()
        for i, vec in enumerate(summary.vectors)
        for name, t in vec.items()
    }
    meta = {
        "curvature": summary.kind,
        "method": summary.method,
        "eigenvalues": json.dumps([e.value for e in summary.values]),
        "model_sha256": model_sha256 or "",
    }
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def render(report: Report, console: Console) -> None:
    header(report, console, "gmcurv eigen")
    res = report.to_dict()["results"]
    for name in ("hessian", "ggn", "fisher"):
        block = res.get(name)
        if not block:
            continue
        label = {"hessian": "Hessian", "ggn": "GGN", "fisher": "Fisher"}[name]
        table = new_table(
            f"{label}: top-{len(block['eigenvalues'])} eigenvalues ({block['method']})",
            "#",
            "eigenvalue",
            "residual",
            "converged",
        )
        for i, e in enumerate(block["eigenvalues"]):
            ok = "[green]yes[/green]" if e["converged"] else "[yellow]no[/yellow]"
            table.add_row(str(i + 1), fmt(e["value"], 8), fmt(e.get("residual"), 2), ok)
        console.print(table)
        console.print(
            f"[dim]{block['n_params']:,} parameters, {block['n_matvecs']:,} matrix-vector "
            f"products[/dim]"
        )
        if block.get("vectors"):
            console.print(f"eigenvectors written to [cyan]{block['vectors']}[/cyan]")
    footer(report, console)


def eigen(
    ctx: typer.Context,
    model: o.ModelArg = None,
    data: o.DataArg = None,
    k: o.KOpt = 5,
    curvature: CurvOpt = EigenCurvature.hessian,
    fisher: o.FisherOpt = o.FisherType.empirical,
    method: o.MethodOpt = o.Method.auto,
    tol: EigenTolOpt = None,
    max_iters: MaxItersOpt = None,
    restarts: RestartsOpt = 0,
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
    save_vectors_to: SaveVectorsOpt = None,
    json: o.JsonOpt = False,
    output: o.OutputOpt = None,
    plot: o.PlotOpt = None,
    quiet: o.QuietOpt = False,
    fail_if: o.FailIfOpt = None,
    strict: o.StrictOpt = False,
) -> None:
    """Top-k eigenvalues with residuals and a converged flag.

    Hessian / GGN: exact dense eigh when the model has no more parameters than Lanczos
    would take products, else Lanczos with full
    reorthogonalisation (converged when the eigenvalue error bound is within --tol of
    |λ_max|). Fisher: exact Gram-kernel route on decomposed gradients.

    Examples: [bold]gmcurv eigen --k 5[/bold] ·
    [bold]gmcurv eigen m.safetensors d/ --curvature ggn --save-vectors vecs.safetensors[/bold]
    """
    learned = method in (o.Method.learned, o.Method.both)  # the GradMetaNet head (cli.learned)
    _check_method(method, curvature, learned)
    if plot is not None:
        check_plot_path(plot)
    if save_vectors_to is not None and save_vectors_to.suffix != ".safetensors":
        raise ConfigError(
            f"--save-vectors {save_vectors_to}: expected a .safetensors file name",
            hint="e.g. --save-vectors vecs.safetensors",
        )
    session = Session.open(
        ctx, model, data, arch=arch, loss=loss, samples=samples, device=device, dtype=dtype,
        mode=mode, layers=layers, seed=seed, quiet=quiet, json_mode=json,
    )  # fmt: skip
    for out in (save_vectors_to, plot):
        if out is not None:
            ensure_not_input(out, session.inputs)
    assert session.objective is not None and session.data is not None
    check_k(k, session.objective)
    kind = curvature.value
    if method is o.Method.learned:
        from gmcurv.cli import learned as lh

        results = lh.learned_eigen(session, kind, k, seed)
        session.finish(
            session.report(results), lh.render_learned("gmcurv eigen"), output, fail_if, strict
        )
        return
    em = (
        "auto"
        if method in (o.Method.auto, o.Method.gram, o.Method.both) or kind == "fisher"
        else method.value
    )
    with session.stage(kind), session.progress(f"{kind}: eigenvalues", None) as advance:
        from gmcurv.hessian import top_eigen

        s = top_eigen(
            session.objective, session.data, kind, k, method=em, tol=tol, max_iters=max_iters,
            seed=seed, vectors=save_vectors_to is not None, batch_size=batch_size,
            fisher=fisher.value, budget_bytes=parse_bytes(max_memory) if max_memory else None,
            progress=advance, restarts=restarts,
            phase=lambda text, n: advance.phase(f"{kind}: {text}", n),
        )  # fmt: skip
    for note in s.notes:
        session.note(note)
    block = _block(s, kind, fisher.value)
    if save_vectors_to is not None and session.comm.main:
        with session.stage("save"):
            save_vectors(save_vectors_to, s, session.loaded.sha256 if session.loaded else None)
        block["vectors"] = str(save_vectors_to)
    results = {kind: block}
    shown = render
    if method is o.Method.both:
        from gmcurv.cli import learned as lh

        results["learned"] = lh.compare_eigen(session, results, kind, seed)
        shown = lh.render_with_comparison(render)
    if plot is not None and session.comm.main:
        from gmcurv.cli.plots.spectrum import plot_eigenvalues

        with session.stage("plot"):
            plot_eigenvalues(to_jsonable(results), plot)
        session.note(f"plot written to {plot}")
    session.finish(session.report(results), shown, output, fail_if, strict)


def _check_method(method: o.Method, curvature: EigenCurvature, learned: bool) -> None:
    """--method against --curvature (the head predicts the Hessian's top eigenvalue only)."""
    if learned and curvature is not EigenCurvature.hessian:
        raise ConfigError(
            f"--method {method.value}: the head predicts the top Hessian eigenvalue, "
            f"not the {curvature.value}'s",
            hint="use --curvature hessian, or --method auto",
        )
    if method not in METHODS and not learned:
        raise ConfigError(
            f"--method {method.value} does not compute eigenvalues",
            hint="use auto, exact, lanczos (Hessian/GGN) or gram (Fisher)",
        )
    allowed = (
        (o.Method.auto, o.Method.exact, o.Method.gram)
        if curvature is EigenCurvature.fisher
        else (o.Method.auto, o.Method.exact, o.Method.lanczos)
    )
    if method not in allowed and not learned:
        raise ConfigError(
            f"--method {method.value} does not apply to --curvature {curvature.value}",
            hint="the Fisher uses the exact Gram route (--method auto or gram); "
            "Hessian/GGN use auto, exact or lanczos",
        )


def _block(s: Any, kind: str, fisher: str) -> dict[str, Any]:
    """The results block of one curvature's top eigenvalues (`gmcurv.hessian.top_eigen`)."""
    block: dict[str, Any] = {
        "method": s.method,
        "n_params": s.n_params,
        "n_matvecs": s.n_matvecs,
        "eigenvalues": s.values,
        "vectors": None,
        "notes": s.notes,
    }
    if kind == "fisher":
        block["type"] = fisher
    return block


def check_k(k: int, objective) -> None:
    """Refuse at once a --k the operator cannot give: more eigenvalues than parameters."""
    n = objective.space.size
    if k > n:
        raise ConfigError(
            f"--k {k}: the curvature matrix has only {n:,} eigenvalues ({n:,} parameters selected)",
            hint=f"ask for at most --k {n} (usually a handful: --k 5)",
        )


def register(app: typer.Typer) -> None:
    app.command("eigen")(eigen)
