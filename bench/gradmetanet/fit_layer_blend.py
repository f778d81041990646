"""Head v1.2: fit the per-layer-role Fisher-diagonal blend on top of the frozen head v1.

The blend (`gmcurv.gradmetanet.blend`) maps, per layer role (first / hidden / output;
weights and biases), the v1 log-ratio and the structured estimators the input holds (the
model-Fisher diagonal rescaled to the plug-in's layer total, the shrinkage towards K-FAC,
K-FAC, the plug-in's relative standard error) to a new Fisher-diagonal log-ratio: 14
coefficients per role. Fitted with v1 frozen, full batch (Adam), on the card's metric: the
mean per-draw Fisher-diagonal NMAE, plus ``l2 ||θ - θ_v1||²``.

Training models: the ``tasks`` zoo's split ``train`` and the v1 zoo's split ``val``;
``l2`` is chosen on the ``tasks`` zoo's ``val`` split. Never read: ``test-task``
(spiral10, hastie10), ``test-dataset`` (digits), ``test-arch``, ``calib``.

Then both heads are evaluated side by side with `bench_tasks.py` and the rule stated before
fitting (`LAYER_BLEND_RULE.md`) decides: ship only if every held-out set's NMAE is at or
below v1's and spiral10's is strictly below. Writes ``bench/gradmetanet/layer_blend.json``;
never replaces the shipped weights (shipping: copy the candidate over
``sample_models/gradmetanet_head.safetensors``, then ``bench_tasks.py --record``).

Run::

    python bench/gradmetanet/fit_layer_blend.py --tasks-zoo DIR --v1-zoo DIR [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from gmcurv.gradmetanet.blend import (  # noqa: E402
    ROLES,
    bias_terms,
    layer_role,
    weight_terms,
)
from gmcurv.gradmetanet.head import head_metadata  # noqa: E402
from gmcurv.gradmetanet.model import GradMetaNet, HeadConfig, HeadOutput, log_prediction  # noqa: E402
from gmcurv.gradmetanet.pretrained import load_head, save_head  # noqa: E402
from gmcurv.gradmetanet.train import make_item  # noqa: E402
from gmcurv.gradmetanet.zoo import iter_zoo  # noqa: E402
from gmcurv.io.fileio import atomic_write_text  # noqa: E402

OUT = HERE / "layer_blend.json"
HELD_OUT = ("spiral10", "hastie10", "digits", "test-arch")
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


class Entries:
    """Every Fisher-diagonal entry of a list of models' draws, by (role, weight|bias):
    ``log(plug + floor)``, the blend terms ``φ``, the truth times the unit, the unit, and
    the draw index; ``den[d] = Σ_q unit |truth|`` per draw (normalised units, as
    `train.loss_parts`)."""

    def __init__(self) -> None:
        self.parts: dict[tuple[int, str], list[list[Tensor]]] = {}
        self.den: list[Tensor] = []
        self.n = 0

    def add(self, head: GradMetaNet, zm) -> None:
        it = make_item(zm)
        with torch.no_grad():
            out = head(it.inp)
        zero = HeadOutput(
            tuple(torch.zeros_like(w) for w in out.w),
            tuple(None if b is None else torch.zeros_like(b) for b in out.b),
            out.scalars,
        )
        base = log_prediction(it.inp, zero)
        L, R = it.inp.depth, it.inp.plug_scalars.shape[0]
        draws = (self.n + torch.arange(R)).double()
        den = torch.zeros(R, dtype=torch.float64)
        for l in range(L):
            k = layer_role(l, L)
            t = it.t_w[l][..., 0].double()
            u = it.inp.unit_w[l].double()[:, None, None].expand_as(t)
            phi = weight_terms(out.w[l][..., 0].double(), it.inp.edges[l].double())
            self._put((k, "w"), base.param[l][..., 0].double(), phi, t, u, draws[:, None, None])
            den += (t.abs() * u).sum((-2, -1))
            tb, eb = it.t_b[l], it.inp.bias_edges[l]
            if tb is None or eb is None or base.bias[l] is None:
                continue
            tb = tb[..., 0].double()
            ub = it.inp.unit_b[l].double()[:, None].expand_as(tb)
            phi_b = bias_terms(out.b[l][..., 0].double(), eb.double())
            self._put((k, "b"), base.bias[l][..., 0].double(), phi_b, tb, ub, draws[:, None])
            den += (tb.abs() * ub).sum(-1)
        self.den.append(den)
        self.n += R

    def _put(self, key, lb: Tensor, phi: Tensor, t: Tensor, u: Tensor, d: Tensor) -> None:
        lst = self.parts.setdefault(key, [[], [], [], [], []])
        for acc, v in zip(lst, (lb, phi, t, u, d.expand_as(t)), strict=True):
            acc.append(v.reshape(-1, v.shape[-1]) if v is phi else v.reshape(-1))

    def freeze(self) -> Entries:
        self.flat = {k: [torch.cat(v) for v in lst] for k, lst in self.parts.items()}
        self.flat = {k: (*v[:4], v[4].long()) for k, v in self.flat.items()}
        self.den_t = torch.cat(self.den)
        del self.parts
        return self

    def nmae(self, theta_w: Tensor, theta_b: Tensor) -> Tensor:
        """Per-draw NMAE ``[n]`` under the blend ``θ``."""
        err = torch.zeros(self.n, dtype=torch.float64)
        for (k, kind), (lb, phi, t, u, d) in self.flat.items():
            r = phi @ (theta_w[k] if kind == "w" else theta_b[k]).to(phi.dtype)
            err = err.index_add(0, d, (torch.exp(lb + r) - t).abs() * u)
        return err / self.den_t


def collect(head: GradMetaNet, zoo: Path, splits: tuple[str, ...]) -> Entries:
    e = Entries()
    for zm in iter_zoo(zoo, splits):
        e.add(head, zm)
    return e.freeze()


def fit(
    nmae: Callable[[Tensor, Tensor], Tensor], init: tuple[Tensor, Tensor], l2: float, steps: int
) -> tuple[Tensor, Tensor]:
    """Full-batch Adam on ``mean nmae(θ) + l2 ||θ - init||²``."""
    tw, tb = (p.detach().double().clone().requires_grad_(True) for p in init)
    w0, b0 = (p.detach().double().clone() for p in init)
    opt = torch.optim.Adam([tw, tb], lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        loss = nmae(tw, tb).mean() + l2 * ((tw - w0).pow(2).sum() + (tb - b0).pow(2).sum())
        loss.backward()
        opt.step()
    return tw.detach(), tb.detach()


def decide(v1: dict, cand: dict) -> dict:
    """`LAYER_BLEND_RULE.md` on two `bench_tasks.py` results."""
    rows = {}
    for key in HELD_OUT:
        a, b = v1["tasks"][key]["fisher_diag"], cand["tasks"][key]["fisher_diag"]
        rows[key] = {
            "plug": a["plug"],
            "v1": a["head"],
            "candidate": b["head"],
            "v1_change": a["change"],
            "candidate_change": b["change"],
            "candidate_vs_v1": b["head"] / a["head"] - 1.0,
            "v1_wins": a["head_better_share"],
            "candidate_wins": b["head_better_share"],
            "models": a.get("n_models", v1["tasks"][key].get("n_models")),
        }
    for key in ("calib", "all"):
        if key in v1["tasks"] and key in cand["tasks"]:
            a, b = v1["tasks"][key]["fisher_diag"], cand["tasks"][key]["fisher_diag"]
            rows[key] = {
                "plug": a["plug"], "v1": a["head"], "candidate": b["head"],
                "v1_change": a["change"], "candidate_change": b["change"],
                "candidate_vs_v1": b["head"] / a["head"] - 1.0,
                "v1_wins": a["head_better_share"], "candidate_wins": b["head_better_share"],
                "rule": False,
            }  # fmt: skip
    better = rows["spiral10"]["candidate_vs_v1"] < 0
    worse = [k for k in HELD_OUT if rows[k]["candidate_vs_v1"] > 0]
    return {
        "rows": rows,
        "spiral10_improves": better,
        "regressions": worse,
        "ship": better and not worse,
        "rule": "every held-out set's NMAE at or below v1's and spiral10's strictly below "
        "(LAYER_BLEND_RULE.md, committed before fitting)",
    }


def _run(args: list[str]) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks-zoo", type=Path, required=True)
    ap.add_argument("--v1-zoo", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--work", type=Path, default=Path("layer_blend_work"))
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--skip-eval", action="store_true", help="fit and save only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    v1 = load_head(None)
    cfg = HeadConfig(**{**v1.meta["config"], "blend": 1})
    model = GradMetaNet(cfg)
    missing, unexpected = model.load_state_dict(v1.model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("blend.") for k in missing), (missing, unexpected)
    model.eval()
    train = collect(v1.model, args.tasks_zoo, ("train",))
    n_tasks = train.n
    train_v1 = collect(v1.model, args.v1_zoo, ("val",))
    val = collect(v1.model, args.tasks_zoo, ("val",))
    t_collect = time.perf_counter() - t0
    print(f"collected {n_tasks} + {train_v1.n} training draws, {val.n} val draws "
          f"in {t_collect:.0f} s", flush=True)  # fmt: skip
    init = (model.blend.theta_w.detach(), model.blend.theta_b.detach())

    def train_nmae(tw: Tensor, tb: Tensor) -> Tensor:
        return torch.cat([train.nmae(tw, tb), train_v1.nmae(tw, tb)])

    grid = []
    with torch.no_grad():
        v1_val = float(val.nmae(*init).mean())
        plug_val = float(val.nmae(torch.zeros_like(init[0]), torch.zeros_like(init[1])).mean())
    best = None
    for l2 in L2_GRID:
        tw, tb = fit(train_nmae, init, l2, args.steps)
        with torch.no_grad():
            v = float(val.nmae(tw, tb).mean())
            tr = float(train_nmae(tw, tb).mean())
        grid.append({"l2": l2, "val_nmae": v, "train_nmae": tr})
        print(f"l2 {l2:g}: train {tr:.4f} val {v:.4f} (v1 {v1_val:.4f}, plug {plug_val:.4f})",
              flush=True)  # fmt: skip
        if best is None or v < best[0]:
            best = (v, l2, tw, tb)
    assert best is not None
    _, l2, tw, tb = best
    with torch.no_grad():
        model.blend.theta_w.copy_(tw.float())
        model.blend.theta_b.copy_(tb.float())
    training = dict(v1.meta["training"])
    training["blend"] = {
        "command": "python bench/gradmetanet/fit_layer_blend.py --tasks-zoo DIR --v1-zoo DIR"
        f" --steps {args.steps}",
        "train": f"tasks zoo split train + v1 zoo split val (draws: {n_tasks} + {train_v1.n})",
        "selection": f"tasks zoo split val ({val.n} draws), l2 grid {list(L2_GRID)}",
        "l2": l2,
        "grid": grid,
        "val_nmae": {"plug": plug_val, "v1": v1_val, "v1.2": best[0]},
        "roles": list(ROLES),
        "theta_w": tw.tolist(),
        "theta_b": tb.tolist(),
    }
    meta = head_metadata(cfg, training, v1.supported, {}, version="1.2")
    cand = args.work / "head_v1_2.safetensors"
    save_head(cand, model, meta)
    print("saved", cand, flush=True)
    res = {
        "command": training["blend"]["command"],
        "date": time.strftime("%Y-%m-%d"),
        "load": list(os.getloadavg()),
        "collect_seconds": t_collect,
        "fit": training["blend"],
    }
    if not args.skip_eval:
        zoos = ["--tasks-zoo", str(args.tasks_zoo), "--v1-zoo", str(args.v1_zoo)]
        _run([str(HERE / "bench_tasks.py"), *zoos, "--out", str(args.work / "v1.json")])
        _run([str(HERE / "bench_tasks.py"), *zoos, "--head", str(cand),
              "--out", str(args.work / "candidate.json")])  # fmt: skip
        a = json.loads((args.work / "v1.json").read_text())
        b = json.loads((args.work / "candidate.json").read_text())
        res.update(decide(a, b))
        for key, r in res["rows"].items():
            print(
                f"{key:10s} plug {r['plug']:.4f}  v1 {r['v1']:.4f} ({100 * r['v1_change']:+.1f} %,"
                f" wins {100 * r['v1_wins']:.0f} %)  v1.2 {r['candidate']:.4f} "
                f"({100 * r['candidate_change']:+.1f} %, wins {100 * r['candidate_wins']:.0f} %)"
            )
        print("ship" if res["ship"] else "do not ship", res["regressions"])
    res["seconds"] = time.perf_counter() - t0
    atomic_write_text(args.out, json.dumps(res, indent=1, allow_nan=True))
    print("->", args.out, f"{res['seconds']:.0f} s")


if __name__ == "__main__":
    main()
