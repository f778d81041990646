"""BatchNorm and Dropout: eval mode by default (with a warning naming the modules), BatchNorm
in eval mode captured as a fixed per-channel affine map, train mode with BatchNorm refused.

Oracle: per-example gradients from ``vmap(grad)`` in float64 at 1e-10.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import write_data
from oracles import per_example_grads
from safetensors.torch import save_file
from torch import nn

from gmcurv.batch import Batch
from gmcurv.capture import capture, plan_capture
from gmcurv.cli.app import app
from gmcurv.errors import ConfigError, GmcurvWarning
from gmcurv.modes import apply_mode
from gmcurv.objective import Objective

N = 6


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Running statistics and affine parameters far from the identity map."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(c, generator=gen))
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.3)
    return model


class BN1dSeq(nn.Module):
    """BatchNorm1d on ``[N, C, L]`` (sums over positions) and on ``[N, C]``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding=1)
        self.bn_seq = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4 * 5, 6)
        self.bn_vec = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.bn_seq(self.conv(x))).flatten(1)
        return self.head(torch.tanh(self.bn_vec(self.fc(h))))


class BN2dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 3, 3, stride=2)
        self.bn2 = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        h = self.bn2(self.conv2(h)) + 0.1 * h[:, :3, ::2, ::2][:, :, :2, :2]
        return self.head(torch.tanh(h).mean((2, 3)))


def _problem(name: str):
    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(3)
    if name == "bn1d":
        model, x = BN1dSeq(), torch.randn(N, 3, 5, generator=gen)
    else:
        model, x = BN2dNet(), torch.randn(N, 2, 5, 5, generator=gen)
    model = _randomise_bn(model.double(), gen)
    with pytest.warns(GmcurvWarning, match="eval mode: BatchNorm"):
        obj = Objective.build(model, "cross_entropy")
    y = torch.randint(0, 3, (N,), generator=gen)
    return obj, Batch(x.double(), y, 0)


def _rows(dg, obj) -> torch.Tensor:
    grads: dict[str, torch.Tensor] = {}
    for block in dg.blocks:
        grads.update(block.source.materialize(slice(0, dg.n)))
    return torch.stack(
        [obj.space.flatten({k: v[n, 0] for k, v in grads.items()}) for n in range(N)]
    )


@pytest.mark.parametrize("name", ["bn1d", "bn2d"])
def test_eval_batchnorm_captured_as_affine_map_matches_vmap_grad(name):
    obj, batch = _problem(name)
    kinds = {p.name: p.kind for p in plan_capture(obj.model, obj.params)}
    bns = [k for k in kinds if k.startswith("bn")]
    assert bns and all(kinds[k] == "norm" for k in bns)  # decomposed, not dense
    dg = capture(obj, batch)
    torch.testing.assert_close(_rows(dg, obj), per_example_grads(obj, batch), rtol=1e-10, atol=0)


def test_eval_batchnorm_examples_independent():
    """In eval mode an example's gradient does not depend on the rest of the batch."""
    obj, batch = _problem("bn2d")
    full = _rows(capture(obj, batch), obj)
    alone = capture(obj, Batch(batch.inputs[2:3], batch.targets[2:3], 0))
    grads = {}
    for block in alone.blocks:
        grads.update(block.source.materialize(slice(0, 1)))
    torch.testing.assert_close(
        obj.space.flatten({k: v[0, 0] for k, v in grads.items()}), full[2], rtol=1e-12, atol=0
    )


def test_train_mode_with_batchnorm_is_refused():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))
    with pytest.raises(ConfigError, match="batch") as info:
        Objective.build(model, "cross_entropy", mode="train")
    assert "'1'" in info.value.message and "--mode eval" in info.value.hint


def test_batchnorm_without_running_statistics_is_refused():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, track_running_stats=False))
    with pytest.raises(ConfigError, match="running statistics"):
        apply_mode(model, "eval")


def test_eval_warning_names_the_modules_and_only_when_train_differs(recwarn):
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.0), nn.Linear(5, 2))
    apply_mode(model, "eval")  # p = 0: train mode would give the same answer
    assert not [w for w in recwarn if issubclass(w.category, GmcurvWarning)]
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.3), nn.Linear(5, 2))
    with pytest.warns(GmcurvWarning, match=r"Dropout '1' is off; --mode train would give"):
        apply_mode(model, "eval")
    assert not model.training


def test_train_mode_dropout_warns_what_it_means():
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.3), nn.Linear(5, 2))
    with pytest.warns(GmcurvWarning, match="drawn from --seed"):
        apply_mode(model, "train")
    assert model.training


# ----------------------------------------------------------------------------------- CLI
BN_MLP = """
from torch import nn


def build():
    return nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3)
    )
"""


@pytest.fixture
def bn_mlp(tmp_path):
    src = tmp_path / "bn_mlp.py"
    src.write_text(BN_MLP)
    namespace: dict = {}
    exec(compile(BN_MLP, str(src), "exec"), namespace)
    torch.manual_seed(0)
    model = namespace["build"]()
    model.train()
    with torch.no_grad():
        model(torch.randn(64, 6))
    ckpt = tmp_path / "bn.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    return ckpt, f"{src}:build", write_data(tmp_path / "d.safetensors", n=24)


def test_cli_eval_mode_warns_about_batchnorm_and_dropout(runner, bn_mlp):
    ckpt, arch, data = bn_mlp
    args = ["trace", str(ckpt), str(data), "--arch", arch, "--curvature", "fisher"]
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    (w,) = doc["warnings"]
    assert "BatchNorm '1'" in w and "Dropout '3'" in w and "--mode train" in w
    assert doc["config"]["mode"] == "eval" and doc["config"]["sources"]["mode"] == "default"
    res = runner.invoke(app, [*args, "--quiet"])
    assert res.exit_code == 0 and "eval mode: BatchNorm" in res.stderr


def test_cli_train_mode_with_batchnorm_exits_2(runner, bn_mlp):
    ckpt, arch, data = bn_mlp
    res = runner.invoke(
        app, ["trace", str(ckpt), str(data), "--arch", arch, "--mode", "train", "--quiet"]
    )
    assert res.exit_code == 2, res.output
    assert "per-example gradients" in res.stderr and "Traceback" not in res.output
    assert "--mode eval" in res.stderr


DROPOUT_MLP = """
from torch import nn


def build():
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3))
"""


def test_cli_train_mode_dropout_is_seeded_and_captured(runner, tmp_path):
    """Train-mode Dropout: same --seed, same numbers (Fisher capture included: it used to
    stop with 'capturing gradients changed the model's outputs'); another seed, others."""
    src = tmp_path / "dropout_mlp.py"
    src.write_text(DROPOUT_MLP)
    namespace: dict = {}
    exec(compile(DROPOUT_MLP, str(src), "exec"), namespace)
    torch.manual_seed(0)
    state = namespace["build"]().state_dict()
    ckpt = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt))
    data = write_data(tmp_path / "d.safetensors", n=20)
    args = ["trace", str(ckpt), str(data), "--arch", f"{src}:build", "--mode", "train"]
    args += ["--curvature", "all", "--json"]

    def run(seed):
        res = runner.invoke(app, [*args, "--seed", str(seed)])
        assert res.exit_code == 0, res.output
        doc = json.loads(res.stdout)
        assert any("--mode train with Dropout ('2')" in w for w in doc["warnings"])
        r = doc["results"]
        return [r["loss"]["value"]] + [r[k]["trace"]["value"] for k in ("fisher", "ggn")]

    first = run(0)
    assert run(0) == first and run(1) != first
