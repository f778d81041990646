"""``--method learned|both`` for ``trace``, ``eigen`` and ``saliency``: the pretrained
GradMetaNet head answers from b = 128 random examples (and says so); ``both`` adds the
learned values beside the exact ones with the relative error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console

from gmcurv.cli import options as o
from gmcurv.cli.render import fmt, fmt_estimate, footer, header, new_table
from gmcurv.cli.session import Session
from gmcurv.errors import ConfigError
from gmcurv.results import Estimate, Report

LEARNED = (o.Method.learned, o.Method.both)
NOTE = (
    "answered by the pretrained GradMetaNet head from b={b} random examples of {n} "
    "(a learned estimate, not exact; its ± is the head's held-out error, see gmcurv head info)"
)


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


def run_head(session: Session, seed: int):
    """`predict_curvature` on the session's model and data, timed, with a spinner."""
    from gmcurv.gradmetanet.predict import predict_curvature

    assert session.objective is not None and session.data is not None
    with session.stage("learned"), session.progress("GradMetaNet head", None):
        lc = predict_curvature(session.objective, session.data, seed=seed)
    session.note(NOTE.format(b=lc.b, n=lc.n))
    return lc


def _info(lc) -> dict[str, Any]:
    return {
        "method": lc.method,
        "b": lc.b,
        "n": lc.n,
        "seconds": lc.seconds,
        "note": NOTE.format(b=lc.b, n=lc.n),
        "plug_in": {
            "fisher_trace": lc.plug.trace,
            "fisher_top": lc.plug.top,
            "definition": "closed forms on the same b gradients (what the head corrects)",
        },
    }


def _layer_estimates(lc, session: Session) -> dict[str, Any]:
    """Per-layer Fisher traces: the head's total split by each layer's share of the
    predicted diagonal (so the layers add up to the total)."""
    assert session.objective is not None
    total = lc.fisher_trace.value
    rel = lc.fisher_trace.stderr / total if total else 1.0
    diag_sum = sum(lc.per_layer_trace.values()) or 1.0
    out = {}
    params = session.objective.params
    for path, value in lc.per_layer_trace.items():
        n = sum(p.numel() for k, p in params.items() if k.rpartition(".")[0] == path)
        v = total * value / diag_sum
        out[path] = {
            "kind": "linear",
            "n_params": n,
            "trace": Estimate(v, abs(v) * rel, lc.b, lc.method + ", share of the diagonal"),
        }
    return out


def learned_trace(session: Session, kinds: list[str], seed: int) -> dict[str, Any]:
    """trace results (``fisher`` / ``hessian`` blocks) from the head."""
    lc = run_head(session, seed)
    assert session.objective is not None
    n_params = session.objective.space.size
    results: dict[str, Any] = {"learned": _info(lc)}
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


def _row(quantity: str, learned: Estimate, exact: Any) -> dict[str, Any]:
    from gmcurv.gradmetanet.predict import relative_error

    ex = exact.value if isinstance(exact, Estimate) else (exact or {}).get("value")
    return {
        "quantity": quantity,
        "learned": learned,
        "exact": exact,
        "relative_error": relative_error(learned.value, ex),
    }


def compare_trace(session: Session, results: dict[str, Any], seed: int) -> dict[str, Any]:
    """The ``learned`` block of ``--method both``: head values beside the exact ones."""
    lc = run_head(session, seed)
    rows = []
    if results.get("fisher"):
        rows.append(_row("Fisher trace (empirical)", lc.fisher_trace, results["fisher"]["trace"]))
    if results.get("hessian"):
        h = results["hessian"]
        rows.append(_row("Hessian trace", lc.hessian_trace, h["trace"]))
        if h.get("eigenvalues"):
            rows.append(_row("Hessian λ_max", lc.hessian_top, h["eigenvalues"][0]))
    return {**_info(lc), "comparison": rows}


def learned_eigen(session: Session, kind: str, k: int, seed: int) -> dict[str, Any]:
    """eigen results from the head: λ_max of the Hessian only."""
    if kind != "hessian":
        raise ConfigError(
            f"--method learned predicts the top Hessian eigenvalue, not the {kind}'s",
            hint="use --curvature hessian, or --method auto",
        )
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
        "learned": _info(lc),
    }


def compare_eigen(session: Session, results: dict[str, Any], kind: str, seed: int) -> dict:
    if kind != "hessian":
        raise ConfigError(
            f"--method both: the head predicts the top Hessian eigenvalue, not the {kind}'s",
            hint="use --curvature hessian",
        )
    lc = run_head(session, seed)
    eigs = results[kind]["eigenvalues"]
    rows = [_row("Hessian λ_max", lc.hessian_top, eigs[0])] if eigs else []
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
            seed=seed,
            levels=tuple(levels),
            eval_data=eval_data,
            batch_size=batch_size,
        )
    lc = ls.curvature
    session.note(NOTE.format(b=lc.b, n=lc.n))
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
def _comparison_table(rows: list[dict], console: Console) -> None:
    table = new_table("learned vs exact", "quantity", "learned", "exact", "rel. error")
    for r in rows:
        err = r["relative_error"]
        table.add_row(
            r["quantity"],
            fmt_estimate(r["learned"]),
            fmt_estimate(r["exact"]),
            "—" if err is None else f"{100 * err:.1f}%",
        )
    console.print(table)


def render_learned(title: str) -> Callable[[Report, Console], None]:
    """Renderer of a ``--method learned`` report (trace / eigen / saliency)."""

    def render(report: Report, console: Console) -> None:
        header(report, console, title)
        res = report.to_dict()["results"]
        info = res["learned"]
        table = new_table(f"learned curvature ({info['method']})", "quantity", "value")
        if res.get("fisher"):
            table.add_row("Fisher trace (empirical)", fmt_estimate(res["fisher"]["trace"]))
            for layer, v in res["fisher"].get("per_layer", {}).items():
                table.add_row(f"  {layer}", fmt_estimate(v["trace"]))
        if res.get("hessian"):
            if res["hessian"].get("trace"):
                table.add_row("Hessian trace", fmt_estimate(res["hessian"]["trace"]))
            for e in res["hessian"].get("eigenvalues", []):
                table.add_row("Hessian λ_max", fmt_estimate(e))
        if table.row_count:
            console.print(table)
        if info.get("layers"):
            _render_saliency(info, console)
        console.print(f"[dim]{info['note']}[/dim]")
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
        "accuracy after masking the least salient weights (learned saliency)",
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
    """The command's own renderer followed by the learned-vs-exact table."""

    def render(report: Report, console: Console) -> None:
        base(report, console)
        info = report.to_dict()["results"].get("learned") or {}
        if info.get("comparison"):
            _comparison_table(info["comparison"], console)
        if info.get("note"):
            console.print(f"[dim]{info['note']}[/dim]")

    return render
