"""--loss path/file.py:fn — a user's per-example loss, against dense float64 oracles."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import write_data, write_mlp
from oracles import dense_ggn_autograd, dense_hessian, per_example_grads
from typer.testing import CliRunner

from gmcurv.batch import Batch
from gmcurv.capture import capture_all
from gmcurv.errors import ArchitectureError, ConfigError, UnsupportedError
from gmcurv.fisher import fisher_diagonal, fisher_trace
from gmcurv.io.checkpoint import load_model
from gmcurv.io.data import load_data
from gmcurv.io.factories import load_loss
from gmcurv.losses import CallableLoss
from gmcurv.objective import Objective
from gmcurv.products import batch_ggnvp, batch_hvp

LOSS_FILE = '''
import torch
import torch.nn.functional as F

def huber(outputs, targets):
    """A robust regression loss: not one of gmcurv's built-ins."""
    return F.huber_loss(outputs, targets, reduction="none", delta=0.3).mean(1)

def ce(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")

def mean_only(outputs, targets):
    return F.cross_entropy(outputs, targets)
'''


@pytest.fixture
def loss_file(tmp_path):
    path = tmp_path / "losses.py"
    path.write_text(LOSS_FILE)
    return path


def _problem(tmp_path, loss, classes=3, regression=False):
    model = write_mlp(tmp_path / "m.safetensors", sizes=(5, 7, classes), activation="tanh")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64)
    if regression:
        y = torch.randn(9, classes, generator=g, dtype=torch.float64)
    else:
        y = torch.randint(0, classes, (9,), generator=g)
    lm = load_model(model, loss=str(loss), dtype=torch.float64)
    return Objective.build(lm.model, load_loss(lm.loss)), Batch(x, y, 0)


def test_callable_equal_to_builtin_cross_entropy(tmp_path, loss_file):
    """Same loss, two routes: every curvature product agrees with the built-in to 1e-12."""
    custom, batch = _problem(tmp_path, f"{loss_file}:ce")
    builtin = Objective.build(custom.model, "cross_entropy")
    assert isinstance(custom.loss, CallableLoss)
    v = custom.space.unflatten(torch.randn(custom.space.size, dtype=torch.float64))
    for product in (batch_hvp, batch_ggnvp):
        a = custom.space.flatten(product(custom, batch, v, True))
        b = builtin.space.flatten(product(builtin, batch, v, True))
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_callable_loss_against_dense_oracles(tmp_path, loss_file):
    obj, batch = _problem(tmp_path, f"{loss_file}:huber", regression=True)
    n = len(batch)
    # the Huber loss is quadratic near 0 and linear beyond delta: both regimes occur
    with torch.no_grad():
        r = (obj.outputs(batch.inputs) - batch.targets).abs()
    assert (r < 0.3).any() and (r > 0.3).any()
    J = per_example_grads(obj, batch)
    F = J.T @ J / n
    dg = capture_all(obj, load_data_from(batch, tmp_path), batch_size=4, fisher="empirical")
    assert math.isclose(fisher_trace(dg), float(torch.trace(F)), rel_tol=1e-10)
    torch.testing.assert_close(
        obj.space.flatten(fisher_diagonal(dg)), torch.diagonal(F), rtol=1e-10, atol=1e-15
    )
    H, G = dense_hessian(obj, batch), dense_ggn_autograd(obj, batch)
    v = torch.randn(obj.space.size, dtype=torch.float64)
    vec = obj.space.unflatten(v)
    hv = obj.space.flatten(batch_hvp(obj, batch, vec, False)) / n  # huber: no forward AD
    torch.testing.assert_close(hv, H @ v, rtol=0, atol=1e-10)
    for forward in (True, False):
        gv = obj.space.flatten(batch_ggnvp(obj, batch, vec, forward)) / n
        torch.testing.assert_close(gv, G @ v, rtol=0, atol=1e-10)


def load_data_from(batch: Batch, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "d.safetensors"
    save_file({"inputs": batch.inputs.contiguous(), "targets": batch.targets.contiguous()}, path)
    return load_data(path)


def test_bad_callables_are_clear_errors(tmp_path, loss_file):
    with pytest.raises(UnsupportedError, match="unknown loss"):
        load_loss("hinge")
    with pytest.raises(ArchitectureError, match=r"--loss .*not found"):
        load_loss(f"{tmp_path}/nope.py:fn")
    with pytest.raises(ArchitectureError, match="no callable 'missing'"):
        load_loss(f"{loss_file}:missing")
    obj, batch = _problem(tmp_path, f"{loss_file}:mean_only")
    with pytest.raises(ConfigError, match=r"expected one loss per example"):
        obj.per_example_loss(batch)
    with pytest.raises(UnsupportedError, match="--fisher mc"):
        obj.loss.noise_spec(torch.Size((9, 3)), 1)


def test_cli_custom_loss(tmp_path, loss_file):
    model = write_mlp(tmp_path / "model.safetensors", sizes=(6, 8, 3))
    data = write_data(tmp_path / "data.safetensors", n=30)
    runner = CliRunner()
    common = ["--json", "--dtype", "float64", "--method", "exact", "--curvature", "all"]
    custom = runner.invoke(
        app_(), ["trace", str(model), str(data), "--loss", f"{loss_file}:ce", *common]
    )
    assert custom.exit_code == 0, custom.output
    builtin = runner.invoke(app_(), ["trace", str(model), str(data), *common])
    a, b = json.loads(custom.stdout)["results"], json.loads(builtin.stdout)["results"]
    for kind in ("fisher", "ggn", "hessian"):
        assert a[kind]["trace"]["value"] == pytest.approx(b[kind]["trace"]["value"], rel=1e-10)
    mc = runner.invoke(
        app_(), ["trace", str(model), str(data), "--loss", f"{loss_file}:ce", "--fisher", "mc"]
    )
    assert mc.exit_code == 2 and "predictive distribution" in mc.output
    bad = runner.invoke(app_(), ["trace", str(model), str(data), "--loss", "hinge"])
    assert bad.exit_code == 2 and "unknown loss" in bad.output


def app_():
    from gmcurv.cli.app import app

    return app
