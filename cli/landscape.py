"""``gmcurv landscape``: 1-D / 2-D loss slices around the weights, with a plot."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from gmcurv.cli import options as o
from gmcurv.cli.plots import check_plot_path
from gmcurv.cli.render import fmt, fmt_estimate, footer, header, new_table
from gmcurv.cli.session import Session
from gmcurv.errors import ConfigError
from gmcurv.estimate import Estimate
from gmcurv.io.fileio import atomic_write, ensure_not_input
from gmcurv.memory import parse_bytes, preflight
from gmcurv.results import Report, to_jsonable

if TYPE_CHECKING:
    import numpy as np


class Directions(str, Enum):
    random = "random"
    eigen = "eigen"


DirectionsOpt = Annotated[
    Directions,
    typer.Option(
        "--directions",
        envvar="GMCURV_DIRECTIONS",
        help="random: filter-normalised Gaussian directions (Li et al., 2018); eigen: the top "
        "Hessian eigenvectors (unit norm). Ignored with --to.",
    ),
]
ToOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--to",
        help="Another checkpoint of the same architecture: once for the 1-D interpolation "
        "MODEL -> it, twice for the plane through the three checkpoints.",
        show_default=False,
    ),
]
OneDOpt = Annotated[bool, typer.Option("--1d", help="A 1-D slice (line plot) along one direction.")]
MAX_STEPS = 10_001  # per axis; the grid's memory is checked against --max-memory too


def _checked_range(value: str | None) -> str | None:
    """Parse-time check of --range (LOW:HIGH, finite, a usable width)."""
    from gmcurv.landscape import parse_range

    if value is not None:
        parse_range(value)
    return value


RangeOpt = Annotated[
    str | None,
    typer.Option(
        "--range",
        envvar="GMCURV_RANGE",
        callback=lambda v: _checked_range(v),
        help="Grid coordinates LOW:HIGH along each direction (default -1:1; 0:1 with --to, "
        "so 1 is the other checkpoint).",
        show_default=False,
    ),
]
StepsOpt = Annotated[
    int,
    typer.Option(
        "--steps",
        envvar="GMCURV_STEPS",
        min=3,
        max=MAX_STEPS,
        help="Grid points per axis (at least 3).",
    ),
]
IncludeBiasOpt = Annotated[
    bool,
    typer.Option(
        "--include-bias",
        help="Also move biases and 1-D (normalisation) parameters along random directions, "
        "each normalised to its parameter's norm (default: they stay fixed).",
    ),
]
SurfaceOpt = Annotated[
    bool, typer.Option("--surface", help="Draw a 3-D surface instead of a contour plot (2-D).")
]
SaveGridOpt = Annotated[
    Path | None,
    typer.Option(
        "--save-grid",
        help="Write the raw grid (coordinates, loss, accuracy, direction norms) to this .npz.",
        show_default=False,
    ),
]
KIND_NAMES = {"random": "random", "eigen": "eigen", "checkpoint": "checkpoint"}


# ------------------------------------------------------------------------------- grid file
def save_grid(path: Path, block: dict[str, Any]) -> None:
    """The raw grid as .npz (plain arrays, no pickles), written atomically."""
    import numpy as np

    g = block["grid"]
    arrays: dict[str, np.ndarray] = {
        "alphas": np.asarray(g["alphas"], dtype=np.float64),
        "loss": np.asarray(g["loss"], dtype=np.float64),
        "center_loss": np.asarray(block["center"]["loss"].value, dtype=np.float64),
        "direction_norms": np.asarray(
            [d["norm"] for d in block["directions"].values()], dtype=np.float64
        ),
        "curvature": np.asarray([s.value for s in block["sharpness"].values()], dtype=np.float64),
        "normalisation": np.asarray(block["normalisation"]),
        "directions_kind": np.asarray(block["directions_kind"]),
    }
    if g["betas"] is not None:
        arrays["betas"] = np.asarray(g["betas"], dtype=np.float64)
    if g["accuracy"] is not None:
        arrays["accuracy"] = np.asarray(g["accuracy"], dtype=np.float64)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)


# -------------------------------------------------------------------------------- rendering
def render(report: Report, console: Console) -> None:
    header(report, console, "gmcurv landscape")
    block = report.to_dict()["results"]["landscape"]
    center = block["center"]
    acc = center.get("accuracy")
    console.print(
        f"centre loss [bold]{fmt(center['loss']['value'], 6)}[/bold]"
        + (f" · accuracy {fmt(acc['value'], 4)}" if acc else "")
    )
    table = new_table(
        f"{block['dimensions']}-D slice along {block['directions_kind']} directions "
        f"(normalisation: {block['normalisation']})",
        "direction",
        "norm",
        "curvature (fit)",
        "per unit norm²",
        "eigenvalue",
    )
    for name, d in block["directions"].items():
        lam = d.get("eigenvalue")
        extra = ""
        if d.get("checkpoint"):
            extra = f"  → {d['checkpoint']} (loss {fmt(d['checkpoint_loss'], 6)})"
        table.add_row(
            name + extra,
            fmt(d["norm"]),
            fmt_estimate(block["sharpness"][name], 6),
            fmt(d["curvature_per_unit_norm"]),
            fmt(lam["value"], 6) if lam else "—",
        )
    console.print(table)
    lo, hi = block["range"]
    size = " × ".join([str(block["steps"])] * block["dimensions"])
    lowest, highest = block["min"], block["max"]

    def where(p: dict[str, Any]) -> str:
        coords = [f"{k}={fmt(p[k])}" for k in ("alpha", "beta") if k in p]
        return f"{fmt(p['loss'], 6)} at {', '.join(coords)}"

    console.print(
        f"grid {size} on [{fmt(lo)}, {fmt(hi)}]: min {where(lowest)} · max {where(highest)}"
    )
    console.print(
        f"[dim]{block['n_points']:,} points evaluated, up to {block['chunk']} per forward "
        f"({block['evaluation']})[/dim]"
    )
    footer(report, console)


# ---------------------------------------------------------------------------------- command
def landscape_command(
    ctx: typer.Context,
    model: o.ModelArg = None,
    data: o.DataArg = None,
    directions: DirectionsOpt = Directions.random,
    to: ToOpt = None,
    one_d: OneDOpt = False,
    range_: RangeOpt = None,
    steps: StepsOpt = 41,
    include_bias: IncludeBiasOpt = False,
    surface: SurfaceOpt = False,
    save_grid_to: SaveGridOpt = None,
    tol: o.TolOpt = 1e-3,
    samples: o.SamplesOpt = None,
    batch_size: o.BatchSizeOpt = 1024,
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
    """Loss on a 1-D / 2-D grid around the weights: L(θ0 + α d1 + β d2).

    Directions: filter-normalised random (default; biases and 1-D parameters stay fixed
    unless --include-bias), the top Hessian eigenvectors (--directions eigen), or other
    checkpoints (--to: α = 1 is that checkpoint). Reports the centre loss, the sharpness
    along each direction (curvature 2·c2 of a parabola fitted to 5 points around the
    centre; with eigen directions it approximates the eigenvalue), the grid, and the
    directions' norms and normalisation. All grid points run through one functional model,
    several per forward pass.

    Examples: [bold]gmcurv landscape --plot surface.png[/bold] ·
    [bold]gmcurv landscape m.safetensors d/ --directions eigen --1d --plot line.png[/bold] ·
    [bold]gmcurv landscape a.safetensors d/ --to b.safetensors --plot interp.png[/bold] ·
    [bold]gmcurv landscape --range=-0.5:0.5 --steps 21 --save-grid grid.npz --json[/bold] ·
    [bold]gmcurv landscape --fail-if "landscape.sharpness.d1 > 50"[/bold]
    """
    import torch

    from gmcurv.landscape import direction_norm, grid_axis, landscape, parse_range
    from gmcurv.landscape.summary import fixed_parameters, landscape_block, n_points

    to = list(to or [])
    dims = _dimensions(to, directions, one_d)
    lo, hi = parse_range(range_ if range_ is not None else ("0:1" if to else "-1:1"))
    _check_grid_and_outputs(steps, dims, max_memory, surface, plot, save_grid_to)
    session = Session.open(
        ctx, model, data, arch=arch, loss=loss, samples=samples, device=device, dtype=dtype,
        mode=mode, layers=layers, seed=seed, quiet=quiet, json_mode=json,
    )  # fmt: skip
    session.inputs.extend(to)
    session.check_outputs(ctx)
    for out in (plot, save_grid_to, output):
        if out is not None:
            ensure_not_input(out, session.inputs)
    objective, sample = session.objective, session.data
    assert objective is not None and sample is not None
    budget = parse_bytes(max_memory) if max_memory else None
    with session.stage("directions"):
        chosen = _directions(session, to, directions, dims, arch, batch_size, seed, tol, budget,
                             include_bias)  # fmt: skip
    skipped = fixed_parameters(objective.params) if chosen.kind == "random" else []
    if skipped and not include_bias:
        session.note(
            f"{len(skipped)} bias / 1-D parameter(s) stay fixed (add --include-bias to move them)"
        )
    alphas = grid_axis(lo, hi, steps)
    extra = torch.eye(dims, dtype=torch.float64) if to else None
    total = n_points(steps, dims, dims if to else 0)
    with session.stage("grid"), session.progress("landscape: grid points", total) as advance:
        res = landscape(
            objective, sample, chosen.dirs, alphas, alphas.clone() if dims == 2 else None,
            batch_size=batch_size, budget_bytes=budget, progress=advance, extra=extra,
        )  # fmt: skip
    block = landscape_block(
        res, kind=chosen.kind, normalisation=chosen.normalisation,
        include_bias=include_bias if chosen.kind == "random" else False, seed=seed, lo=lo,
        hi=hi, steps=steps, norms=[direction_norm(d) for d in chosen.dirs],
        eigenvalues=chosen.eigenvalues, eigen_method=chosen.eigen_method,
        endpoints=[str(p) for p in to] if to else None,
    )  # fmt: skip
    if session.comm.main:
        _write_extras(session, block, save_grid_to, plot, surface)
    session.finish(session.report({"landscape": block}), render, output, fail_if, strict)


def _dimensions(to: list[Path], directions: Directions, one_d: bool) -> int:
    """1 or 2 (a line or a plane), refusing contradictory --to / --directions / --1d."""
    if len(to) > 2:
        raise ConfigError(
            f"--to given {len(to)} times: at most two other checkpoints span a plane",
            hint="--to b.safetensors (a line) or --to b.safetensors --to c.safetensors (a plane)",
        )
    if to and directions is Directions.eigen:
        raise ConfigError(
            "--directions eigen and --to both choose the directions",
            hint="drop --directions eigen to interpolate between checkpoints, or drop --to",
        )
    if one_d and len(to) == 2:
        raise ConfigError(
            "--1d with two --to checkpoints: three checkpoints span a plane",
            hint="use one --to for a 1-D interpolation, or drop --1d",
        )
    return 1 if (one_d or len(to) == 1) else 2


def _check_grid_and_outputs(
    steps: int,
    dims: int,
    max_memory: str | None,
    surface: bool,
    plot: Path | None,
    save_grid_to: Path | None,
) -> None:
    """--steps, the grid's memory, --surface, --plot and --save-grid, before any loading."""
    from gmcurv.landscape.summary import grid_bytes

    if steps < 3:
        raise ConfigError(
            f"--steps {steps}: a landscape needs at least 3 points per axis",
            hint="e.g. --steps 41 (odd counts put a grid point on the centre)",
        )
    preflight(
        grid_bytes(steps, dims),
        parse_bytes(max_memory) if max_memory else None,
        f"--steps {steps}: a {'x'.join([str(steps)] * dims)} grid",
        "lower --steps (e.g. 41)",
    )
    if surface and (plot is None or dims == 1):
        raise ConfigError(
            "--surface draws the 2-D landscape as a 3-D surface into --plot",
            hint="add --plot surface.png (and leave out --1d)",
        )
    if plot is not None:
        check_plot_path(plot)
    if save_grid_to is not None and save_grid_to.suffix.lower() != ".npz":
        raise ConfigError(
            f"--save-grid {save_grid_to}: expected a .npz file name",
            hint="e.g. --save-grid grid.npz",
        )


