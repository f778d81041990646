"""Engine of ``gmcurv landscape``: directions, filter normalisation, grid evaluation against
dense float64 references and the analytic parabola of a quadratic model."""

from __future__ import annotations

import pytest
import torch
from helpers import write_data, write_mlp
from models import Tied, TinyConv, seeded
from safetensors.torch import save_file
from torch import nn

from gmcurv.errors import CheckpointError, ConfigError
from gmcurv.io.checkpoint import load_model
from gmcurv.io.data import load_data
from gmcurv.io.endpoints import load_endpoints
from gmcurv.landscape import (
    FIT_POINTS,
    checkpoint_directions,
    direction_norm,
    eigen_directions,
    evaluate_points,
    filter_normalize,
    grid_axis,
    input_linears,
    landscape,
    mean_loss,
    parse_range,
    quadratic_fit,
    random_directions,
)
from gmcurv.objective import Objective

F64 = torch.float64


def _data(path, x, y):
    save_file({"inputs": x.contiguous(), "targets": y.contiguous()}, str(path))
    return load_data(path)


def _reference(objective, data, directions, coords, batch_size=7):
    """Loss at each point by a plain functional call per point (no vmap, no chunks)."""
    center = {k: p.detach() for k, p in objective.params.items()}
    out = []
    for c in coords:
        params = {
            k: t + sum(float(c[i]) * d[k] for i, d in enumerate(directions))
            for k, t in center.items()
        }
        total, n = 0.0, 0
        with torch.no_grad():
            for batch in data.batches(batch_size, objective.device, objective.dtype):
                total += float(objective.per_example_loss(batch, params).sum())
                n += len(batch)
        out.append(total / n)
    return torch.tensor(out, dtype=F64)


# ------------------------------------------------------------------------- quadratic model
@pytest.fixture
def quadratic(tmp_path):
    """Linear regression with the mse loss: L(θ) = (1/N) Σ (w·x_n + b - y_n)^2 exactly
    quadratic in θ = (w, b), with Hessian H = (2/N) X̃^T X̃ (X̃ = [X, 1])."""
    g = torch.Generator().manual_seed(3)
    n, d = 25, 4
    x = torch.randn(n, d, generator=g, dtype=F64)
    y = torch.randn(n, 1, generator=g, dtype=F64)
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=F64))
        model.bias.copy_(torch.randn(1, generator=g, dtype=F64))
    objective = Objective.build(model, "mse")
    data = _data(tmp_path / "reg.safetensors", x, y)
    xt = torch.cat([x, torch.ones(n, 1, dtype=F64)], 1)
    theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    resid = xt @ theta - y[:, 0]
    H = 2.0 / n * xt.T @ xt
    grad = 2.0 / n * xt.T @ resid
    L0 = float((resid**2).mean())
    w, V = torch.linalg.eigh(H)
    w, V = w.flip(0), V.flip(1)

    def as_dir(v):
        return {"weight": v[:d].reshape(1, d).clone(), "bias": v[d:].clone()}

    return objective, data, L0, grad, w, V, as_dir


def test_quadratic_slice_is_the_analytic_parabola(quadratic):
    objective, data, L0, grad, w, V, as_dir = quadratic
    alphas = grid_axis(-1.5, 1.5, 7)
    res = landscape(objective, data, [as_dir(V[:, 0])], alphas, batch_size=10)
    analytic = L0 + alphas * float(grad @ V[:, 0]) + 0.5 * float(w[0]) * alphas**2
    torch.testing.assert_close(res.loss, analytic, rtol=0, atol=1e-10)
    assert res.center_loss == pytest.approx(L0, abs=1e-12)
    fit = res.fits[0]
    assert fit.curvature == pytest.approx(float(w[0]), rel=1e-10)
    assert fit.c1 == pytest.approx(float(grad @ V[:, 0]), rel=1e-9, abs=1e-12)
    assert fit.stderr is not None and fit.stderr < 1e-8


