"""``--method learned|both`` for ``trace``, ``eigen`` and ``saliency``: the pretrained
GradMetaNet head answers from b = 128 random examples (and says so); ``both`` adds the
learned values beside the exact ones with the relative error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape

from gmcurv.cli import options as o
from gmcurv.cli.render import fmt, fmt_estimate, footer, header, new_table
from gmcurv.cli.session import Session
from gmcurv.errors import ConfigError
from gmcurv.estimate import Estimate
from gmcurv.results import Report

LEARNED = (o.Method.learned, o.Method.both)
NOTE = (
    "answered by the pretrained GradMetaNet head from b={b} random examples of {n} "
    "(a learned estimate, not exact; {interval}); plug-in F, GGN, Hessian: the exact "
    "engine on the same {b} examples (empirical Fisher, GGN, Hessian); exact: all of DATA"
)
CALIBRATED = (
    "[lo, hi] is its nominal {level} interval, calibrated on zoo models it was not trained "
    "on; measured coverage on unseen datasets and architectures: {coverage} (gmcurv head info)"
)
UNCALIBRATED = "this head has no recorded calibration, so no interval: gmcurv head eval --record"


def _note(lc) -> str:
    level = next(
        (e.interval_level for e in (lc.fisher_trace, lc.hessian_trace, lc.hessian_top)
         if e.interval_level is not None),
        None,
    )  # fmt: skip
    cov = (
        "not measured"
        if lc.coverage is None
        else (f"{100 * lc.coverage[0]:.0f}-{100 * lc.coverage[1]:.0f} %")
    )
    interval = (
        UNCALIBRATED
        if level is None
        else CALIBRATED.format(level=f"{100 * level:.0f} %", coverage=cov)
    )
    return NOTE.format(b=lc.b, n=lc.n, interval=interval)


def check_kinds(kinds: list[str], fisher: str) -> None:
    """The head predicts the empirical Fisher and the Hessian, not the GGN."""
    if "ggn" in kinds and len(kinds) == 1:
        raise ConfigError(
            "--method learned has no GGN: the head predicts the Fisher and the Hessian",
            hint="use --curvature fisher or hessian, or --method auto for the GGN",
        )
    if "fisher" in kinds and fisher != "empirical":
        raise ConfigError(
            f"--method learned reads the empirical Fisher, not --fisher {fisher}",
            hint="use --fisher empirical, or --method auto",
        )


def load_chosen_head():
    """The head ``$GMCURV_HEAD`` names (as for ``gmcurv head``), else the shipped one."""
    import os

    from gmcurv.gradmetanet.pretrained import load_head

    return load_head(os.environ.get("GMCURV_HEAD") or None)


def run_head(session: Session, seed: int):
    """`predict_curvature` on the session's model and data, timed, with a spinner."""
    from gmcurv.gradmetanet.predict import predict_curvature

    assert session.objective is not None and session.data is not None
    with session.stage("learned"), session.progress("GradMetaNet head", None):
        lc = predict_curvature(session.objective, session.data, seed=seed, head=load_chosen_head())
    return lc


QUANTITIES = {  # key -> (label, plug-in field, GGN field, Hessian-on-the-set field)
    "fisher_trace": ("Fisher trace (empirical)", "fisher_trace", None, None),
    "hessian_trace": ("Hessian trace", "fisher_trace", "ggn_trace", "hessian_trace"),
    "hessian_top": ("Hessian λ_max", "fisher_top", "ggn_top", None),
}


def _side_by_side(lc, key: str) -> dict[str, Any]:
    """One quantity: the head, and the exact engine on the head's own b examples."""
    label, plug, ggn, hess = QUANTITIES[key]
    same = lc.same_set
    pick = lambda f: None if f is None or same is None else getattr(same, f)  # noqa: E731
    return {
        "quantity": label,
        "learned": getattr(lc, key),
        "plug_in": pick(plug),
        "ggn": pick(ggn),
        "hessian_same_set": pick(hess),
        "out_of_range": [f.what for f in lc.out_of_range],
    }


