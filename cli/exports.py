"""``--save-diagonal`` (trace) and ``--save-scores`` (saliency): options and glue.

The engine computes (`gmcurv.diagonal`) and writes (`gmcurv.io.export`); this module checks
the paths before any compute and records what was written in the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from gmcurv.errors import ConfigError

SaveDiagonalOpt = Annotated[
    Path | None,
    typer.Option(
        "--save-diagonal",
        help="Write the curvature's diagonal per parameter (.safetensors, parameter-named "
        "tensors; GGN/Hessian: stochastic, with standard errors in <stem>.stderr.safetensors).",
        show_default=False,
    ),
]
SaveScoresOpt = Annotated[
    Path | None,
    typer.Option(
        "--save-scores",
        help="Write the --criterion's saliency per weight (.safetensors, parameter-named).",
        show_default=False,
    ),
]


def check_save_diagonal(path: Path, kinds: list[str], inputs: list[Any]) -> list[Path]:
    """Refuse a bad --save-diagonal request before compute; the files it will write."""
    from gmcurv.io.export import check_export_paths

    if len(kinds) != 1:
        raise ConfigError(
            "--save-diagonal writes one curvature's diagonal, but --curvature all asks for three",
            hint="add --curvature fisher, ggn or hessian",
        )
    return check_export_paths(path, "--save-diagonal", inputs, stderr=kinds[0] != "fisher")


def write_diagonal(
    session: Any,
    path: Path,
    kind: str,
    *,
    fisher: str,
    mc_samples: int,
    probes: int,
    seed: int,
    batch_size: int,
    budget_bytes: int | None,
) -> dict[str, Any]:
    """Compute the diagonal (engine), write it on rank 0, and say what was written."""
    from gmcurv.diagonal import curvature_diagonal
    from gmcurv.io.export import save_diagonal

    assert session.objective is not None and session.data is not None
    total = session.data.n if kind == "fisher" else None
    with (
        session.stage("diagonal"),
        session.progress(f"{kind} diagonal", total) as advance,
    ):
        diag = curvature_diagonal(
            session.objective,
            session.data,
            kind,
            fisher=fisher,
            mc_samples=mc_samples,
            probes=probes,
            seed=seed,
            batch_size=batch_size,
            budget_bytes=budget_bytes,
            progress=advance,
        )
    files: list[Path] = []
    if session.comm.main:
        sha = session.loaded.sha256 if session.loaded else None
        with session.stage("write"):
            files = save_diagonal(path, diag, session.dtype, sha)
        session.note(f"diagonal written to {', '.join(str(f) for f in files)}")
    return {
        "kind": f"{kind}-diagonal",
        "method": diag.method,
        "n_examples": diag.n_examples,
        "files": [str(f) for f in files],
    }


def write_scores(
    session: Any, path: Path, analysis: Any, criterion: str, fisher: str
) -> dict[str, Any]:
    """Write the per-weight saliencies of `criterion` from a `SaliencyAnalysis`."""
    from gmcurv.io.export import save_scores
    from gmcurv.saliency import CONVENTION

    if criterion not in analysis.scores:
        raise ConfigError(f"no {criterion} saliencies were computed")
    files: list[Path] = []
    if session.comm.main:
        sha = session.loaded.sha256 if session.loaded else None
        with session.stage("write"):
            files = save_scores(
                path,
                analysis.scores[criterion],
                analysis.score_stderr.get(criterion),
                criterion=criterion,
                n_examples=analysis.n_examples,
                dtype=session.dtype,
                fisher=None if criterion == "magnitude" else analysis.fisher,
                eps=analysis.eps if criterion == "obs" else None,
                source_sha256=sha,
                convention=CONVENTION if criterion != "magnitude" else "|w|",
            )
        session.note(f"saliency scores written to {', '.join(str(f) for f in files)}")
    return {"criterion": criterion, "files": [str(f) for f in files]}