def test_quadratic_plane_along_two_eigenvectors(quadratic):
    objective, data, L0, grad, w, V, as_dir = quadratic
    ax = grid_axis(-1.0, 1.0, 5)
    res = landscape(objective, data, [as_dir(V[:, 0]), as_dir(V[:, 1])], ax, ax.clone())
    A, B = torch.meshgrid(ax, ax, indexing="ij")
    analytic = (
        L0
        + A * float(grad @ V[:, 0])
        + B * float(grad @ V[:, 1])
        + 0.5 * (float(w[0]) * A**2 + float(w[1]) * B**2)
    )
    torch.testing.assert_close(res.loss, analytic, rtol=0, atol=1e-10)
    assert res.loss[2, 2] == pytest.approx(L0, abs=1e-12)  # the grid's centre is θ0
    for fit, lam in zip(res.fits, w[:2], strict=True):
        assert fit.curvature == pytest.approx(float(lam), rel=1e-10)


def test_eigen_directions_fit_their_eigenvalues(quadratic):
    objective, data, _L0, _grad, w, V, _as_dir = quadratic
    dirs, values, method, _notes = eigen_directions(objective, data, 2)
    assert method == "exact(dense)"
    for d, e, lam, v in zip(dirs, values, w[:2], V.T[:2], strict=True):
        assert e.value == pytest.approx(float(lam), rel=1e-10)
        assert direction_norm(d) == pytest.approx(1.0, rel=1e-12)
        flat = torch.cat([d["weight"].reshape(-1), d["bias"]])
        assert abs(float(flat @ v)) == pytest.approx(1.0, rel=1e-10)  # up to sign
    ax = grid_axis(-1.0, 1.0, 5)
    res = landscape(objective, data, dirs, ax, ax.clone())
    for fit, e in zip(res.fits, values, strict=True):
        assert fit.curvature == pytest.approx(e.value, rel=1e-9)


def test_quadratic_fit_is_exact_on_a_parabola():
    t = torch.tensor(FIT_POINTS, dtype=F64) * 0.3
    fit = quadratic_fit(t, 2.0 - 0.5 * t + 1.75 * t**2)
    assert (fit.c0, fit.c1, fit.c2) == pytest.approx((2.0, -0.5, 1.75), abs=1e-12)
    assert fit.curvature == pytest.approx(3.5, rel=1e-12) and fit.halfwidth == pytest.approx(0.6)


# --------------------------------------------------------------------- centre and the grid
@pytest.fixture
def mlp_problem(tmp_path):
    path = write_mlp(tmp_path / "model.safetensors", sizes=(6, 8, 5, 3))
    lm = load_model(path, dtype=F64)
    data = load_data(write_data(tmp_path / "data.safetensors", n=30))
    return lm, Objective.build(lm.model, lm.loss), data


def test_grid_centre_equals_the_models_loss(mlp_problem):
    _lm, objective, data = mlp_problem
    dirs = random_directions(objective.params, 2, seed=1)
    ax = grid_axis(-1.0, 1.0, 5)
    res = landscape(objective, data, dirs, ax, ax.clone(), batch_size=8)
    ref = mean_loss(objective, data)
    assert res.center_loss == pytest.approx(ref, rel=1e-12)
    assert float(res.loss[2, 2]) == pytest.approx(ref, rel=1e-12)
    assert res.center_accuracy is not None and 0.0 <= res.center_accuracy <= 1.0
    assert res.n_points == 25 + 1 + 2 * len(FIT_POINTS) and res.vmapped


def test_grid_matches_a_pointwise_reference_for_every_chunking(mlp_problem):
    _lm, objective, data = mlp_problem
    dirs = random_directions(objective.params, 2, seed=2, include_bias=True)
    coords = torch.cartesian_prod(grid_axis(-1, 1, 3), grid_axis(-0.5, 0.5, 3))
    ref = _reference(objective, data, dirs, coords)
    assert input_linears(objective, data.first(2, "cpu", F64).inputs) == {
        "net.0": ("net.0.weight", "net.0.bias")
    }
    cases = [(1, True, 1 << 30, True), (4, False, 1 << 30, True), (9, True, 0, False),
             (2, False, 1 << 30, False)]  # fmt: skip
    for chunk, affine, cache, stacked in cases:
        got = evaluate_points(
            objective, data, dirs, coords, batch_size=7, chunk=chunk, affine_inputs=affine,
            cache_bytes=cache, stacked=stacked,
        )  # fmt: skip
        torch.testing.assert_close(got.loss, ref, rtol=1e-12, atol=0)
        assert got.n == 30 and got.accuracy is not None
        assert got.mode == ("stacked" if stacked and affine else "vmap")
    for p in objective.model.modules():
        assert "forward" not in vars(p)  # the swapped forward is gone afterwards