def _info(lc) -> dict[str, Any]:
    same = lc.same_set
    return {
        "method": lc.method,
        "head": lc.head_path,
        "b": lc.b,
        "n": lc.n,
        "seconds": lc.seconds,
        "note": _note(lc),
        "plug_in": {
            "fisher_trace": lc.plug.trace,
            "fisher_top": lc.plug.top,
            "definition": "closed forms on the same b gradients (what the head corrects)",
        },
        "same_set": None
        if same is None
        else {
            "b": same.b,
            "fisher_trace": same.fisher_trace,
            "fisher_top": same.fisher_top,
            "ggn_trace": same.ggn_trace,
            "ggn_top": same.ggn_top,
            "hessian_trace": same.hessian_trace,
            "seconds": same.seconds,
            "definition": "the exact engine on the head's b examples: empirical Fisher "
            "(plug-in), GGN (exact Fisher, C-class factors), exact Hessian trace",
        },
        "out_of_range": [
            {"what": f.what, "value": f.value, "trained_on": f.seen, "text": f.text()}
            for f in lc.out_of_range
        ],
    }


def _layer_estimates(lc, session: Session) -> dict[str, Any]:
    """Per-layer Fisher traces: the head's total split by each layer's share of the
    predicted diagonal (so the layers add up to the total); each layer's interval is the
    total's, scaled by the share (calibrated on totals only, and says so)."""
    assert session.objective is not None
    tr = lc.fisher_trace
    total = tr.value
    diag_sum = sum(lc.per_layer_trace.values()) or 1.0
    out = {}
    params = session.objective.params
    for path, value in lc.per_layer_trace.items():
        n = sum(p.numel() for k, p in params.items() if k.rpartition(".")[0] == path)
        share = value / diag_sum
        v = total * share
        interval = None if tr.interval is None else (tr.interval[0] * share, tr.interval[1] * share)
        method = (
            lc.method
            + ", share of the diagonal"
            + ("; interval: the total's, scaled" if interval else "")
        )
        out[path] = {
            "kind": "linear",
            "n_params": n,
            "trace": Estimate(
                v, None, lc.b, method, tr.converged, interval=interval,
                interval_level=tr.interval_level,
            ),
        }  # fmt: skip
    return out


def learned_trace(session: Session, kinds: list[str], seed: int) -> dict[str, Any]:
    """trace results (``fisher`` / ``hessian`` blocks) from the head."""
    lc = run_head(session, seed)
    assert session.objective is not None
    n_params = session.objective.space.size
    results: dict[str, Any] = {"learned": _info(lc)}
    keys = (["fisher_trace"] if "fisher" in kinds else []) + (
        ["hessian_trace", "hessian_top"] if "hessian" in kinds else []
    )
    results["learned"]["rows"] = [_side_by_side(lc, k) for k in keys]
    if "fisher" in kinds:
        results["fisher"] = {
            "type": "empirical",
            "n_params": n_params,
            "trace": lc.fisher_trace,
            "eigenvalues": [],
            "rank": None,
            "per_layer": _layer_estimates(lc, session),
        }
    if "hessian" in kinds:
        results["hessian"] = {
            "method": lc.method,
            "n_params": n_params,
            "n_matvecs": 0,
            "trace": lc.hessian_trace,
            "eigenvalues": [lc.hessian_top],
            "per_layer": {},
            "notes": [],
        }
    if "ggn" in kinds:
        session.note("--method learned: the head has no GGN; leaving it out")
    return results


def _row(quantity: str, learned: Estimate, exact: Any, side: dict | None = None) -> dict[str, Any]:
    from gmcurv.gradmetanet.predict import relative_error

    ex = exact.value if isinstance(exact, Estimate) else (exact or {}).get("value")
    inside = None
    if learned.interval is not None and ex is not None:
        inside = bool(learned.interval[0] <= ex <= learned.interval[1])
    row = {**(side or {}), "quantity": quantity, "learned": learned, "exact": exact}
    return {**row, "relative_error": relative_error(learned.value, ex), "exact_in_interval": inside}


def compare_trace(session: Session, results: dict[str, Any], seed: int) -> dict[str, Any]:
    """The ``learned`` block of ``--method both``: head values beside the exact ones (and
    beside the exact engine on the head's own b examples)."""
    lc = run_head(session, seed)
    rows = []
    if results.get("fisher"):
        side = _side_by_side(lc, "fisher_trace")
        rows.append(_row(side["quantity"], lc.fisher_trace, results["fisher"]["trace"], side))
    if results.get("hessian"):
        h = results["hessian"]
        side = _side_by_side(lc, "hessian_trace")
        rows.append(_row(side["quantity"], lc.hessian_trace, h["trace"], side))
        if h.get("eigenvalues"):
            side = _side_by_side(lc, "hessian_top")
            rows.append(_row(side["quantity"], lc.hessian_top, h["eigenvalues"][0], side))
    return {**_info(lc), "comparison": rows}


