"""Guards for bugs a mutation audit planted and the suite missed (issue 17): each test
states a property of the result, checked against a dense float64 oracle where one exists."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from test_hessian import problem

from gmcurv.fisher import fisher_summary
from gmcurv.hessian import capture_blocks, curvature_summary
from tests.oracles import dense_hessian, per_example_grads


def _block_index(obj, params) -> torch.Tensor:
    offsets = obj.space.offsets()
    return torch.cat([torch.arange(offsets[p].start, offsets[p].stop) for p in params])


def test_per_layer_stochastic_total_is_the_sum_of_every_layer(tmp_path):
    """Hutchinson per layer from shared probes: the total is Σ layers exactly (the blocks
    share probes, so their stderrs are correlated and do not add in quadrature), and the
    total and every layer agree with the dense tr H and its diagonal blocks."""
    obj, batch, data = problem("mlp", tmp_path, n=12)
    s = curvature_summary(
        obj, data, "hessian", method="hutchinson", probes=40, k=0, per_layer=True, seed=1
    )
    blocks = capture_blocks(obj)
    assert set(s.per_layer) == set(blocks) and len(blocks) >= 2
    layers = [s.per_layer[b].trace for b in blocks]
    assert s.trace.value == pytest.approx(sum(e.value for e in layers), rel=1e-12)
    assert s.trace.stderr > 0 and all(e.stderr > 0 for e in layers)
    H = dense_hessian(obj, batch)
    assert abs(s.trace.value - float(torch.trace(H))) <= 5 * s.trace.stderr
    for b, (params, _) in blocks.items():
        idx = _block_index(obj, params)
        sub = float(torch.trace(H[idx][:, idx]))
        assert abs(s.per_layer[b].trace.value - sub) <= 5 * s.per_layer[b].trace.stderr + 1e-12


def test_per_layer_hessian_lambda_max_is_the_layers_own_block(tmp_path):
    """Exact per-layer λ_max is the top eigenvalue of the layer's diagonal block of H."""
    obj, batch, data = problem("mlp", tmp_path, n=12)
    s = curvature_summary(obj, data, "hessian", method="exact", k=3, per_layer=True)
    H = dense_hessian(obj, batch)
    top = float(torch.linalg.eigvalsh(H)[-1])
    assert s.eigenvalues[0].value == pytest.approx(top, rel=1e-9)
    distinct = 0
    for b, (params, _) in capture_blocks(obj).items():
        idx = _block_index(obj, params)
        want = float(torch.linalg.eigvalsh(H[idx][:, idx])[-1])
        assert s.per_layer[b].eigenvalues[0].value == pytest.approx(want, rel=1e-9, abs=1e-12)
        distinct += abs(want - top) > 1e-6 * abs(top)
    assert distinct >= 1  # the test can tell a layer's block from the whole matrix


def test_per_layer_fisher_lambda_max_is_the_layers_own_block(tmp_path):
    """Per-layer Fisher λ_max from the Gram route equals the dense block oracle
    (F = s · Σ_n g_n g_nᵀ, with the convention's scale s read off the total trace)."""
    obj, batch, data = problem("mlp", tmp_path, n=12)
    s = fisher_summary(obj, data, k=3, per_layer=True, per_layer_eigen=True, batch_size=5)
    G = per_example_grads(obj, batch)
    F = G.T @ G
    scale = s.trace.value / float(torch.trace(F))
    F = F * scale
    top = float(torch.linalg.eigvalsh(F)[-1])
    assert s.eigenvalues[0].value == pytest.approx(top, rel=1e-8)
    distinct = 0
    for name, layer in s.per_layer.items():
        params = capture_blocks(obj)[name][0]
        idx = _block_index(obj, params)
        want = float(torch.linalg.eigvalsh(F[idx][:, idx])[-1])
        assert layer.eigenvalues[0].value == pytest.approx(want, rel=1e-8, abs=1e-14)
        distinct += abs(want - top) > 1e-6 * top
    assert distinct >= 1


