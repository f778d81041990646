"""Two independent implementations agreeing: gmcurv against curvlinops and BackPACK.

Optional (skipped unless the peers are installed: `pip install --no-deps -r
bench/requirements.txt`); the dense float64 oracles elsewhere are the primary reference.
"""

from __future__ import annotations

import pytest
import torch
from helpers import write_mlp
from safetensors.torch import save_file
from torch import nn

from gmcurv.hessian import exact_ggn_trace
from gmcurv.io.checkpoint import load_model
from gmcurv.io.data import load_data
from gmcurv.objective import Objective
from gmcurv.operator import CurvatureOperator


@pytest.fixture
def problem(tmp_path):
    path = write_mlp(tmp_path / "m.safetensors", sizes=(5, 7, 6, 4), activation="tanh")
    lm = load_model(path, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(23, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (23,), generator=g)
    save_file({"inputs": x, "targets": y}, str(tmp_path / "d.safetensors"))
    obj = Objective.build(lm.model, lm.loss)
    return obj, load_data(tmp_path / "d.safetensors"), x, y


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_products_equal_curvlinops(problem, kind):
    curvlinops = pytest.importorskip("curvlinops")
    obj, data, x, y = problem
    peer_cls = (
        curvlinops.HessianLinearOperator if kind == "hessian" else curvlinops.GGNLinearOperator
    )
    params = [obj.params[k] for k in obj.space.names]
    # curvlinops takes the mean-reduced loss over the whole data set: gmcurv's objective
    peer = peer_cls(obj.model, nn.CrossEntropyLoss(), params, [(x[:10], y[:10]), (x[10:], y[10:])])
    op = CurvatureOperator(obj, data, batch_size=8, kind=kind)
    v = torch.randn(obj.space.size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = op.matvec(v)
    theirs = torch.as_tensor(peer @ v.numpy() if _wants_numpy(peer) else peer @ v)
    torch.testing.assert_close(ours, theirs.to(ours.dtype).reshape(-1), rtol=1e-10, atol=1e-12)


def _wants_numpy(op) -> bool:
    import scipy.sparse.linalg

    return isinstance(op, scipy.sparse.linalg.LinearOperator)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_exact_ggn_trace_equals_backpack(problem):
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import DiagGGNExact

    obj, data, x, y = problem
    ours = exact_ggn_trace(obj, data, batch_size=8).trace(None)[0]
    layers = dict(obj.model.net.named_children())  # "0", "2", "4": Linear layers
    seq = nn.Sequential(layers["0"], nn.Tanh(), layers["2"], nn.Tanh(), layers["4"])
    torch.testing.assert_close(seq(x), obj.model(x))  # the same function
    net = backpack.extend(seq)  # BackPACK wants a plain nn.Sequential
    lossfn = backpack.extend(nn.CrossEntropyLoss())
    with backpack.backpack(DiagGGNExact()):
        lossfn(net(x), y).backward()
    theirs = sum(float(p.diag_ggn_exact.sum()) for p in net.parameters())
    assert ours == pytest.approx(theirs, rel=1e-10)
