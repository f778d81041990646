"""``gmcurv lora``: GL(r)-invariant features of LoRA adapters and, with a base model and data,
the curvature of the loss along each adapter's update."""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from gmcurv.cli import options as o
from gmcurv.cli.plots import check_plot_path
from gmcurv.cli.render import fmt, fmt_estimate, footer, header, new_table
from gmcurv.cli.session import (
    Session,
    check_rules,
    collected_warnings,
    resolve_device,
    resolve_dtype,
    resolved_config,
)
from gmcurv.errors import ConfigError
from gmcurv.io.fileio import ensure_not_input
from gmcurv.memory import parse_bytes
from gmcurv.results import Report, to_jsonable

if TYPE_CHECKING:
    from gmcurv.lora.features import AdapterFeatures
    from gmcurv.lora.mapping import LayerUpdate

# = gmcurv.lora.SCALES (not imported: it would load torch at start-up; a test keeps it equal)
SCALES = (0.25, 0.5, 1.0, 2.0)

PATHS_HELP = (
    "Adapters come first: each is a directory holding "
    "adapter_config.json (+ adapter_model.safetensors, as peft's save_pretrained writes), or "
    "a .safetensors adapter file (LoRA keys; config in its header or adapter_config.json "
    "beside it). The first path that is not an adapter is MODEL (a .safetensors file or a "
    "directory with model.safetensors + config.json), the next DATA (a data file or "
    "directory). Adapters alone: invariant features. + MODEL: the adapted modules are "
    "checked against the base model. + DATA: curvature along each adapter's update."
)

PathsArg = Annotated[
    list[Path], typer.Argument(help=PATHS_HELP, metavar="ADAPTER... [MODEL [DATA]]")
]
ScalesOpt = Annotated[
    str,
    typer.Option(
        "--scales",
        envvar="GMCURV_SCALES",
        help="Merge scales α at which the loss change is predicted and measured.",
    ),
]
ExportOpt = Annotated[
    Path | None,
    typer.Option(
        "--export",
        help="Write the factors in canonical SVD form (B' = U√Σ, A' = √Σ Vᵀ, PEFT layout, with "
        "the config): a .safetensors file (config in its header) or a directory (peft-loadable "
        "adapter_model.safetensors + adapter_config.json); one sub-directory per adapter when "
        "several are given.",
        show_default=False,
    ),
]


# ----------------------------------------------------------------------------------- inputs
def split_paths(paths: list[Path]) -> tuple[list[Path], Path | None, Path | None]:
    """``(adapters, MODEL, DATA)`` from the positional paths (see `PATHS_HELP`)."""
    from gmcurv.io.adapter import looks_like_adapter

    adapters: list[Path] = []
    rest: list[Path] = []
    for p in paths:
        if not p.exists():
            raise ConfigError(
                f"{p}: no such file or directory",
                hint="gmcurv lora ADAPTER... [MODEL [DATA]]",
            )
        if looks_like_adapter(p):
            if rest:
                raise ConfigError(
                    f"{p} is an adapter but comes after MODEL {rest[0]}",
                    hint="put every adapter first: gmcurv lora a/ b/ MODEL DATA",
                )
            adapters.append(p)
        else:
            rest.append(p)
    if not adapters:
        raise ConfigError(
            f"{paths[0]} is not a LoRA adapter "
            "(no adapter_config.json / adapter_model.safetensors)",
            hint="the first arguments are adapter directories written by peft's save_pretrained",
        )
    if len(rest) > 2:
        raise ConfigError(
            f"too many paths after the adapters: {', '.join(map(str, rest))}",
            hint="after the adapters come at most MODEL and DATA",
        )
    model = rest[0] if rest else None
    data = rest[1] if len(rest) > 1 else None
    if model is not None and data is None:
        _check_not_data(model, adapters[0])
    return adapters, model, data