def test_mc_fisher_trace_stderr_is_calibrated_across_seeds(tmp_path):
    """With C sampled labels per example, the reported MC standard error matches the
    spread of the trace over seeds (it divides the per-column variance by C)."""
    obj, _, data = problem("mlp", tmp_path, n=12)
    runs = [
        fisher_summary(obj, data, fisher="mc", mc_samples=8, seed=s, k=0, per_layer=False).trace
        for s in range(60)
    ]
    values = torch.tensor([r.value for r in runs], dtype=torch.float64)
    ses = torch.tensor([r.stderr for r in runs], dtype=torch.float64)
    ratio = float(ses.pow(2).mean().sqrt() / values.std())
    assert 0.7 < ratio < 1.4, ratio  # without /C the ratio is sqrt(8) = 2.8


# ----------------------------------------------------------------------- GradMetaNet head
def _head_problem(tmp_path):
    from test_gradmetanet import _data_file, _mlp

    from gmcurv.objective import Objective

    return Objective.build(_mlp(seed=23), "cross_entropy"), _data_file(tmp_path, n=200, d=5)


def _fresh_head(calibration: dict[str, float] | None = None):
    """An untrained head (zero log-ratios: it answers the plug-in) with the shipped card,
    its calibration optionally replaced."""
    from test_gradmetanet import SMALL

    from gmcurv.gradmetanet.model import GradMetaNet
    from gmcurv.gradmetanet.pretrained import load_head

    shipped = load_head()
    meta = dict(shipped.meta)
    if calibration is not None:  # symmetric log-error quantiles ±c, one size bin
        intervals = {
            "level": 0.8,
            "edges": [],
            "quantiles": {t: [[-c, c]] for t, c in calibration.items()},
            "counts": {t: [100] for t in calibration},
            "pooled": {t: [-c, c] for t, c in calibration.items()},
        }
        meta["metrics"] = {**meta.get("metrics", {}), "intervals": intervals}
    return replace(shipped, model=GradMetaNet(SMALL).double(), meta=meta)


def _spread(est) -> float:
    """Width of a learned estimate's uncertainty (a ± or an interval, whichever it has)."""
    interval = getattr(est, "interval", None)
    if interval:
        lo, hi = interval
        return float(hi - lo)
    return float(est.stderr)


def test_head_fisher_and_hessian_traces_are_not_swapped(tmp_path):
    """An untrained head answers its plug-in base times e^(scalar log-ratio), target by
    target: give each scalar target its own ratio (1, 2, 3) and read each one back."""
    from gmcurv.gradmetanet.model import SCALAR_TARGETS
    from gmcurv.gradmetanet.predict import predict_curvature

    obj, data = _head_problem(tmp_path)
    head = _fresh_head()
    ratio = {"fisher_trace": 1.0, "hessian_trace": 2.0, "hessian_top": 3.0}
    with torch.no_grad():
        head.model.scalar.mlp[-1].bias.copy_(
            torch.tensor([math.log(ratio[t]) for t in SCALAR_TARGETS], dtype=torch.float64)
        )
    lc = predict_curvature(obj, data, b=64, seed=0, head=head)
    assert lc.fisher_trace.value == pytest.approx(lc.plug.trace, rel=1e-9)
    assert lc.hessian_top.value == pytest.approx(3 * lc.plug.top, rel=1e-9)
    assert lc.hessian_trace.value != pytest.approx(lc.fisher_trace.value, rel=1e-3)


def test_head_uncertainty_follows_its_calibration(tmp_path):
    """The head's uncertainty comes from its held-out calibration: a worse calibration, a
    wider interval (value · e^(±c) for log-error quantiles ±c)."""
    from gmcurv.gradmetanet.predict import predict_curvature

    obj, data = _head_problem(tmp_path)
    targets = ("fisher_trace", "hessian_trace", "hessian_top")
    tight = _fresh_head(dict.fromkeys(targets, 0.1))
    loose = _fresh_head(dict.fromkeys(targets, 0.4))
    a = predict_curvature(obj, data, b=64, seed=0, head=tight)
    b = predict_curvature(obj, data, b=64, seed=0, head=loose)
    for t in targets:
        ea, eb = getattr(a, t), getattr(b, t)
        assert ea.value == eb.value
        assert 0 < _spread(ea) < _spread(eb), t
        if getattr(ea, "interval", None) is not None:  # value · e^(±c)
            lo, hi = ea.interval
            assert lo == pytest.approx(ea.value * math.exp(-0.1), rel=1e-12)
            assert hi == pytest.approx(ea.value * math.exp(0.1), rel=1e-12)