def test_conv_batchnorm_and_tied_models_match_the_reference(tmp_path):
    g = torch.Generator().manual_seed(0)
    conv = Objective.build(seeded(TinyConv), "cross_entropy")
    x = torch.randn(12, 2, 4, 4, generator=g, dtype=F64)
    conv_data = _data(tmp_path / "conv.safetensors", x, torch.randint(0, 3, (12,), generator=g))
    tied = Objective.build(seeded(Tied), "cross_entropy")
    ids = torch.randint(0, 6, (10, 5), generator=g)
    tied_data = _data(tmp_path / "tied.safetensors", ids, torch.randint(0, 6, (10,), generator=g))
    for objective, data in ((conv, conv_data), (tied, tied_data)):
        dirs = random_directions(objective.params, 2, seed=0, include_bias=True)
        coords = torch.tensor([[0.0, 0.0], [0.3, -0.2], [-1.0, 0.5]], dtype=F64)
        got = evaluate_points(objective, data, dirs, coords, batch_size=5)
        assert got.mode == "vmap"  # Conv / BatchNorm / Embedding: no stacked Linear form
        torch.testing.assert_close(
            got.loss, _reference(objective, data, dirs, coords), rtol=1e-12, atol=0
        )


class Branchy(nn.Module):
    """Data-dependent control flow: vmap cannot batch it, the loop fallback must."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = self.fc(x)
        return h * 2 if bool(h.sum() > 0) else h


def test_models_vmap_cannot_batch_fall_back_to_a_loop(tmp_path):
    torch.manual_seed(0)
    objective = Objective.build(Branchy().double(), "cross_entropy")
    data = load_data(write_data(tmp_path / "d.safetensors", n=9))
    dirs = random_directions(objective.params, 1, seed=0)
    coords = torch.tensor([[-1.0], [0.0], [2.0]], dtype=F64)
    got = evaluate_points(objective, data, dirs, coords, batch_size=4, affine_inputs=False)
    assert not got.vmapped and got.mode == "loop"
    torch.testing.assert_close(
        got.loss, _reference(objective, data, dirs, coords, 4), rtol=1e-12, atol=0
    )


# ------------------------------------------------------------------------------ directions
def test_filter_normalisation_gives_each_filter_its_weight_filters_norm():
    model = seeded(TinyConv)
    params = {k: p.detach() for k, p in model.named_parameters()}
    dirs = random_directions(params, 2, seed=5)
    assert not torch.equal(dirs[0]["c1.weight"], dirs[1]["c1.weight"])
    for d in dirs:
        for name, w in params.items():
            if w.ndim >= 2:  # Conv: per output channel; Linear: per output neuron (row)
                got = d[name].reshape(w.shape[0], -1).norm(dim=1)
                want = w.detach().reshape(w.shape[0], -1).norm(dim=1)
                torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
            else:  # biases and BatchNorm scale/shift stay fixed by default
                assert torch.count_nonzero(d[name]) == 0
    with_bias = random_directions(params, 1, seed=5, include_bias=True)[0]
    for name, w in params.items():
        if w.ndim == 1:
            assert float(with_bias[name].norm()) == pytest.approx(float(w.norm()), rel=1e-10)
    # the same seed gives the same directions; the function itself is deterministic
    again = random_directions(params, 2, seed=5)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(dirs, again, strict=True) for k in a)
    d = {"w": torch.ones(2, 3), "b": torch.ones(2)}
    w = {"w": torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]]), "b": torch.tensor([1.0, 1.0])}
    out = filter_normalize(d, w)
    torch.testing.assert_close(out["w"].norm(dim=1), torch.tensor([5.0, 2.0]))
    assert torch.count_nonzero(out["b"]) == 0


def test_random_directions_of_bias_only_selection_are_refused():
    params = {"fc.bias": torch.ones(3)}
    with pytest.raises(ConfigError, match="--include-bias"):
        random_directions(params, 2)


def test_interpolation_endpoints_equal_the_two_checkpoints_losses(tmp_path):
    a = write_mlp(tmp_path / "a.safetensors", sizes=(6, 8, 3), seed=0)
    b = write_mlp(tmp_path / "b.safetensors", sizes=(6, 8, 3), seed=1)
    c = write_mlp(tmp_path / "c.safetensors", sizes=(6, 8, 3), seed=2)
    data = load_data(write_data(tmp_path / "data.safetensors", n=20))
    la = load_model(a, dtype=F64)
    obj_a = Objective.build(la.model, la.loss)
    losses = {}
    for path in (a, b, c):
        lm = load_model(path, dtype=F64)
        losses[path] = mean_loss(Objective.build(lm.model, lm.loss), data)
    ends = load_endpoints([b, c], la, obj_a.params, dtype=F64)
    dirs = checkpoint_directions(obj_a.params, ends, ["b", "c"])
    line = landscape(obj_a, data, dirs[:1], grid_axis(0.0, 1.0, 5), extra=torch.eye(1))
    assert float(line.loss[0]) == pytest.approx(losses[a], rel=1e-12)
    assert float(line.loss[-1]) == pytest.approx(losses[b], rel=1e-12)
    assert line.extra_loss is not None and float(line.extra_loss[0]) == pytest.approx(
        losses[b], rel=1e-12
    )
    ax = grid_axis(0.0, 1.0, 3)
    plane = landscape(obj_a, data, dirs, ax, ax.clone(), extra=torch.eye(2))
    assert float(plane.loss[0, 0]) == pytest.approx(losses[a], rel=1e-12)
    assert float(plane.loss[2, 0]) == pytest.approx(losses[b], rel=1e-12)
    assert float(plane.loss[0, 2]) == pytest.approx(losses[c], rel=1e-12)


def test_checkpoint_directions_refuse_bad_endpoints(tmp_path):
    a = write_mlp(tmp_path / "a.safetensors", sizes=(6, 8, 3), seed=0)
    wide = write_mlp(tmp_path / "wide.safetensors", sizes=(6, 9, 3), seed=0)
    relu = write_mlp(tmp_path / "relu.safetensors", sizes=(6, 8, 3), activation="relu")
    la = load_model(a, dtype=F64)
    params = dict(la.model.named_parameters())
    with pytest.raises(CheckpointError, match="do not match"):
        load_endpoints([wide], la, params, dtype=F64)
    with pytest.raises(CheckpointError, match="architecture"):
        load_endpoints([relu], la, params, dtype=F64)
    with pytest.raises(ConfigError, match="equals MODEL"):
        checkpoint_directions(params, [params], ["a"])
    other = {k: v.detach() + 1.0 for k, v in params.items()}
    twice = {k: v.detach() + 2.0 for k, v in params.items()}
    with pytest.raises(ConfigError, match="one line"):
        checkpoint_directions(params, [other, twice], ["b", "c"])


# ------------------------------------------------------------------------------ the grid
@pytest.mark.parametrize("text", ["1:-1", "abc", "1:1", "0:nan", "1:2:3", ""])
def test_bad_ranges_are_refused(text):
    with pytest.raises(ConfigError, match="--range"):
        parse_range(text)


def test_ranges_and_axes():
    assert parse_range("-1:1") == (-1.0, 1.0) and parse_range(" -0.5 : 2e-1 ") == (-0.5, 0.2)
    ax = grid_axis(-1.0, 1.0, 11)
    assert ax[5] == 0.0 and len(ax) == 11  # exactly the centre, not 1e-17 beside it
    with pytest.raises(ConfigError, match="--steps"):
        grid_axis(-1.0, 1.0, 2)


def test_per_point_losses_fast_path_matches_the_loss_module():
    from gmcurv.landscape.totals import point_losses

    g = torch.Generator().manual_seed(0)
    outs = torch.randn(3, 5, 4, generator=g, dtype=F64) * 5
    objective = Objective.build(nn.Linear(2, 4).double(), "cross_entropy")
    for targets in (torch.tensor([0, 3, 1, 1, 2]), torch.tensor([0, -100, 1, 1, 2])):
        want = torch.stack([objective.loss.per_example(o, targets).sum() for o in outs])
        torch.testing.assert_close(point_losses(objective, outs, targets), want, rtol=1e-13, atol=0)
