"""Several checkpoints in one run (``gmcurv trace CKPT... DATA``): arguments, the loop and
the table.

DATA is loaded once and shared; each checkpoint gets its own model and objective. The
results hold one row per checkpoint under ``results.series`` (see the report schema).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from gmcurv.errors import ConfigError

PathsArg = Annotated[
    list[Path] | None,
    typer.Argument(
        metavar="MODEL... DATA",
        help="Checkpoint(s) then DATA. MODEL: a .safetensors file or a model directory; "
        "several (shell globs) or a directory of checkpoints run as a series ordered by "
        "training step. DATA: a data file or directory of shards. Default: the bundled sample.",
        show_default=False,
    ),
]
NAMES = ("fisher", "ggn", "hessian")


def split_args(paths: list[Path] | None) -> tuple[list[Path], Path | None]:
    """(MODEL-position arguments, DATA) from the positional arguments."""
    paths = list(paths or [])
    if not paths:
        return [], None
    if len(paths) == 1:
        return paths, None
    from gmcurv.io.series import check_data_arg

    check_data_arg(paths[-1])
    return paths[:-1], paths[-1]


def set_config_args(ctx: typer.Context, models: list[Path], data: Path | None) -> None:
    """Record MODEL and DATA in the report's config under their usual names."""
    ctx.params.pop("paths", None)
    ctx.params["model"] = (
        None if not models else str(models[0]) if len(models) == 1 else [str(m) for m in models]
    )
    ctx.params["data"] = None if data is None else str(data)


def run_series(
    session: Any,
    series: Any,
    compute: Callable[[Any], dict[str, Any]],
    *,
    arch: str | None,
    loss: Any,
    layers: str | None,
    mode: Any,
) -> dict[str, Any]:
    """Run `compute(session)` on every checkpoint, the data loaded once (by the session
    opened on the first one); the ``series`` results block."""
    from gmcurv import distributed
    from gmcurv.io.checkpoint import load_model
    from gmcurv.io.factories import load_loss
    from gmcurv.objective import Objective

    rows = []
    for i, ck in enumerate(series.checkpoints):
        t0 = time.perf_counter()
        if i > 0:

            def load(ck=ck) -> None:
                session.loaded = load_model(
                    ck.path,
                    arch=arch,
                    loss=getattr(loss, "value", loss),
                    dtype=session.dtype,
                    device=session.device,
                )
                session.objective = Objective.build(
                    session.loaded.model,
                    load_loss(session.loaded.loss),
                    layers,
                    getattr(mode, "value", mode),
                    session.seed or 0,
                )
                session.objective.check_data(session.data)

            with session.stage("load"):
                distributed.agreed(load, session.comm)
            session.inputs.append(Path(ck.path))
        lm = session.loaded
        session.note(f"checkpoint {i + 1}/{len(series.checkpoints)}: {ck.path}")
        results = compute(session)
        rows.append(
            {
                "index": i,
                "step": ck.step,
                "model": {
                    "path": str(lm.path),
                    "sha256": lm.sha256,
                    "n_params": lm.n_params,
                    "arch": lm.arch,
                    "arch_source": lm.arch_source,
                    "loss": lm.loss,
                },
                "seconds": round(time.perf_counter() - t0, 6),
                "results": results,
            }
        )
    session.loaded = None  # the report's model block: none (one per row instead)
    return {"x": series.x, "order": series.order, "checkpoints": rows}


def with_loss(
    compute: Callable[[Any], dict[str, Any]], batch_size: int
) -> Callable[[Any], dict[str, Any]]:
    """`compute`, plus the mean loss on DATA when it did not report one (GGN/Hessian only)."""
    from gmcurv.pruning import evaluate

    def run(session: Any) -> dict[str, Any]:
        results = compute(session)
        if "loss" not in results:
            with session.stage("loss"):
                results = {"loss": evaluate(session.objective, session.data, batch_size).loss,
                           **results}  # fmt: skip
        return results

    return run


def refuse_in_series(option: str, given: bool) -> None:
    if given:
        raise ConfigError(
            f"{option} works on one checkpoint, not a series",
            hint="run it on one checkpoint (gmcurv trace MODEL DATA ...)",
        )


def _short_name(path: str) -> str:
    """A checkpoint's name for a table: the file stem, or its directory for model.safetensors."""
    p = Path(path)
    if p.name == "model.safetensors":
        return p.parent.name
    return p.name[: -len(".safetensors")] if p.name.endswith(".safetensors") else p.name


def render_series(report: Any, console: Console) -> None:
    """Per curvature, one row per checkpoint: step, loss, λ_max and the trace."""
    from gmcurv.cli.render import fmt, fmt_column, footer, header, new_table, shorten_names

    header(report, console, "gmcurv trace (series)")
    block = report.to_dict()["results"]["series"]
    rows = block["checkpoints"]
    names = shorten_names([_short_name(r["model"]["path"]) for r in rows], 24)
    xs = [str(r["step"] if block["x"] == "step" else r["index"]) for r in rows]
    losses = fmt_column([(r["results"].get("loss") or {}).get("value") for r in rows])
    for n in NAMES:
        blocks = [r["results"].get(n) or {} for r in rows]
        if not any(blocks):
            continue
        kind = n.upper() if n == "ggn" else n.capitalize()
        if n == "fisher":
            kind += f" ({next(b for b in blocks if b).get('type')})"
        console.print(f"{kind}: {len(rows)} checkpoints, {block['order']}", soft_wrap=True)
        table = new_table(
            None,
            "checkpoint",
            "step" if block["x"] == "step" else "#",
            "loss",
            "λ_max",
            "trace",
        )
        lam = fmt_column([(b.get("eigenvalues") or [{}])[0].get("value") for b in blocks])
        traces = fmt_column([(b.get("trace") or {}).get("value") for b in blocks])
        for i, b in enumerate(blocks):
            se = (b.get("trace") or {}).get("stderr")
            tr = traces[i] + (f" ± {fmt(se, 2)}" if se is not None else "")
            table.add_row(names[i], xs[i], losses[i], lam[i], tr)
        console.print(table)
    footer(report, console)
