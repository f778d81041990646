"""``gmcurv saliency``: magnitude / OBD / OBS saliencies, pruning curves, ``--prune`` writes a
pruned checkpoint."""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from gmcurv.cli import options as o
from gmcurv.cli.exports import SaveScoresOpt, write_scores
from gmcurv.cli.plots import check_plot_path
from gmcurv.cli.render import (
    fmt,
    fmt_column,
    fmt_estimate,
    footer,
    header,
    new_table,
    shorten_names,
)
from gmcurv.cli.session import Session
from gmcurv.errors import ConfigError
from gmcurv.io.fileio import ensure_not_input, sha256_file
from gmcurv.memory import parse_bytes
from gmcurv.results import Report, to_jsonable

if TYPE_CHECKING:
    from gmcurv.saliency import PruneResult, SaliencyAnalysis

# = gmcurv.saliency.DEFAULT_ROUNDS / LEVELS and gmcurv.woodbury.DEFAULT_DAMPING, not imported
# (that would load torch at start-up for --help); a test keeps them equal
DEFAULT_ROUNDS = 8
LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)
DEFAULT_DAMPING = 1e-2


class Criterion(str, Enum):
    magnitude = "magnitude"
    obd = "obd"
    obs = "obs"
    obd_hessian = "obd-hessian"


class Scope(str, Enum):
    global_ = "global"
    layer = "layer"


class Structure(str, Enum):
    block = "block"
    global_ = "global"


def _checked_fraction(value: float | None) -> float | None:
    """Parse-time check of --prune: a fraction in [0, 1)."""
    from gmcurv.pruning import check_fraction

    return None if value is None else check_fraction(value)


def _checked_damping(value: float) -> float:
    """Parse-time check of --damping: positive and finite."""
    if not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value} is not a positive finite number (e.g. 0.01)")
    return value


PruneOpt = Annotated[
    float | None,
    typer.Option(
        "--prune",
        callback=lambda v: _checked_fraction(v),
        help="Remove this fraction of the prunable weights (0 <= F < 1) and write a pruned "
        "checkpoint.",
        show_default=False,
    ),
]
CriterionOpt = Annotated[
    Criterion,
    typer.Option("--criterion", envvar="GMCURV_CRITERION", help="Which saliency --prune uses."),
]
ScopeOpt = Annotated[
    Scope,
    typer.Option(
        "--scope", help="Rank all prunable weights together (global) or each tensor alone."
    ),
]
UpdateOpt = Annotated[
    bool | None,
    typer.Option(
        "--update/--no-update",
        help="Apply the OBS weight update to the remaining weights (default: on for obs).",
        show_default=False,
    ),
]
RoundsOpt = Annotated[
    int,
    typer.Option(
        "--rounds", min=1, help="Iterative OBS: prune in this many rounds, re-capturing between."
    ),
]
StructureOpt = Annotated[
    Structure,
    typer.Option(
        "--structure",
        help="Fisher inverse for OBS: block-diagonal per layer (WoodFisher) or the full Fisher.",
    ),
]
DampingOpt = Annotated[
    float,
    typer.Option(
        "--damping",
        callback=lambda v: _checked_damping(v),
        help="OBS damping relative to the mean Fisher eigenvalue: eps = damping * tr(F) / P.",
    ),
]
IncludeBiasOpt = Annotated[
    bool,
    typer.Option(
        "--include-bias", help="Also prune biases and normalisation parameters (off by default)."
    ),
]
EvalDataOpt = Annotated[
    Path | None,
    typer.Option(
        "--eval-data",
        help="Data to measure loss/accuracy on (default: DATA), e.g. a held-out split.",
        show_default=False,
    ),
]
LevelsOpt = Annotated[
    str,
    typer.Option("--levels", help="Sparsity levels of the pruning curves, comma-separated."),
]
ProbesOpt = Annotated[
    int,
    typer.Option("--probes", min=1, help="Hutchinson probes for the obd-hessian diagonal."),
]
SavePrunedOpt = Annotated[
    Path | None,
    typer.Option(
        "--save-pruned",
        help="With --prune: where to write the pruned checkpoint: a .safetensors file (a "
        "plain state dict; its pruning masks go beside it to <name>.masks.safetensors) or a "
        "directory (no suffix: save_pretrained's layout, model.safetensors + the model's "
        "config.json and tokenizer files, loadable by from_pretrained). Default: "
        "<model>.pruned-<percent>.safetensors beside a file MODEL, the directory "
        "<dir>.pruned-<percent> beside a directory MODEL.",
        show_default=False,
    ),
]
ReportOpt = Annotated[  # the old name of -o/--output here (before -o meant the report)
    Path | None,
    typer.Option("--report", hidden=True, help="Deprecated: use -o/--output.", show_default=False),
]