@dataclass
class _Chosen:
    """The directions and how they were chosen."""

    dirs: list[Any]
    kind: str
    normalisation: str
    eigenvalues: list[Estimate] | None = None
    eigen_method: str | None = None


def _directions(
    session: Session,
    to: list[Path],
    directions: Directions,
    dims: int,
    arch: str | None,
    batch_size: int,
    seed: int,
    tol: float,
    budget: int | None,
    include_bias: bool,
) -> _Chosen:
    """Other checkpoints (--to, loaded by `gmcurv.endpoints`), the top Hessian eigenvectors
    or filter-normalised random directions."""
    from gmcurv.io.endpoints import load_endpoints
    from gmcurv.landscape import checkpoint_directions, eigen_directions, random_directions

    objective, sample, loaded = session.objective, session.data, session.loaded
    assert objective is not None and sample is not None and loaded is not None
    if to:
        ends = load_endpoints(
            to, loaded, objective.params, arch=arch, dtype=session.dtype, device=session.device
        )
        dirs = checkpoint_directions(objective.params, ends, [str(p) for p in to])
        return _Chosen(dirs, "checkpoint", "none")
    if directions is Directions.eigen:
        with session.progress("hessian: top eigenvectors", None) as advance:
            dirs, values, method, notes = eigen_directions(
                objective, sample, dims, batch_size=batch_size, seed=seed, tol=tol,
                budget_bytes=budget, progress=advance,
                phase=lambda text, n: advance.phase(f"hessian: top eigenvectors, {text}", n),
            )  # fmt: skip
        for text in notes:
            session.note(text)
        return _Chosen(dirs, "eigen", "eigen", values, method)
    return _Chosen(
        random_directions(objective.params, dims, seed, include_bias), "random", "filter"
    )


def _write_extras(
    session: Session, block: dict[str, Any], save_grid_to: Path | None, plot: Path | None,
    surface: bool,
) -> None:  # fmt: skip
    """--save-grid and --plot (main rank only); their paths go into the block."""
    if save_grid_to is not None:
        with session.stage("save"):
            save_grid(save_grid_to, block)
        block["grid_file"] = str(save_grid_to)
        session.note(f"grid written to {save_grid_to}")
    if plot is not None:
        from gmcurv.cli.plots.landscape import plot_landscape

        with session.stage("plot"):
            plot_landscape(to_jsonable(block), plot, surface=surface)
        block["plot"] = str(plot)
        session.note(f"plot written to {plot}")


def register(app: typer.Typer) -> None:
    app.command("landscape")(landscape_command)