def _check_not_data(model: Path, adapter: Path) -> None:
    """DATA given without MODEL (the adapter's base is elsewhere): say which base the
    adapter names, and that gmcurv never downloads it."""
    import json

    from gmcurv.io.checkpoint import DATA_INPUT_KEYS, DATA_KEYS
    from gmcurv.io.tensors import read_header

    if not (model.is_file() and model.suffix.lower() == ".safetensors"):
        return
    try:
        keys = set(read_header(model).shapes)
    except Exception:  # not readable as a header: loading it reports the problem
        return
    if not (keys and keys <= DATA_KEYS and keys & DATA_INPUT_KEYS):
        return
    base = None
    config = adapter / "adapter_config.json" if adapter.is_dir() else None
    if config is not None and config.is_file():
        with contextlib.suppress(ValueError, OSError):
            base = json.loads(config.read_text()).get("base_model_name_or_path")
    named = f" (the adapter names {base!r} as its base)" if base else ""
    raise ConfigError(
        f"{model} holds data ({', '.join(sorted(keys))}), but the path after the adapters "
        f"is MODEL: the base model is missing{named}",
        hint="gmcurv lora ADAPTER MODEL DATA, with MODEL the base model's local directory "
        "or .safetensors file (gmcurv never downloads one)",
    )


def parse_scales(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(
            f"--scales {text!r}: not a list of numbers", hint="e.g. 0.5,1,2"
        ) from None
    if not values or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"--scales {text!r}: give finite numbers", hint="e.g. 0.25,0.5,1,2")
    if len(set(values)) != len(values):
        raise ConfigError(f"--scales {text!r}: repeated value")
    return values


def _unique_names(paths: list[Path]) -> list[str]:
    names: list[str] = []
    for p in paths:
        base = p.name if p.is_dir() else p.stem
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def _bare_session(ctx: typer.Context, seed: int, device: str, dtype: Any, quiet: bool, json: bool):
    """A session without a model (adapters alone)."""
    collected_warnings.clear()
    check_rules(ctx.params.get("fail_if"))
    return Session(
        command=ctx.info_name or "lora",
        config=resolved_config(ctx),
        seed=seed,
        device=resolve_device(device),
        dtype=resolve_dtype(dtype.value),
        quiet=quiet,
        json_mode=json,
    )


def _export_targets(export: Path | None, names: list[str]) -> dict[str, Path]:
    if export is None:
        return {}
    if len(names) == 1:
        return {names[0]: export}
    if export.suffix.lower() == ".safetensors":
        raise ConfigError(
            f"--export {export}: {len(names)} adapters need a directory",
            hint="name a directory; each adapter is written to DIR/<adapter name>/",
        )
    return {name: export / name for name in names}


# ---------------------------------------------------------------------------------- results
def adapter_results(
    features: AdapterFeatures, updates: list[LayerUpdate] | None, curvature: Any
) -> dict[str, Any]:
    if updates is not None:
        by_module = {u.module: u for u in updates}
        layers = {
            m: replace(f, target=by_module[m].target, param=by_module[m].param)
            for m, f in features.layers.items()
        }
        features = replace(features, layers=layers)
    out = to_jsonable(features)
    if curvature is not None:
        out["curvature"] = to_jsonable(curvature)
    return out


# -------------------------------------------------------------------------------- rendering
def render(report: Report, console: Console) -> None:
    header(report, console, "gmcurv lora")
    res = report.to_dict()["results"]
    adapters = res["adapters"]
    table = new_table(
        "Features of ΔW = s·B·A invariant under (B, A) -> (B R, R⁻¹ A)",
        "adapter",
        "layer",
        "r",
        "s",
        "σ₁ = ‖ΔW‖₂",
        "σ₂",
        "‖ΔW‖_F",
        "eff. rank",
        "stable rank",
    )
    moved = []
    for name, a in adapters.items():
        for module, f in a["layers"].items():
            sv = [e["value"] for e in f["singular_values"]]
            if f.get("param") and f["target"] != module:
                moved.append(f"{module} -> {f['param']}")
            table.add_row(
                name,
                module,
                str(f["rank"]),
                fmt(f["scale"]),
                fmt_estimate(f["spectral"]),
                fmt(sv[1]) if len(sv) > 1 else "—",
                fmt_estimate(f["frobenius"]),
                fmt_estimate(f["effective_rank"]),
                fmt_estimate(f["stable_rank"]),
            )
    console.print(table)
    totals = "; ".join(
        f"{name}: ‖dθ‖ {fmt(a['frobenius']['value'])}, {a['n_layers']} layers, "
        f"{a['n_params']:,} adapter parameters"
        for name, a in adapters.items()
    )
    console.print(f"[dim]{totals}[/dim]", soft_wrap=True)
    if moved:
        console.print(f"[dim]mapped onto the base model: {', '.join(moved)}[/dim]", soft_wrap=True)
    if any("curvature" in a for a in adapters.values()):
        _render_curvature(res, console)
    for name, path in (res.get("export") or {}).items():
        console.print(f"canonical factors of {name} written to [cyan]{path}[/cyan]")
    footer(report, console)