# --------------------------------------------------------------------------------- results
def _common(fisher: str, columns: int, n: int, damping: float, eps: float | None) -> dict:
    from gmcurv.saliency import CONVENTION

    return {
        "convention": CONVENTION,
        "fisher": {"type": fisher, "columns": columns, "n_examples": n},
        "damping": {
            "relative": damping,
            "eps": eps,
            "definition": "eps = damping * tr(F) / P (F on DATA, P = captured parameters)",
        },
    }


def analysis_results(a: SaliencyAnalysis) -> dict[str, Any]:
    out = _common(a.fisher, a.columns, a.n_examples, a.damping, a.eps)
    out.update(
        {
            "criteria": a.criteria,
            "structure": a.structure,
            "scope": a.scope,
            "n_params": a.n_params,
            "n_prunable": a.n_prunable,
            "n_already_pruned": a.n_already_pruned,
            "baseline": {"loss": a.baseline.loss, "accuracy": a.baseline.accuracy, "n": a.n_eval},
            "layers": {
                k: {"n_params": v.n_params, "saliency": v.stats} for k, v in a.layers.items()
            },
            "sweep": a.sweep,
        }
    )
    return out


PREDICTION_ASSUMPTION = (
    "second-order (quadratic) model of the loss at the current weights, with the Fisher "
    "for the Hessian and the gradient term dropped; exact only for small weight changes, "
    "so it underestimates large removals"
)


def prune_results(r: PruneResult, path: Path, sha: str) -> dict[str, Any]:
    s = r.summary()
    s["checkpoint"] = {"path": str(path), "sha256": sha}
    s["measured_increase"] = r.after.loss.value - r.before.loss.value
    if r.predicted_increase is not None:
        s["prediction_assumption"] = PREDICTION_ASSUMPTION
    return s


# --------------------------------------------------------------------------------- rendering
def render(report: Report, console: Console) -> None:
    header(report, console, "gmcurv saliency")
    res = report.to_dict()["results"]
    damp = res["damping"]
    eps = fmt(damp["eps"]) if damp["eps"] is not None else "—"
    console.print(
        f"Fisher {res['fisher']['type']} (N={res['fisher']['n_examples']:,}), "
        f"eps {eps} = {damp['relative']:g} x tr(F)/P",
        soft_wrap=True,
    )
    console.print(f"[dim]{res['convention']}[/dim]", soft_wrap=True)
    if "layers" in res:
        _render_layers(res, console)
        _render_sweep(res, console)
    if "prune" in res:
        _render_prune(res["prune"], console)
    footer(report, console)


def _render_layers(res: dict, console: Console) -> None:
    table = new_table(
        f"Saliency per tensor ({res['n_prunable']:,} prunable of {res['n_params']:,} parameters; "
        f"OBS {res['structure']}-wise)",
        "tensor",
        "criterion",
        "median",
        "p95",
        "max",
        "mean",
    )
    short = shorten_names(list(res["layers"]), 24)
    for info, label in zip(res["layers"].values(), short, strict=True):
        first = True
        for crit, st in info["saliency"].items():
            table.add_row(
                f"{label} ({info['n_params']:,})" if first else "",
                crit,
                *(fmt_estimate(st[k]) for k in ("median", "p95", "max", "mean")),
                end_section=crit == list(info["saliency"])[-1],
            )
            first = False
    console.print(table)


