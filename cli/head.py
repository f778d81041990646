"""``gmcurv head zoo|train|eval|info``: build the model zoo, train, evaluate and describe the
GradMetaNet head (the learned curvature estimator behind ``--method learned``)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from gmcurv.cli import options as o
from gmcurv.cli.render import fmt, new_table
from gmcurv.cli.session import Advance, Session, resolved_config, stderr
from gmcurv.errors import ConfigError
from gmcurv.results import Report

CacheDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        envvar="GMCURV_ZOO_DIR",
        help="Where the zoo lives (default ~/.cache/gmcurv/zoo; never inside git).",
        show_default=False,
    ),
]
HeadOpt = Annotated[
    Path | None,
    typer.Option(
        "--head",
        envvar="GMCURV_HEAD",
        help="Head file (default: the shipped one).",
        show_default=False,
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads", min=1, help="torch threads (default: torch's choice).", show_default=False
    ),
]

head_app = typer.Typer(
    help="Build the model zoo, train, evaluate and describe the GradMetaNet head.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)


def _session(ctx: typer.Context, name: str, seed: int | None, quiet: bool, json: bool) -> Session:
    return Session(
        command=f"head {name}",
        config=resolved_config(ctx),
        seed=seed,
        quiet=quiet,
        json_mode=json,
    )


def _cache(cache_dir: Path | None) -> Path:
    from gmcurv.gradmetanet.zoo import default_cache_dir

    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _threads(n: int | None) -> None:
    import torch

    if n is not None:
        torch.set_num_threads(n)


# ------------------------------------------------------------------------------------ zoo
def _render_zoo(report: Report, console: Console) -> None:
    res = report.to_dict()["results"]
    table = new_table(f"model zoo at {res['cache_dir']} ({res['size']})", "split", "runs", "models")
    for split, c in res["splits"].items():
        table.add_row(split, str(c["runs"]), str(c["models"]))
    console.print(table)
    console.print(
        f"held out: dataset [bold]{res['held_out_dataset']}[/bold], architectures "
        f"{', '.join(res['held_out_archs'])} · {res['bytes'] / 1e6:.0f} MB on disk"
    )


@head_app.command("zoo")
def zoo(
    ctx: typer.Context,
    cache_dir: CacheDirOpt = None,
    size: Annotated[
        str, typer.Option("--size", help="tiny | small | default (the shipped head's zoo).")
    ] = "default",
    seed: o.SeedOpt = 0,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Worker processes.")] = 1,
    json: o.JsonOpt = False,
    output: o.OutputOpt = None,
    quiet: o.QuietOpt = False,
) -> None:
    """Build (or finish building) the model zoo: small MLPs, exact targets, gradient sets.

    Example: [bold]gmcurv head zoo --workers 2[/bold]
    """
    from gmcurv.gradmetanet.zoo import HELD_OUT_ARCHS, HELD_OUT_DATASET, build_zoo

    session = _session(ctx, "zoo", seed, quiet, json)
    cache = _cache(cache_dir)
    with session.stage("zoo"), session.progress("building the zoo (runs)", None) as advance:

        def prog(done: int, total: int) -> None:
            advance.update(done, total)

        plan = build_zoo(cache, size, seed, workers, prog)
    splits: dict[str, dict[str, int]] = {}
    for s in plan:
        c = splits.setdefault(s.split, {"runs": 0, "models": 0})
        c["runs"] += 1
        c["models"] += len(s.steps)
    size_bytes = sum(p.stat().st_size for p in (cache / "groups").glob("*.safetensors"))
    results = {
        "cache_dir": str(cache),
        "size": size,
        "splits": splits,
        "held_out_dataset": HELD_OUT_DATASET,
        "held_out_archs": ["x".join(map(str, a)) for a in HELD_OUT_ARCHS],
        "bytes": size_bytes,
    }
    session.finish(session.report(results), _render_zoo, output)


# ---------------------------------------------------------------------------------- train
def _render_train(report: Report, console: Console) -> None:
    res = report.to_dict()["results"]
    table = new_table(
        "validation (zoo models not trained on)",
        "epoch",
        "Fisher diag NMAE head",
        "plug-in",
        "OBS NMAE head",
        "plug-in",
    )
    for h in res["history"]:
        table.add_row(
            str(h["epoch"]),
            fmt(h.get("head.fisher_diag.nmae")),
            fmt(h.get("plug.fisher_diag.nmae")),
            fmt(h.get("head.obs_curv.nmae")),
            fmt(h.get("plug.obs_curv.nmae")),
        )
    console.print(table)
    console.print(
        f"saved [cyan]{res['saved']}[/cyan] (best epoch {res['best_epoch']}, {res['steps']} steps, "
        f"{res['seconds']:.0f}s)"
    )


def _command_line(parts: list[str]) -> str:
    return " ".join(["gmcurv", *parts])


@head_app.command("train")
def train(
    ctx: typer.Context,
    cache_dir: CacheDirOpt = None,
    save: Annotated[
        Path, typer.Option("--save", help="Where to write the trained head (.safetensors).")
    ] = Path("gradmetanet_head.safetensors"),
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Passes over the zoo.")] = 8,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Peak learning rate.")] = 2e-3,
    seed: o.SeedOpt = 0,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint",
            help="Resumable training state (default: <cache-dir>/head_checkpoint.safetensors).",
            show_default=False,
        ),
    ] = None,
    max_steps: Annotated[
        int | None,
        typer.Option("--max-steps", min=1, help="Stop after this many steps.", show_default=False),
    ] = None,
    threads: ThreadsOpt = None,
    json: o.JsonOpt = False,
    output: o.OutputOpt = None,
    quiet: o.QuietOpt = False,
) -> None:
    """Train a head on the zoo (seeded; resumes from --checkpoint after an interruption).

    Example: [bold]gmcurv head train --save my_head.safetensors --epochs 10[/bold]
    """
    from gmcurv.gradmetanet.head import head_metadata
    from gmcurv.gradmetanet.model import HeadConfig
    from gmcurv.gradmetanet.pretrained import save_head
    from gmcurv.gradmetanet.provenance import n_models, supported_models, training_record
    from gmcurv.gradmetanet.train import TrainConfig, load_items, train_head
    from gmcurv.gradmetanet.zoo import read_plan

    _threads(threads)
    if save.suffix != ".safetensors":
        raise ConfigError(
            f"--save {save}: the head is written as .safetensors",
            hint="use a file name ending in .safetensors",
        )
    session = _session(ctx, "train", seed, quiet, json)
    cache = _cache(cache_dir)
    plan = read_plan(cache)
    total = n_models(plan, "train") + n_models(plan, "val")
    with session.stage("load"), session.progress("loading the zoo", total) as adv:
        train_items = load_items(cache, ["train"], adv)
        val_items = load_items(cache, ["val"], adv)
    cfg = TrainConfig(epochs=epochs, lr=lr, seed=seed)
    head_cfg = HeadConfig()
    ckpt = checkpoint or cache / "head_checkpoint.safetensors"
    with session.stage("train"), session.progress("training the head (steps)", None) as adv:
        res = train_head(
            train_items,
            val_items,
            head_cfg,
            cfg,
            ckpt,
            _train_progress(session, adv, max_steps),
            max_steps,
        )
    commands = [
        _command_line(["head", "zoo", "--size", plan["size"], "--seed", str(plan["seed"])]),
        _command_line(
            ["head", "train", "--epochs", str(epochs), "--lr", f"{lr:g}", "--seed", str(seed),
             "--save", str(save)] + (["--max-steps", str(max_steps)] if max_steps else [])
        ),
    ]  # fmt: skip
    training = training_record(
        plan, train_models=len(train_items), val_models=len(val_items), config=cfg.to_dict(),
        commands=commands, result=res,
    )  # fmt: skip
    save_head(save, res.model, head_metadata(head_cfg, training, supported_models(plan)))
    results = {
        "saved": str(save),
        "best_epoch": res.best_epoch,
        "steps": res.steps,
        "seconds": res.seconds,
        "history": res.history,
        "commands": commands,
    }
    session.finish(session.report(results), _render_train, output)


def _train_progress(
    session: Session, adv: Advance, max_steps: int | None = None
) -> Callable[[dict], None]:
    """Training events: a step sets the bar (of all steps, or --max-steps); an epoch prints
    its validation NMAE."""

    def prog(event: dict[str, Any]) -> None:
        if event["event"] == "step":
            total = event.get("total")
            adv.update(event["step"], min(total, max_steps) if total and max_steps else total)
        elif not session.quiet:
            stderr.print(
                f"[dim]epoch {event['epoch']}: val Fisher-diag NMAE head "
                f"{fmt(event.get('head.fisher_diag.nmae'))} vs plug-in "
                f"{fmt(event.get('plug.fisher_diag.nmae'))}[/dim]"
            )

    return prog


# ----------------------------------------------------------------------------------- eval
LABELS = {
    "fisher_diag.nmae": "diag F · NMAE",
    "obs_curv.nmae": "OBS curv. · NMAE",
    "fisher_trace.logerr": "tr F · |ln r|",
    "fisher_trace.relerr": "tr F · rel.",
    "fisher_trace_from_diag.logerr": "tr F as Σdiag · |ln r|",
    "fisher_trace_from_diag.relerr": "tr F as Σdiag · rel.",
    "hessian_trace.logerr": "tr H · |ln r|",
    "hessian_trace.relerr": "tr H · rel.",
    "hessian_top.logerr": "λmax H · |ln r|",
    "hessian_top.relerr": "λmax H · rel.",
}


def _render_eval(report: Report, console: Console) -> None:
    res = report.to_dict()["results"]
    baselines: dict[str, str] = {}
    for split, summary in res["splits"].items():
        table = new_table(
            f"held-out split {split}: head vs baseline on the same b gradients",
            "target",
            "head",
            "baseline",
            "change",
            "head med",
            "base med",
            "wins",
        )
        for metric, s in summary.items():
            change = s["change"]
            color = "green" if change is not None and change < 0 else "red"
            table.add_row(
                LABELS.get(metric, metric),
                fmt(s["head"]),
                fmt(s["plug"]),
                "—" if change is None else f"[{color}]{100 * change:+.1f}%[/{color}]",
                fmt(s.get("head_median")),
                fmt(s.get("plug_median")),
                "—" if s["head_better_share"] is None else f"{100 * s['head_better_share']:.0f}%",
            )
            baselines[LABELS.get(metric, metric).split(" · ")[0]] = s["baseline"]
        console.print(table)
    for target, base in baselines.items():
        console.print(f"[dim]{target}: baseline = {base}[/dim]")
    iv = res.get("intervals")
    if iv:
        _render_intervals(iv, console)
    console.print(
        f"[dim]{res['n_models']} held-out models; errors against the exact large-sample "
        "values, mean (and median) over draws; NMAE = Σ|pred - true| / Σ|true|; "
        "|ln r| = |ln(pred / true)|; rel. = |pred - true| / true; wins = share of draws "
        f"where the head is closer · head {res['head']}[/dim]"
    )


def _render_intervals(iv: dict[str, Any], console: Console) -> None:
    """Coverage of the calibrated intervals on each held-out split, per size bin."""
    edges = iv["edges"]
    bounds = [0, *edges, None]
    bins = [
        f"P<{int(hi):,}"
        if lo == 0
        else (f"P>={int(lo):,}" if hi is None else f"{int(lo):,}-{int(hi):,}")
        for lo, hi in itertools.pairwise(bounds)
    ]
    table = new_table(
        f"{100 * iv['level']:.0f} % intervals fitted on {iv['source']}: coverage on "
        "held-out models",
        "target",
        "split",
        "coverage",
        *bins,
        "draws",
    )
    for split, per_target in iv["coverage"].items():
        for target, c in per_target.items():
            table.add_row(
                target,
                split,
                fmt(c["coverage"], 3),
                *[fmt(x, 3) for x in c["by_bin"]],
                str(c["n"]),
            )
    console.print(table)


@head_app.command("eval")
def evaluate(
    ctx: typer.Context,
    head: HeadOpt = None,
    cache_dir: CacheDirOpt = None,
    splits: Annotated[
        str, typer.Option("--splits", help="Comma-separated zoo splits to evaluate on.")
    ] = "test-dataset,test-arch",
    record: Annotated[
        bool,
        typer.Option("--record", help="Store the metrics in the head file's metadata."),
    ] = False,
    calibration_split: Annotated[
        str,
        typer.Option(
            "--calibration-split",
            help="Zoo split the intervals are fitted on (coverage is measured on --splits).",
        ),
    ] = "val",
    threads: ThreadsOpt = None,
    json: o.JsonOpt = False,
    output: o.OutputOpt = None,
    quiet: o.QuietOpt = False,
) -> None:
    """Evaluate a head on held-out zoo models against the plug-in estimators; fit its
    calibrated intervals on --calibration-split and measure their coverage.

    Example: [bold]gmcurv head eval --json -o heldout.json[/bold]
    """
    from gmcurv.gradmetanet.evaluate import evaluate_head
    from gmcurv.gradmetanet.pretrained import load_head, save_head
    from gmcurv.gradmetanet.zoo import SPLITS, read_plan

    _threads(threads)
    chosen = tuple(s.strip() for s in splits.split(",") if s.strip())
    bad = [s for s in chosen if s not in SPLITS]
    if calibration_split not in SPLITS or calibration_split in chosen:
        raise ConfigError(
            f"--calibration-split {calibration_split!r}: must be a zoo split not in --splits",
            hint="use val (the default) and held-out --splits",
        )
    if bad or not chosen:
        raise ConfigError(
            f"--splits: unknown split {bad[0] if bad else ''!r}",
            hint=f"use some of {', '.join(SPLITS)}",
        )
    session = _session(ctx, "eval", None, quiet, json)
    cache = _cache(cache_dir)
    plan = read_plan(cache)
    loaded = load_head(head)
    used = (*chosen, calibration_split)
    total = sum(len(g["steps"]) for g in plan["groups"] if g["split"] in used)
    with session.stage("eval"), session.progress("evaluating (models)", total) as adv:
        ev = evaluate_head(loaded, cache, chosen, adv, calibration_split)
    intervals = None if ev["intervals"] is None else ev["intervals"].to_dict()
    if intervals is None:
        session.note(f"no built models in split {calibration_split!r}: no intervals fitted")
    if record:
        meta = dict(loaded.meta)
        metrics = dict(meta.get("metrics", {}))
        kept = int(metrics.get("n_models") or 0)
        if ev["n_models"] and ev["n_models"] >= kept:  # never by a smaller evaluation
            metrics.update(
                heldout=ev["splits"],
                all=ev["all"],
                calibration=ev["calibration"],
                n_models=ev["n_models"],
            )
        else:
            session.note(
                f"{ev['n_models']} held-out models < the {kept} the head's accuracy was "
                "recorded on: that accuracy is kept (intervals are recorded)"
            )
        if intervals is not None:
            metrics.update(intervals=intervals, ranges=ev["ranges"] or {})
        meta["metrics"] = metrics
        save_head(loaded.path, loaded.model, meta)
        session.note(f"metrics recorded in {loaded.path}")
    results = {
        "head": str(loaded.path),
        "splits": ev["splits"],
        "all": ev["all"],
        "calibration": ev["calibration"],
        "intervals": intervals,
        "ranges": ev["ranges"],
        "n_models": ev["n_models"],
    }
    session.finish(session.report(results), _render_eval, output)


# ----------------------------------------------------------------------------------- info
def _render_info(report: Report, console: Console) -> None:
    from rich.markdown import Markdown

    res = report.to_dict()["results"]
    if res.get("card"):
        console.print(Markdown(res["card"]))
        console.print(f"[dim]head: {res['path']}\ncard: {res['card_file']}[/dim]", soft_wrap=True)
        return
    meta = res["metadata"]
    console.print(f"[bold]GradMetaNet head[/bold] {res['path']} (version {meta.get('version')})")
    sup = meta.get("supported", {})
    console.print(
        f"supports: {sup.get('model')}, loss {sup.get('loss')}, {sup.get('fisher')} Fisher, "
        f"activations {', '.join(sup.get('activations', []))}, "
        f"{sup.get('min_layers')}-{sup.get('max_layers')} linear layers; others: --method exact"
    )
    for cmd in meta.get("training", {}).get("commands", []):
        console.print(f"  [cyan]{cmd}[/cyan]")
    measured = res.get("measured")
    if measured:
        console.print(Markdown(measured))


@head_app.command("info")
def info(
    ctx: typer.Context,
    head: HeadOpt = None,
    json: o.JsonOpt = False,
    output: o.OutputOpt = None,
    quiet: o.QuietOpt = False,
) -> None:
    """Print the head's model card: training data, targets, held-out accuracy, support."""
    from gmcurv.gradmetanet.pretrained import CARD_FILE, HEAD_FILE, read_head_metadata

    session = _session(ctx, "info", None, quiet, json)
    path = Path(head) if head is not None else HEAD_FILE
    meta = read_head_metadata(path)
    shipped = path.resolve() == HEAD_FILE.resolve()
    card = CARD_FILE.read_text() if shipped and CARD_FILE.exists() else None
    from gmcurv.gradmetanet.card import measured_section

    results = {
        "path": str(path),
        "metadata": meta,
        "card": card,
        "card_file": str(CARD_FILE) if card is not None else None,  # the installed card
        "measured": measured_section(meta),
        "file_bytes": path.stat().st_size,
    }
    session.finish(session.report(results), _render_info, output)


def register(app: typer.Typer) -> None:
    app.add_typer(head_app, name="head")