# ------------------------------------------------------------- head v2 (transformers, λ_max)
V2_NOTE = (
    "λ_max answered by head v2 for transformers: a learned correction of the per-sequence "
    "plug-in T_eff·λ_max(F_S) (Monte Carlo labels) on b={b} random sequences of {n} "
    "(a learned estimate, not exact; about one capture of b sequences). [lo, hi] is its "
    "nominal {level} interval; on {sets} held-out transformer sets it covered {cov} and its "
    "mean |ln error| was {err} vs {base} for the best baseline at equal time "
    "({base_name}); the exact engine (--method exact) is what to use when accuracy matters"
)


def _is_lm(session: Session) -> bool:
    from gmcurv.gradmetanet.tfeatures import is_transformer

    assert session.objective is not None
    return is_transformer(session.objective.model)


def _v2_top(session: Session, seed: int) -> tuple[Estimate, dict[str, Any], dict[str, Any]]:
    """Head v2's λ_max on the session: the estimate, its side-by-side row and info block."""
    from gmcurv.gradmetanet.ttop import predict_top
    from gmcurv.gradmetanet.ttrain import TOP_FILE, load_top_correction

    assert session.objective is not None and session.data is not None
    corr, heldout = load_top_correction()
    with session.stage("learned"), session.progress("GradMetaNet head v2", None):
        tp = predict_top(session.objective, session.data, corr, seed=seed)
    est = Estimate(
        tp.value, None, tp.b, "learned-v2", True, interval=tp.interval, interval_level=tp.level
    )
    flags = [
        {
            "what": w,
            "value": v,
            "trained_on": list(r),
            "text": f"{w} = {v:.3g} (trained on {r[0]:.3g} .. {r[1]:.3g})"
            if v == v  # NaN: a flag without a value (an unknown model family)
            else w,
        }
        for w, v, r in tp.out_of_range
    ]
    h = heldout.get("all-test", {})
    pct = lambda x: "not measured" if x is None else f"{100 * x:.0f} %"  # noqa: E731
    num = lambda x: "?" if x is None else f"{x:.2f}"  # noqa: E731
    note = V2_NOTE.format(
        b=tp.b, n=tp.n, level=f"{100 * tp.level:.0f} %", sets=h.get("sets", 0),
        cov=pct(h.get("coverage")), err=num(h.get("mean_abs_log_error")),
        base=num(h.get("best_baseline_error")), base_name=h.get("best_baseline", "?"),
    )  # fmt: skip
    info = {
        "method": "head v2 (λ_max correction)",
        "head": str(TOP_FILE),
        "b": tp.b,
        "n": tp.n,
        "seconds": tp.seconds,
        "note": note,
        "plug_in": {
            "hessian_top_per_sequence": tp.plugin_seq,
            "ggn_top_per_token": tp.plugin_tok,
            "definition": "T_eff λ_max of the per-sequence (what the head corrects) and "
            "per-token Monte Carlo Fisher on the same b sequences",
        },
        "same_set": None,
        "out_of_range": flags,
        "heldout": heldout,
    }
    side = {
        "quantity": "Hessian λ_max",
        "learned": est,
        "plug_in": tp.plugin_seq,
        "ggn": tp.plugin_tok,
        "hessian_same_set": None,
        "out_of_range": [f["what"] for f in flags],
    }
    return est, side, info