def _render_sweep(res: dict, console: Console) -> None:
    """Loss (and accuracy) after pruning, one table each: rows criteria, columns sparsity;
    numbers carry the digits that tell the cells apart."""
    sweep = res["sweep"]
    if not sweep:
        return
    first = next(iter(sweep.values()))
    base = res["baseline"]
    acc = base.get("accuracy")
    levels = [f"{100 * p['fraction']:g}%" for p in first]
    crits = list(sweep)
    names = shorten_names(crits, 16)
    what = f"{res['scope']} scope, no retraining, {base['n']:,} examples"
    losses = [base["loss"]["value"]] + [p["loss"]["value"] for c in crits for p in sweep[c]]
    texts = fmt_column(losses)
    console.print(f"After pruning ({what}):", soft_wrap=True)
    table = new_table(f"loss; unpruned {texts[0]}", "criterion", *levels)
    k = 1
    for name, crit in zip(names, crits, strict=True):
        table.add_row(name, *texts[k : k + len(sweep[crit])])
        k += len(sweep[crit])
    console.print(table)
    if acc:
        accs = [acc["value"]] + [
            (p.get("accuracy") or {}).get("value") for c in crits for p in sweep[c]
        ]
        pct = _percent_column(accs)
        table = new_table(f"accuracy; unpruned {pct[0]}", "criterion", *levels)
        k = 1
        for name, crit in zip(names, crits, strict=True):
            table.add_row(name, *pct[k : k + len(sweep[crit])])
            k += len(sweep[crit])
        console.print(table)
    if "obs+update" in sweep:
        console.print(
            "[dim]obs+update: the OBS masks plus the exact one-shot OBS update of the remaining "
            "weights; --prune F applies it in --rounds re-linearised rounds[/dim]",
            soft_wrap=True,
        )


def _percent_column(values: list[float | None]) -> list[str]:
    """Fractions as percentages with the decimals (0-3) that tell distinct values apart."""
    distinct = {v for v in values if v is not None}
    for d in range(1, 4):
        texts = ["—" if v is None else f"{100 * v:.{d}f}%" for v in values]
        if len({t for t in texts if t != "—"}) == len(distinct):
            return texts
    return texts


def _render_prune(p: dict, console: Console) -> None:
    how = p["criterion"] + (" + OBS update" if p["update"] else "")
    if p["update"] and p["rounds"] > 1:
        how += f" in {p['rounds']} rounds"
    console.print(
        f"[bold]Pruned {p['n_removed']:,} of {p['n_prunable']:,} prunable weights[/bold] "
        f"({100 * p['fraction']:g}%, {how}, {p['scope']} scope)",
        soft_wrap=True,
    )
    table = new_table(None, "", "loss", "accuracy")
    for label, ev in (("before", p["before"]), ("after", p["after"])):
        a = ev.get("accuracy")
        table.add_row(label, fmt_estimate(ev["loss"]), f"{100 * a['value']:.2f}%" if a else "—")
    console.print(table)
    sparsity = ", ".join(f"{k} {100 * v['sparsity']:.1f}%" for k, v in p["layers"].items())
    console.print(f"sparsity per tensor: {sparsity}", soft_wrap=True)
    _render_increase(p, console)
    ck = p["checkpoint"]
    console.print(f"wrote [cyan]{ck['path']}[/cyan] (sha256 {ck['sha256'][:16]}…)", soft_wrap=True)


def _render_increase(p: dict, console: Console) -> None:
    """Measured loss increase beside OBS's prediction and the assumption behind it."""
    measured = p["after"]["loss"]["value"] - p["before"]["loss"]["value"]
    pred = p.get("predicted_increase")
    line = f"loss increase: measured {fmt(measured)}"
    if not pred:
        console.print(line, soft_wrap=True)
        return
    line += f" · predicted {fmt(pred['value'])} ({pred['method']})"
    if pred["value"] and pred["value"] > 0 and measured > 0:
        ratio = measured / pred["value"]
        line += f" · measured/predicted {ratio:.3g}x"
    console.print(line, soft_wrap=True)
    console.print(
        "[dim]the prediction is a second-order model at the current weights (Fisher for the "
        "Hessian, gradient term dropped): exact for small changes only, so it underestimates "
        "large removals; a large gap is this known limit, not a wrong number[/dim]",
        soft_wrap=True,
    )


# ---------------------------------------------------------------------------------- command
def _parse_levels(text: str) -> list[float]:

    try:
        levels = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(
            f"--levels {text!r} is not a comma-separated list of fractions",
            hint="write e.g. --levels 0.1,0.3,0.5,0.7,0.9",
        ) from None
    if not levels:
        raise ConfigError("--levels is empty", hint="write e.g. --levels 0.1,0.5,0.9")
    for f in levels:
        if not (math.isfinite(f) and 0 <= f < 1):
            raise ConfigError(
                f"--levels {text!r}: {f:g} is not a sparsity in [0, 1)",
                hint="write fractions of the prunable weights, e.g. --levels 0.1,0.5,0.9",
            )
    return levels


