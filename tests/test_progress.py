"""Progress that moves: every phase of a command announces its total and advances to it.

Checked with the recording sink (`gmcurv.cli.progress.recording`), not by scraping the
screen: a phase whose count stays at 0 while the work is done, or a long phase without a
total (no ETA), fails here.
"""

from __future__ import annotations

import pytest
from helpers import write_data, write_mlp

from gmcurv.cli import progress
from gmcurv.cli.app import app

N = 40


@pytest.fixture
def files(tmp_path):
    model = write_mlp(tmp_path / "model.safetensors", sizes=(6, 10, 8, 3))
    data = write_data(tmp_path / "data.safetensors", n=N)
    return [str(model), str(data), "--batch-size", "16"]


def _run(runner, args) -> list[progress.Phase]:
    with progress.recording() as rec:
        r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    return rec.phases


def _by_label(phases, text):
    found = [p for p in phases if text in p.label]
    assert found, [p.label for p in phases]
    return found


def _complete(p: progress.Phase) -> None:
    """Counted to its total, in more than one step when there are several units."""
    assert p.total is not None, p
    assert p.done == pytest.approx(p.total), p
    assert p.advances >= min(p.total, 2), p
    assert p.ended is not None


def test_recorder_counts_phases_and_updates():
    rec = progress.Recorder()
    with rec.bar("first", 3, disabled=True) as adv:
        adv(1)
        adv(2)
        adv.phase("second", None)
        adv.update(4, 10)
        adv.update(7)
    first, second = rec.phases
    assert (first.label, first.total, first.done, first.advances) == ("first", 3, 3, 2)
    assert (second.label, second.total, second.done) == ("second", 10, 7)
    assert first.disabled and second.disabled
    assert first.ended is not None and second.ended is not None


def test_rich_bar_disabled_draws_nothing(capsys):
    with progress.rich_bar("work", 2, disabled=True) as adv:
        adv(1)
        adv.phase("more", 3)
        adv.update(2, 3)
    assert capsys.readouterr().err == ""


def test_trace_fisher_counts_examples(runner, files):
    phases = _run(runner, ["trace", *files, "-q"])
    (capture,) = _by_label(phases, "capturing gradients")
    assert capture.total == N
    _complete(capture)
    assert capture.advances == 3  # per batch of 16: 16 + 16 + 8
    assert all(p.disabled for p in phases)  # -q (and no terminal): nothing drawn


def test_trace_hessian_counts_products(runner, files):
    args = ["--curvature", "hessian", "--method", "hutchinson", "--probes", "6", "--tol", "0"]
    phases = _run(runner, ["trace", *files, *args, "--k", "0", "--json"])
    products = _by_label(phases, "products")[-1]
    assert products.total == 6
    _complete(products)


def test_hessian_graph_build_is_its_own_phase_before_the_products(runner, files):
    """The gradient graph (the first product's build, long on large models) shows as a
    spinner with a label, then the products count from 0 — no bar at 0 meanwhile."""
    args = ["--curvature", "hessian", "--method", "hutchinson", "--probes", "6", "--tol", "0"]
    for extra in ([], ["--batch-size", "64"]):  # several batches, and a single one
        phases = _run(runner, ["trace", *files, *args, *extra, "--k", "2", "-q"])
        labels = [p.label for p in phases]
        (graph,) = _by_label(phases, "gradient graph over 40 examples")
        assert graph.total is None and graph.done == 0 and graph.ended is not None
        at = phases.index(graph)
        assert "trace: products" in labels[at + 1], labels
        _complete(phases[at + 1])
        assert not any("gradient graph" in x for x in labels[at + 1 :]), labels  # built once


def test_single_batch_capture_is_a_spinner(runner, files):
    phases = _run(runner, ["trace", *files, "--batch-size", "64", "-q"])
    (capture,) = _by_label(phases, "capturing gradients (one batch of 40 examples)")
    assert capture.total is None and capture.ended is not None
    phases = _run(runner, ["eigen", *files, "--curvature", "fisher", "--batch-size", "64", "-q"])
    (capture,) = _by_label(phases, "capturing gradients (one batch of 40 examples)")
    assert capture.total is None
    _complete(_by_label(phases, "forward of 40 examples")[0])  # then it moves inside the batch


def test_eigen_phases_have_totals(runner, files):
    phases = _run(runner, ["eigen", *files, "--method", "lanczos", "--k", "2", "-q"])
    (lanczos,) = _by_label(phases, "Lanczos: products")
    assert lanczos.total is not None and 0 < lanczos.done <= lanczos.total
    phases = _run(runner, ["eigen", *files, "--curvature", "fisher", "--k", "2", "-q"])
    (capture,) = _by_label(phases, "fisher: capturing gradients")
    _complete(capture)
    (kernel,) = _by_label(phases, "fisher: Gram kernel (rows)")
    assert kernel.total == N
    _complete(kernel)


def test_spectrum_counts_lanczos_products(runner, files):
    phases = _run(
        runner, ["spectrum", *files, "--method", "lanczos", "--probes", "2", "--steps", "5", "-q"]
    )
    (slq,) = _by_label(phases, "Lanczos quadrature: products")
    assert slq.total == 10
    _complete(slq)