def learned_eigen(session: Session, kind: str, k: int, seed: int) -> dict[str, Any]:
    """eigen results from the head: λ_max of the Hessian only."""
    if kind != "hessian":
        raise ConfigError(
            f"--method learned predicts the top Hessian eigenvalue, not the {kind}'s",
            hint="use --curvature hessian, or --method auto",
        )
    if _is_lm(session):
        est, side, info = _v2_top(session, seed)
        notes = ["the head predicts λ_max only"] if k > 1 else []
        for n in notes:
            session.note(n)
        assert session.objective is not None
        return {
            "hessian": {
                "method": "learned-v2",
                "n_params": session.objective.space.size,
                "n_matvecs": 0,
                "eigenvalues": [est],
                "vectors": None,
                "notes": notes,
            },
            "learned": {**info, "rows": [side]},
        }
    lc = run_head(session, seed)
    assert session.objective is not None
    notes = ["the head predicts λ_max only"] if k > 1 else []
    for n in notes:
        session.note(n)
    return {
        "hessian": {
            "method": lc.method,
            "n_params": session.objective.space.size,
            "n_matvecs": 0,
            "eigenvalues": [lc.hessian_top],
            "vectors": None,
            "notes": notes,
        },
        "learned": {**_info(lc), "rows": [_side_by_side(lc, "hessian_top")]},
    }


def compare_eigen(session: Session, results: dict[str, Any], kind: str, seed: int) -> dict:
    if kind != "hessian":
        raise ConfigError(
            f"--method both: the head predicts the top Hessian eigenvalue, not the {kind}'s",
            hint="use --curvature hessian",
        )
    eigs = results[kind]["eigenvalues"]
    if _is_lm(session):
        est, side, info = _v2_top(session, seed)
        return {**info, "comparison": [_row("Hessian λ_max", est, eigs[0], side)] if eigs else []}
    lc = run_head(session, seed)
    side = _side_by_side(lc, "hessian_top")
    rows = [_row("Hessian λ_max", lc.hessian_top, eigs[0], side)] if eigs else []
    return {**_info(lc), "comparison": rows}


# ---------------------------------------------------------------------------------- saliency
def learned_saliency_results(
    session: Session, levels: list[float], eval_data, batch_size: int, seed: int
) -> dict[str, Any]:
    """saliency results from the head: per-layer OBD/OBS statistics and a masking sweep."""
    from gmcurv.gradmetanet.predict import learned_saliency

    assert session.objective is not None and session.data is not None
    with session.stage("learned"), session.progress("GradMetaNet head", None):
        ls = learned_saliency(
            session.objective,
            session.data,
            head=load_chosen_head(),
            seed=seed,
            levels=tuple(levels),
            eval_data=eval_data,
            batch_size=batch_size,
        )
    lc = ls.curvature
    return {
        "learned": {
            **_info(lc),
            "criteria": list(ls.saliency),
            "layers": ls.layers,
            "sweep": ls.sweep,
            "baseline": ls.baseline,
            "definition": "obd = ½ F̂_qq w², obs = ½ r̂_q w² with F̂, r̂ = 1/[(F+eps I)⁻¹]_qq "
            "predicted by the head; sweep: masking the least salient weights (global, no update)",
        }
    }


def learned_prune(
    session: Session,
    fraction: float,
    rounds: int,
    update: bool | None,
    damping: float,
    structure: str,
    scope: str,
    eval_data,
    batch_size: int,
    seed: int,
    budget: int | None,
):
    """``--prune --method learned``: rank by the head's OBS saliency (re-predicted at the
    current weights every round), remove, apply the exact OBS update (`prune_model`)."""
    from gmcurv.gradmetanet.predict import head_obs_saliency
    from gmcurv.saliency import prune_model

    assert session.objective is not None and session.data is not None
    obj, data = session.objective, session.data

    head = load_chosen_head()

    def ranker(weights, r: int, removed):
        return head_obs_saliency(obj, data, 128, seed + r - 1, head)

    assert session.loaded is not None
    return prune_model(
        obj,
        data,
        fraction,
        criterion="obs",
        scope=scope,
        update=update,
        rounds=rounds,
        eval_data=eval_data,
        damping=damping,
        structure=structure,
        masks=session.loaded.masks,
        batch_size=batch_size,
        seed=seed,
        budget_bytes=budget,
        ranker=ranker,
        ranker_name="learned obs (GradMetaNet head saliencies)",
    )


def compare_saliency(learned: dict[str, Any], exact: dict[str, Any]) -> list[dict[str, Any]]:
    """Per tensor and criterion: mean saliency learned vs exact, with the relative error."""
    rows = []
    for name, crits in learned["learned"]["layers"].items():
        ex_layer = exact.get("layers", {}).get(name, {}).get("saliency", {})
        for c, stats in crits.items():
            if c in ex_layer:
                rows.append(_row(f"{name} {c} mean", stats["mean"], ex_layer[c]["mean"]))
    return rows