def _outputs(
    output: Path | None, report: Path | None, save_pruned: Path | None, prune: float | None
) -> Path | None:
    """Check -o (the JSON report, as in every command), its deprecated alias --report and
    --save-pruned (the pruned checkpoint); the report path or None."""
    if output is not None and output.suffix.lower() == ".safetensors":
        raise ConfigError(
            f"-o {output}: -o/--output is the JSON report; the pruned checkpoint has its own "
            "option, --save-pruned",
            hint=f"use --prune FRACTION --save-pruned {output} (and -o report.json for the report)",
        )
    if report is not None:
        if output is not None:
            raise ConfigError(
                f"--report {report} and -o {output}: --report is the old name of -o/--output",
                hint="give the JSON report once, with -o",
            )
        output = report
    if save_pruned is not None:
        if prune is None:
            raise ConfigError(
                f"--save-pruned {save_pruned}: a pruned checkpoint is only written with --prune",
                hint="add --prune FRACTION",
            )
        from gmcurv.io.pruned import FILE_SUFFIXES

        if save_pruned.suffix.lower() in FILE_SUFFIXES and not save_pruned.is_dir():
            raise ConfigError(
                f"--save-pruned {save_pruned}: the pruned checkpoint is a .safetensors file "
                "or a directory",
                hint="give a name ending in .safetensors (e.g. model.pruned.safetensors), or a "
                "directory name for the save_pretrained layout",
            )
    return output


def saliency(
    ctx: typer.Context,
    model: o.ModelArg = None,
    data: o.DataArg = None,
    prune: PruneOpt = None,
    criterion: CriterionOpt = Criterion.obs,
    scope: ScopeOpt = Scope.global_,
    update: UpdateOpt = None,
    rounds: RoundsOpt = DEFAULT_ROUNDS,
    structure: StructureOpt = Structure.block,
    damping: DampingOpt = DEFAULT_DAMPING,
    fisher: o.FisherOpt = o.FisherType.empirical,
    mc_samples: o.McSamplesOpt = 1,
    include_bias: IncludeBiasOpt = False,
    eval_data: EvalDataOpt = None,
    levels: LevelsOpt = ",".join(f"{x:g}" for x in LEVELS),
    probes: ProbesOpt = 32,
    method: o.MethodOpt = o.Method.auto,
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
    save_pruned: SavePrunedOpt = None,
    report_path: ReportOpt = None,
    plot: o.PlotOpt = None,
    save_scores: SaveScoresOpt = None,
    quiet: o.QuietOpt = False,
    fail_if: o.FailIfOpt = None,
    strict: o.StrictOpt = False,
) -> None:
    """Pruning saliency (magnitude, OBD, OBS) per tensor and what pruning would cost;
    --prune F removes that fraction and writes a pruned checkpoint.

    Examples: [bold]gmcurv saliency[/bold] (bundled sample) ·
    [bold]gmcurv saliency --prune 0.5[/bold] ·
    [bold]gmcurv saliency m.safetensors d/ --prune 0.7 --save-pruned m70.safetensors[/bold]
    """
    _check_method(method, prune, criterion)
    level_list = _parse_levels(levels)
    report_file = _outputs(output, report_path, save_pruned, prune)
    if plot is not None:
        check_plot_path(plot)
    session = Session.open(
        ctx, model, data, arch=arch, loss=loss, samples=samples, device=device, dtype=dtype,
        mode=mode, layers=layers, seed=seed, quiet=quiet, json_mode=json,
    )  # fmt: skip
    if report_path is not None:
        session.note("--report is deprecated: -o/--output writes the JSON report, as everywhere")
    assert session.objective is not None and session.data is not None
    assert session.loaded is not None
    ev = _eval_data(ctx, session, eval_data)
    target = _pruned_target(session, prune, save_pruned, report_file)
    if save_scores is not None:
        _check_save_scores(session, save_scores, method, criterion, target, report_file, plot)
    budget = parse_bytes(max_memory) if max_memory else None
    if method is o.Method.learned:  # the GradMetaNet head answers (gmcurv.cli.learned)
        from gmcurv.cli import learned as lh

        results = lh.learned_saliency_results(session, level_list, ev, batch_size, seed)
        if prune is not None:
            assert target is not None
            with session.stage("prune"), session.progress("pruning (learned ranking)", None):
                pruned = lh.learned_prune(
                    session, prune, rounds, update, damping, structure.value, scope.value,
                    ev, batch_size, seed, budget,
                )  # fmt: skip
            results["prune"] = prune_results(pruned, *_write_pruned(session, pruned, target))
        shown = lh.render_learned("gmcurv saliency", _prune_part)
        session.finish(session.report(results), shown, report_file, fail_if, strict)
        return
    common = {
        "fisher": fisher.value, "mc_samples": mc_samples, "damping": damping,
        "structure": structure.value, "include_bias": include_bias,
        "masks": session.loaded.masks, "batch_size": batch_size, "seed": seed,
        "probes": probes, "budget_bytes": budget, "eval_data": ev,
    }  # fmt: skip
    results: dict[str, Any] = {}
    shown = render
    if prune is None or plot is not None or method is o.Method.both or save_scores is not None:
        results = _analysis(session, criterion, level_list, scope, common, save_scores, fisher)
        if method is o.Method.both:
            from gmcurv.cli import learned as lh

            learned = lh.learned_saliency_results(session, level_list, ev, batch_size, seed)
            learned["learned"]["comparison"] = lh.compare_saliency(learned, results)
            results.update(learned)
            shown = lh.render_with_comparison(render)
    if prune is not None:
        assert target is not None
        pruned = _prune(session, prune, criterion, scope, update, rounds, common)
        warn_emptied(pruned)
        if not results:
            eps0 = pruned.eps[0] if pruned.eps else None
            results = _common(pruned.fisher, pruned.columns, session.data.n, damping, eps0)
        results["prune"] = prune_results(pruned, *_write_pruned(session, pruned, target))
    if plot is not None and session.comm.main:
        from gmcurv.cli.plots.saliency import plot_saliency

        with session.stage("plot"):
            ensure_not_input(plot, session.inputs)
            plot_saliency(to_jsonable(results), plot)
        session.note(f"plot written to {plot}")
    session.finish(session.report(results), shown, report_file, fail_if, strict)