def _render_curvature(res: dict[str, Any], console: Console) -> None:
    adapters = {n: a["curvature"] for n, a in res["adapters"].items() if "curvature" in a}
    fisher = next(iter(adapters.values()))["fisher"]
    summary = new_table(
        f"Curvature along dθ (base loss; {fisher} Fisher)",
        "adapter",
        "loss",
        "‖dθ‖",
        "gᵀdθ",
        "dθᵀF dθ",
        "dθᵀH dθ",
        "dθᵀH dθ/‖dθ‖²",
    )
    for name, c in adapters.items():
        summary.add_row(
            name,
            fmt_estimate(c["loss"]),
            fmt_estimate(c["update_norm"]),
            fmt_estimate(c["first_order"]),
            fmt_estimate(c["fisher_qf"]),
            fmt_estimate(c["hessian_qf"]),
            fmt_estimate(c["hessian_rayleigh"]),
        )
    console.print(summary)
    change = new_table(
        "Loss change when merged at scale α: quadratic model vs measured",
        "adapter",
        "α",
        "predicted (H)",
        "predicted (F)",
        "measured",
        "± s.e. (examples)",
    )
    for name, c in adapters.items():
        for p in c["points"]:
            m = p["measured"]
            change.add_row(
                name,
                fmt(p["scale"]),
                fmt_estimate(p["predicted"]),
                fmt_estimate(p["predicted_fisher"]),
                fmt_estimate(m),
                fmt(m.get("data_stderr"), 2),
            )
    console.print(change)


