"""The landscape's stacked-Linear fast path (`gmcurv.landscape.stacked`): exact against one
plain functional call per point, and no module is modified while it runs."""

from __future__ import annotations

import torch
from helpers import write_data, write_mlp
from torch import nn

from gmcurv.io.checkpoint import load_model
from gmcurv.io.data import load_data
from gmcurv.landscape import evaluate_points, random_directions, stackable_linears
from gmcurv.landscape.stacked import LinearRoutes
from gmcurv.objective import Objective

F64 = torch.float64


def _plain(objective, data, dirs, coords):
    """Mean loss per point: one functional call per point and batch, no chunks, no vmap."""
    center = {k: p.detach() for k, p in objective.params.items()}
    out = []
    for c in coords:
        params = {
            k: t + sum(float(c[i]) * d[k] for i, d in enumerate(dirs)) for k, t in center.items()
        }
        with torch.no_grad():
            per = [
                objective.per_example_loss(b, params)
                for b in data.batches(8, "cpu", objective.dtype)
            ]
        out.append(float(torch.cat(per).double().mean()))
    return torch.tensor(out, dtype=F64)


def _problem(tmp_path, dtype=F64, sizes=(6, 9, 7, 3)):
    lm = load_model(write_mlp(tmp_path / "m.safetensors", sizes=sizes), dtype=dtype)
    data = load_data(write_data(tmp_path / "d.safetensors", n=26))
    return Objective.build(lm.model, lm.loss), data


def test_stacked_chunks_equal_the_plain_loop(tmp_path):
    objective, data = _problem(tmp_path)
    dirs = random_directions(objective.params, 2, seed=4, include_bias=True)
    coords = torch.tensor(
        [[0.0, 0.0], [0.4, -0.3], [-1.0, 0.7], [2.0, 2.0], [0.1, -1.5]], dtype=F64
    )
    want = _plain(objective, data, dirs, coords)
    for affine in (True, False):
        for chunk in (1, 2, 5):
            got = evaluate_points(
                objective, data, dirs, coords, batch_size=8, chunk=chunk, affine_inputs=affine
            )
            # without the affine input layer the first layer sees [B, in], not [C, B, in]
            assert got.mode == ("stacked" if affine else "vmap")
            torch.testing.assert_close(got.loss, want, rtol=1e-13, atol=0)
    loop = evaluate_points(objective, data, dirs, coords, batch_size=8, stacked=False)
    assert loop.mode == "vmap"
    torch.testing.assert_close(loop.loss, want, rtol=1e-13, atol=0)


def test_float32_stacked_agrees_with_float64(tmp_path):
    objective, data = _problem(tmp_path, dtype=torch.float32)
    dirs = random_directions(objective.params, 1, seed=0)
    coords = torch.linspace(-1, 1, 7, dtype=F64).unsqueeze(1)
    got = evaluate_points(objective, data, dirs, coords, batch_size=8)
    assert got.mode == "stacked"
    ref64, data64 = _problem(tmp_path, dtype=F64)
    dirs64 = [{k: v.double() for k, v in d.items()} for d in dirs]
    want = _plain(ref64, data64, dirs64, coords)
    torch.testing.assert_close(got.loss, want, rtol=2e-5, atol=0)


def test_no_module_is_modified_and_the_routes_are_gone_after(tmp_path):
    objective, data = _problem(tmp_path)
    seen = []

    def pre(m, _args):  # during the call: the module's own class forward, untouched
        seen.append("forward" in vars(m))

    handles = [m.register_forward_pre_hook(pre) for m in objective.model.modules()]
    before = {k: p.detach().clone() for k, p in objective.model.named_parameters()}
    dirs = random_directions(objective.params, 2, seed=1)
    got = evaluate_points(objective, data, dirs, torch.rand(4, 2, dtype=F64), batch_size=8)
    for h in handles:
        h.remove()
    assert got.mode == "stacked" and seen and not any(seen)
    for k, p in objective.model.named_parameters():
        assert torch.equal(p, before[k])
    assert not any(
        isinstance(m, LinearRoutes) for m in torch.overrides._get_current_function_mode_stack()
    )


class Twice(nn.Module):
    """One Linear applied twice: not stackable (the chunk goes through vmap)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 4)
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(torch.tanh(self.fc(self.inp(x))))))


def test_a_linear_called_twice_is_not_stacked(tmp_path):
    torch.manual_seed(0)
    objective = Objective.build(Twice().double(), "cross_entropy")
    data = load_data(write_data(tmp_path / "d.safetensors", n=12))
    assert stackable_linears(objective, data.first(2, "cpu", F64).inputs) == {}
    dirs = random_directions(objective.params, 1, seed=0, include_bias=True)
    coords = torch.tensor([[-0.5], [0.0], [1.0]], dtype=F64)
    got = evaluate_points(objective, data, dirs, coords, batch_size=5)
    assert got.mode == "vmap"
    torch.testing.assert_close(got.loss, _plain(objective, data, dirs, coords), rtol=1e-13, atol=0)