def test_saliency_every_step_moves(runner, files):
    phases = _run(runner, ["saliency", *files, "--levels", "0.2,0.5", "-q"])
    labels = [p.label for p in phases if p.total is not None]
    assert labels == [
        "saliency: capturing gradients",
        "saliency: damped inverse Fisher (kernel groups, blocks)",
        "saliency: pruning curves (model evaluations)",
    ]
    for p in phases:
        if p.total is not None:
            _complete(p)
    assert phases[-1].total == 4 * 2  # magnitude, obd, obs and obs+update at two levels


def test_prune_rounds_announce_each_step(runner, files, tmp_path):
    out = tmp_path / "pruned.safetensors"
    args = ["--prune", "0.5", "--rounds", "2", "--save-pruned", str(out), "-q"]
    phases = _run(runner, ["saliency", *files, *args])
    labels = [p.label for p in phases]
    for r in (1, 2):
        for step in ("capturing gradients", "damped inverse Fisher", "OBS update"):
            assert any(f"round {r}/2: {step}" in x for x in labels), labels
    for p in phases:
        if p.total is not None:
            _complete(p)


def test_landscape_counts_points(runner, files):
    phases = _run(runner, ["landscape", *files, "--steps", "5", "-q"])
    (grid,) = _by_label(phases, "grid points")
    _complete(grid)


def test_bars_only_on_a_terminal_and_never_with_json_or_quiet(runner, files, monkeypatch):
    from gmcurv.cli.consoles import stderr

    assert all(p.disabled for p in _run(runner, ["trace", *files]))  # not a terminal
    monkeypatch.setattr(type(stderr), "is_terminal", property(lambda self: True))
    assert not any(p.disabled for p in _run(runner, ["trace", *files]))
    assert all(p.disabled for p in _run(runner, ["trace", *files, "--json"]))
    assert all(p.disabled for p in _run(runner, ["trace", *files, "-q"]))


def test_trace_gram_kernel_phase_moves(runner, files):
    """Several batches and eigenvalues: the kernel build is its own phase, counted in rows."""
    phases = _run(runner, ["trace", *files, "--k", "2", "-q"])
    (kernel,) = _by_label(phases, "Gram kernel")
    assert kernel.total == N
    _complete(kernel)
    (eigen,) = _by_label(phases, "Gram eigenvalues")
    assert eigen.ended is not None
    one = _run(runner, ["trace", *files[:2], "--batch-size", "64", "--k", "2", "-q"])
    (kernel,) = _by_label(one, "Gram kernel (rows)")  # one batch: the summed kernel
    _complete(kernel)
    args = ["trace", *files[:2], "--batch-size", "64", "--k", "2", "--per-layer-eigen", "-q"]
    (grams,) = _by_label(_run(runner, args), "Gram kernels (blocks)")  # per-block kernels
    assert grams.total == 3
    _complete(grams)


SPECTRUM = ["spectrum", "--method", "lanczos", "--probes", "2", "--steps", "5"]
OBD_HESSIAN = ["saliency", "--criterion", "obd-hessian", "--probes", "4", "--levels", "0.5"]


@pytest.mark.parametrize(
    ("command", "graph", "products"),
    [
        (SPECTRUM, "gradient", "SLQ"),
        ([*SPECTRUM, "--curvature", "ggn"], "Jacobian", "SLQ"),
        (OBD_HESSIAN, "gradient", "diag"),
    ],
)
def test_spectrum_and_saliency_announce_the_graph_build(runner, files, command, graph, products):
    """The graph build is a labelled spinner of its own, before the products' bar."""
    phases = _run(runner, [command[0], *files, *command[1:], "-q"])
    labels = [p.label for p in phases]
    (built,) = _by_label(phases, f"{graph} graph over 40 examples (built once)")
    assert built.total is None and built.ended is not None
    after = labels[phases.index(built) + 1]
    assert ("Lanczos quadrature: products" if products == "SLQ" else "Hessian diagonal") in after
    _complete(phases[phases.index(built) + 1])


def test_trace_single_batch_moves_inside_it(runner, files):
    """A sample captured as one batch: the hooked forward counts module calls, the
    backward their cotangents, then the self-check (no count) — no phase sits at 0."""
    model, data = files[:2]
    phases = _run(runner, ["trace", model, data, "-q", "--k", "0"])
    labels = [p.label for p in phases]
    (forward,) = _by_label(phases, "forward of 40 examples: 3 hooked modules")
    (backward,) = _by_label(phases, "backward: 3 module outputs")
    (check,) = _by_label(phases, "self-check: example 0 alone against autograd")
    for p in (forward, backward):
        _complete(p)
    assert check.total is None
    assert labels.index(forward.label) < labels.index(backward.label) < labels.index(check.label)


def test_rich_bar_countless_phase_after_a_counted_one():
    """rich's ``reset`` keeps the old total when given None: each phase is a fresh task."""
    with progress.rich_bar("counted", 8, disabled=True) as adv:
        adv(3)
        adv.phase("spinner", None)
        sink = adv.sink
        (task,) = sink.bar.tasks
        assert (task.description, task.total, task.completed) == ("spinner", None, 0)
