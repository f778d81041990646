"""``gmcurv info``: what a checkpoint holds — architecture, layers, parameter counts, metadata."""

from __future__ import annotations

import json as jsonlib

import typer
from rich.console import Console

from gmcurv.cli import options as o
from gmcurv.cli.render import footer, header, new_table
from gmcurv.cli.session import Session
from gmcurv.results import Report


def render(report: Report, console: Console) -> None:
    header(report, console, "gmcurv info")
    res = report.to_dict()["results"]
    console.print(
        f"architecture [bold]{res['arch']}[/bold] (from {res['arch_source']}), "
        f"loss {res['loss']}, {res['n_params']:,} parameters, "
        f"sha256 {res['sha256'][:16]}…"
    )
    table = new_table(None, "layer", "capture", "parameters", "count")
    for layer in res["layers"]:
        shapes = ", ".join(f"{k.rsplit('.', 1)[-1]} {tuple(v)}" for k, v in layer["params"].items())
        table.add_row(layer["name"], layer["kind"], shapes, f"{layer['n_params']:,}")
    console.print(table)
    if res["masks"]:
        masks = ", ".join(f"{k} {100 * v:.1f}%" for k, v in res["masks"].items())
        console.print(f"pruning masks (sparsity, from {res['masks_file']}): {masks}")
    if res["metadata"]:
        meta = new_table("metadata", "key", "value")
        for k, v in res["metadata"].items():
            meta.add_row(k, v)
        console.print(meta)
    footer(report, console)


def info(
    ctx: typer.Context,
    model: o.ModelArg = None,
    arch: o.ArchOpt = None,
    loss: o.LossOpt = None,
    json: o.JsonOpt = False,
    output: o.OutputOpt = None,
    quiet: o.QuietOpt = False,
) -> None:
    """Architecture, layers (and how each is captured), parameter counts and metadata."""
    from gmcurv.capture import describe_layers
    from gmcurv.io.masks import META_MASKS, masks_path
    from gmcurv.io.tensors import MASK_PREFIX
    from gmcurv.pruning import mask_sparsity

    session = Session.open(
        ctx,
        model,
        None,
        arch=arch,
        loss=loss,
        device="cpu",
        quiet=quiet,
        json_mode=json,
        need_data=False,
    )
    lm = session.loaded
    assert lm is not None
    meta = {}
    for k, v in lm.metadata.items():
        try:
            parsed = jsonlib.loads(v)
            meta[k] = v if isinstance(parsed, str) else jsonlib.dumps(parsed)
        except ValueError:
            meta[k] = v
    results = {
        "arch": lm.arch,
        "arch_source": lm.arch_source,
        "loss": lm.loss,
        "n_params": lm.n_params,
        "sha256": lm.sha256,
        "file_bytes": lm.path.stat().st_size,
        "layers": describe_layers(lm.model),
        "masks": mask_sparsity(lm.masks),
        "masks_file": None
        if not lm.masks
        else masks_path(lm.path).name
        if META_MASKS in lm.metadata
        else f"{lm.path.name} ({MASK_PREFIX}* tensors)",
        "metadata": meta,
    }
    session.finish(session.report(results), render, output)


def register(app: typer.Typer) -> None:
    app.command("info")(info)