# -------------------------------------------------------------------------------- rendering
def _range_cell(row: dict) -> str:
    flags = row.get("out_of_range") or []
    return "in range" if not flags else "[yellow]out: " + ", ".join(flags) + "[/yellow]"


def _side_cells(r: dict) -> list[str]:
    return [fmt(r.get("plug_in")), fmt(r.get("ggn")), fmt(r.get("hessian_same_set"))]


SIDE_COLUMNS = ("plug-in F", "GGN", "Hessian")  # the exact engine on the same b examples


def _range_caption(info: dict, console: Console) -> None:
    flags = info.get("out_of_range") or []
    if flags:
        console.print(
            "[yellow]out of the head's training range:[/yellow] "
            + "; ".join(f["text"] for f in flags)
        )


def _comparison_table(rows: list[dict], console: Console) -> None:
    table = new_table(
        "learned vs exact",
        "quantity",
        "head \\[lo, hi]",
        *SIDE_COLUMNS,
        "exact",
        "rel. err",
        "in \\[lo, hi]",
        "range",
    )
    for r in rows:
        err = r["relative_error"]
        inside = r.get("exact_in_interval")
        table.add_row(
            r["quantity"],
            fmt_estimate(r["learned"]),
            *_side_cells(r),
            fmt_estimate(r["exact"]),
            "—" if err is None else f"{100 * err:.1f}%",
            "—" if inside is None else ("yes" if inside else "[red]no[/red]"),
            _range_cell(r),
        )
    console.print(table)


def render_learned(
    title: str, extra: Callable[[dict, Console], None] | None = None
) -> Callable[[Report, Console], None]:
    """Renderer of a ``--method learned`` report (trace / eigen / saliency); `extra` renders
    more of the results (e.g. ``--prune``) before the note and footer."""

    def render(report: Report, console: Console) -> None:
        header(report, console, title)
        res = report.to_dict()["results"]
        info = res["learned"]
        rows = info.get("rows") or []
        if rows:
            table = new_table(
                f"{info['method']}",
                "quantity",
                "head \\[lo, hi]",
                *SIDE_COLUMNS,
                "range",
            )
            for r in rows:
                table.add_row(
                    r["quantity"], fmt_estimate(r["learned"]), *_side_cells(r), _range_cell(r)
                )
                if r["quantity"].startswith("Fisher trace") and res.get("fisher"):
                    for layer, v in res["fisher"].get("per_layer", {}).items():
                        table.add_row(f"  {layer}", fmt_estimate(v["trace"]), "", "", "", "")
            console.print(table)
        if info.get("layers"):
            _render_saliency(info, console)
        if extra is not None:
            extra(res, console)
        _range_caption(info, console)
        console.print(f"[dim]{escape(info['note'])}[/dim]")
        footer(report, console)

    return render


def _render_saliency(info: dict, console: Console) -> None:
    table = new_table("learned saliency per tensor (mean / median)", "tensor", *info["criteria"])
    for name, crits in info["layers"].items():
        table.add_row(
            name,
            *[
                f"{fmt(crits[c]['mean']['value'])} / {fmt(crits[c]['median']['value'])}"
                for c in info["criteria"]
            ],
        )
    console.print(table)
    first = next(iter(info["sweep"].values()))
    sweep = new_table(
        "accuracy after pruning (global): obd, obs = masking by the head's saliencies; "
        "obs+update = the head's OBS ranking + the exact OBS update; exact obs+update and "
        "magnitude for comparison",
        "criterion",
        *[f"{100 * p['fraction']:g}%" for p in first],
    )
    for c, pts in info["sweep"].items():
        sweep.add_row(
            c,
            *[fmt((p["accuracy"] or p["loss"])["value"]) for p in pts],
        )
    console.print(sweep)


def render_with_comparison(
    base: Callable[[Report, Console], None],
) -> Callable[[Report, Console], None]:
    """The command's own renderer followed by the learned-vs-exact table (note once)."""

    def render(report: Report, console: Console) -> None:
        base(report, console)
        info = report.to_dict()["results"].get("learned") or {}
        if info.get("comparison"):
            _comparison_table(info["comparison"], console)
        _range_caption(info, console)
        if info.get("note"):
            console.print(f"[dim]{escape(info['note'])}[/dim]")

    return render