def _check_method(method: o.Method, prune: float | None, criterion: Criterion) -> None:
    """--method (auto, exact, learned or both) and --prune with the learned ranking."""
    from gmcurv.pruning import check_fraction

    if method not in (o.Method.auto, o.Method.exact, o.Method.learned, o.Method.both):
        raise ConfigError(
            f"--method {method.value} does not apply to saliency",
            hint="use auto (exact closed forms), learned (the GradMetaNet head) or both",
        )
    if prune is not None:
        check_fraction(prune)
        if method is o.Method.learned and criterion is not Criterion.obs:
            raise ConfigError(
                f"--prune --method learned ranks by the head's OBS saliency, not "
                f"--criterion {criterion.value}",
                hint="use --criterion obs (the default) with --method learned, or drop "
                "--method learned",
            )


def _eval_data(ctx: typer.Context, session: Session, eval_data: Path | None) -> Any:
    """--eval-data, loaded and checked against the model (an input outputs may not replace)."""
    if eval_data is None:
        return None
    from gmcurv.io.data import load_data

    assert session.objective is not None
    with session.stage("load"):
        ev = load_data(eval_data)
        session.objective.check_data(ev)
        session.inputs.append(eval_data)
        session.check_outputs(ctx)
    return ev


def _pruned_target(
    session: Session, prune: float | None, save_pruned: Path | None, report_file: Path | None
) -> Path | None:
    """Where --prune writes the checkpoint (--save-pruned, or the default name beside the
    model), refused before any compute if it is an input or the report."""
    from gmcurv.io.pruned import (
        check_directory_output,
        default_output_path,
        is_directory_output,
        pruned_outputs,
    )

    target = None
    if prune is not None:
        assert session.loaded is not None
        model_arg = session.inputs[0] if session.inputs else None
        target = Path(save_pruned or default_output_path(session.loaded.path, prune, model_arg))
        if save_pruned is None and is_directory_output(target):
            check_directory_output(target)
        for path in pruned_outputs(target):  # the checkpoint and its masks sidecar
            ensure_not_input(path, session.inputs, "--save-pruned")
            if report_file is not None and report_file.resolve() == path.resolve():
                raise ConfigError(
                    f"the report and the pruned checkpoint would both be written to {path}"
                )
    if report_file is not None:
        ensure_not_input(report_file, session.inputs, "-o/--output")
    return target