# ---------------------------------------------------------------------------------- command
def lora(
    ctx: typer.Context,
    paths: PathsArg,
    scales: ScalesOpt = ",".join(f"{s:g}" for s in SCALES),
    export: ExportOpt = None,
    fisher: o.FisherOpt = o.FisherType.empirical,
    mc_samples: o.McSamplesOpt = 1,
    samples: o.SamplesOpt = None,
    batch_size: o.BatchSizeOpt = 256,
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
    """LoRA adapters: features of ΔW = s·B·A that do not depend on the factorisation
    (singular values from two QRs and an r x r SVD, norms, effective and stable rank) and,
    with MODEL and DATA, the curvature of the base loss along the update dθ: gᵀdθ, dθᵀF dθ
    (from decomposed gradients), dθᵀH dθ (one HVP), and the loss change the quadratic model
    predicts vs the one measured with the adapter merged at each --scales α.

    Examples: [bold]gmcurv lora adapter/[/bold] ·
    [bold]gmcurv lora a/ b/ c/ --json > features.json[/bold] ·
    [bold]gmcurv lora adapter/ model.safetensors data/ --plot lora.png[/bold] ·
    [bold]gmcurv lora adapter/ --export canonical.safetensors[/bold] ·
    [bold]gmcurv lora ad/ m.safetensors d/ --fail-if "adapters.ad.curvature.hessian_qf > 10"[/bold]
    """
    from gmcurv.io.adapter import read_adapter
    from gmcurv.lora.adapter import Adapter
    from gmcurv.lora.features import adapter_features
    from gmcurv.lora.mapping import attach

    adapter_paths, model, data = split_paths(paths)
    scale_list = parse_scales(scales)
    if plot is not None:
        check_plot_path(plot)
    names = _unique_names(adapter_paths)
    targets = _export_targets(export, names)
    if model is None:
        session = _bare_session(ctx, seed, device, dtype, quiet, json)
    else:
        session = Session.open(
            ctx, model, None, arch=arch, loss=loss, device=device, dtype=dtype, mode=mode,
            seed=seed, quiet=quiet, json_mode=json, need_data=False,
        )  # fmt: skip
    session.inputs.extend(adapter_paths)
    session.check_outputs(ctx)
    for target in targets.values():
        ensure_not_input(target, session.inputs + ([data] if data else []))
    with session.stage("read"):
        adapters: list[Adapter] = [
            read_adapter(p, name) for p, name in zip(adapter_paths, names, strict=True)
        ]
    with session.stage("features"):
        features = {a.name: adapter_features(a) for a in adapters}
    updates: dict[str, list[LayerUpdate]] | None = None
    if session.loaded is not None:
        with session.stage("map"):
            updates = {a.name: attach(a, session.loaded.model) for a in adapters}
    curvature: dict[str, Any] = {}
    if data is not None:
        assert session.loaded is not None and updates is not None
        curvature = _curvature(
            ctx, session, data, updates, samples, mode.value, fisher.value, mc_samples,
            batch_size, seed, scale_list, max_memory,
        )  # fmt: skip
    results: dict[str, Any] = {}
    if curvature:
        results["fisher"] = fisher.value
        results["scales"] = scale_list
    results["adapters"] = {
        name: adapter_results(
            features[name], None if updates is None else updates[name], curvature.get(name)
        )
        for name in names
    }
    if session.comm.main:
        _write_extras(session, results, adapters, targets, export, plot)
    session.finish(session.report(results), render, output, fail_if, strict)


def _write_extras(
    session: Session,
    results: dict[str, Any],
    adapters: list[Any],
    targets: dict[str, Path],
    export: Path | None,
    plot: Path | None,
) -> None:
    """--export (canonical adapters) and --plot (main rank only), recorded in `results`."""
    from gmcurv.io.adapter import write_adapter
    from gmcurv.lora.features import canonical_adapter

    if targets:
        with session.stage("export"):
            if len(targets) > 1 and export is not None and export.parent.is_dir():
                export.mkdir(exist_ok=True)  # one sub-directory per adapter
            by_name = {a.name: a for a in adapters}
            written = {
                n: write_adapter(canonical_adapter(by_name[n]), t) for n, t in targets.items()
            }
        results["export"] = {n: str(p) for n, p in written.items()}
    if plot is not None:
        from gmcurv.cli.plots.lora import plot_lora

        with session.stage("plot"):
            ensure_not_input(plot, session.inputs)
            plot_lora(to_jsonable(results), plot)
        session.note(f"plot written to {plot}")


def _curvature(
    ctx: typer.Context,
    session: Session,
    data: Path,
    updates: dict[str, list[LayerUpdate]],
    samples: int | None,
    mode: str,
    fisher: str,
    mc_samples: int,
    batch_size: int,
    seed: int,
    scales: list[float],
    max_memory: str | None,
) -> dict[str, Any]:
    """Load DATA, build the objective over the adapted parameters, run `curvature_along`."""
    from gmcurv import distributed
    from gmcurv.io.data import load_data
    from gmcurv.io.factories import load_loss
    from gmcurv.lora.curvature import along_objective, curvature_along
    from gmcurv.objective import Objective

    assert session.loaded is not None
    comm = session.comm
    loaded = session.loaded

    def load() -> None:
        session.data = load_data(data, samples).shard(comm.rank, comm.world)

    def validate() -> None:
        assert session.data is not None
        full = Objective.build(loaded.model, load_loss(loaded.loss), None, mode, seed)
        session.objective = along_objective(full, updates)
        session.objective.check_data(session.data)

    with session.stage("load"):
        distributed.agreed(load, comm)
    session.inputs.append(data)
    with session.stage("validate"):
        distributed.agreed(validate, comm)
    session.warn_dense_fallback(ctx)
    assert session.objective is not None and session.data is not None
    total = session.data.n * (1 + len(updates))
    with (
        session.stage("curvature"),
        session.progress("curvature along the adapters", total) as advance,
    ):
        return curvature_along(
            session.objective,
            session.data,
            updates,
            batch_size=batch_size,
            fisher=fisher,
            mc_samples=mc_samples,
            seed=seed,
            scales=scales,
            budget_bytes=parse_bytes(max_memory) if max_memory else None,
            progress=advance,
        )


def register(app: typer.Typer) -> None:
    app.command("lora")(lora)