def _check_save_scores(
    session: Session,
    save_scores: Path,
    method: o.Method,
    criterion: Criterion,
    target: Path | None,
    report_file: Path | None,
    plot: Path | None,
) -> None:
    """--save-scores: the exact saliencies only, to a path that replaces no input or output."""
    from gmcurv.io.export import check_export_paths
    from gmcurv.io.pruned import pruned_outputs

    if method is o.Method.learned:
        raise ConfigError(
            "--save-scores writes the exact saliencies, not the learned ones",
            hint="drop --method learned (or use --method both)",
        )
    check_export_paths(
        save_scores,
        "--save-scores",
        [*session.inputs, *(pruned_outputs(target) if target else []), report_file, plot],
        stderr=criterion is Criterion.obd_hessian,
    )


def _analysis(
    session: Session,
    criterion: Criterion,
    levels: list[float],
    scope: Scope,
    common: dict[str, Any],
    save_scores: Path | None,
    fisher: o.FisherType,
) -> dict[str, Any]:
    """The saliency statistics and pruning curves of every criterion (and --save-scores)."""
    from gmcurv.saliency import saliency_analysis

    assert session.objective is not None and session.data is not None
    crits = ["magnitude", "obd", "obs"]
    if criterion is Criterion.obd_hessian:
        crits.append("obd-hessian")
    with (
        session.stage("saliency"),
        session.progress("saliency", None) as advance,  # the engine announces each phase
    ):
        analysis = saliency_analysis(
            session.objective, session.data, criteria=crits, levels=levels, scope=scope.value,
            progress=advance, phase=lambda text, n: advance.phase(f"saliency: {text}", n),
            **common,
        )  # fmt: skip
    results = analysis_results(analysis)
    if save_scores is not None:
        results["scores"] = write_scores(
            session, save_scores, analysis, criterion.value, fisher.value
        )
    return results


def _prune(
    session: Session,
    fraction: float,
    criterion: Criterion,
    scope: Scope,
    update: bool | None,
    rounds: int,
    common: dict[str, Any],
) -> PruneResult:
    """`gmcurv.saliency.prune_model` with a progress bar over each step of each round."""
    from gmcurv.saliency import prune_model

    assert session.objective is not None and session.data is not None
    with session.stage("prune"), session.progress("pruning", None) as adv:
        return prune_model(
            session.objective, session.data, fraction, criterion=criterion.value,
            scope=scope.value, update=update, rounds=rounds, progress=adv,
            phase=lambda text, n: adv.phase(f"pruning: {text}", n), **common,
        )  # fmt: skip


def _write_pruned(session: Session, pruned: PruneResult, target: Path) -> tuple[Path, str]:
    """Write the pruned checkpoint (rank 0 under torchrun); its path and sha256."""
    from gmcurv.io.pruned import save_pruned

    assert session.loaded is not None
    with session.stage("write"):
        path, digest = target, ""
        if session.comm.main:  # under torchrun, rank 0 writes
            path = save_pruned(
                session.loaded,
                pruned.weights,
                pruned.masks,
                target,
                {
                    "source_sha256": session.loaded.sha256,
                    "criterion": pruned.criterion,
                    "fraction": pruned.fraction,
                    "scope": pruned.scope,
                    "update": pruned.update,
                    "rounds": pruned.rounds,
                    "structure": pruned.structure,
                    "fisher": pruned.fisher,
                    "damping": pruned.damping,
                    "eps": [float(f"{e:.4g}") for e in pruned.eps],
                    "n_removed": pruned.n_removed,
                    "n_prunable": pruned.n_prunable,
                },
                inputs=session.inputs,
            )
            digest = sha256_file(path)
    return path, digest


def warn_emptied(pruned: PruneResult) -> None:
    """Warn (into the report too) when --prune removed every weight of a tensor: the layer
    then passes only its bias on, which global ranking allows (e.g. OBD on attention
    projections whose Fisher is tiny) but a user rarely means."""
    import warnings

    from gmcurv.errors import GmcurvWarning

    emptied = [n for n, layer in pruned.layers.items() if layer.n_removed == layer.n_params]
    if emptied and pruned.scope == "global":
        shown = ", ".join(emptied[:4]) + (
            f" (+{len(emptied) - 4} more)" if len(emptied) > 4 else ""
        )
        warnings.warn(
            f"--prune {pruned.fraction:g} ({pruned.criterion}, global scope) removed every "
            f"weight of {len(emptied)} tensor(s): {shown}; those layers now output only "
            f"their bias. --scope layer prunes each tensor by the same fraction",
            GmcurvWarning,
            stacklevel=2,
        )


def _prune_part(res: dict, console: Console) -> None:
    if "prune" in res:
        _render_prune(res["prune"], console)


def register(app: typer.Typer) -> None:
    app.command("saliency")(saliency)
