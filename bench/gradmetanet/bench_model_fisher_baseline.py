"""Head v1.2's new input as an estimate on its own: the model-Fisher diagonal on the same 128
examples (`gmcurv.gradmetanet.modelfisher`), raw and rescaled to the plug-in's layer totals
(what the head is given), against the plug-in, on `bench_tasks.py`'s held-out sets
(Fisher-diagonal NMAE against the full-data float64 empirical Fisher). Shows that the head
adds to its inputs rather than passing one through.

    python bench/gradmetanet/bench_model_fisher_baseline.py --tasks-zoo DIR --v1-zoo DIR

Writes ``bench/gradmetanet/model_fisher_baseline.json``.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
from gmcurv.gradmetanet.modelfisher import model_fisher_diagonal, rescaled  # noqa: E402
from gmcurv.gradmetanet.zoo import iter_zoo  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--tasks-zoo", type=Path, required=True)
ap.add_argument("--v1-zoo", type=Path, required=True)
args = ap.parse_args()
torch.set_num_threads(1)
TASKS, ZOO = args.tasks_zoo, args.v1_zoo
test = list(iter_zoo(TASKS, ("test-task",))) + list(iter_zoo(ZOO, ("test-dataset", "test-arch")))
acc = {}
for zm in test:
    s = zm.spec
    key = s.dataset if s.split in ("test-task", "test-dataset") else s.split
    depth = len(s.widths) + 1
    for d in zm.draws:
        gs = d.gs
        mw, mb = model_fisher_diagonal(gs)
        e = {"plug": [0.0, 0.0], "mf_raw": [0.0, 0.0], "mf_rescaled": [0.0, 0.0]}
        for l in range(depth):
            x, dl, bb = gs.x[l].double(), gs.delta[l].double(), gs.bias[l]
            pw = torch.einsum("nj,ni->ji", dl.pow(2), x.pow(2)) / gs.b
            pb = dl.pow(2).mean(0)
            parts = [(f"fc{l}.weight", pw, mw[l].double())]
            if bb is not None:
                parts.append((f"fc{l}.bias", pb, mb[l].double()))
            for name, p, m in parts:
                t = zm.targets.get(f"fisher_diag.{name}")
                if t is None:
                    continue
                t = t.double()
                tot = float(t.abs().sum())
                for k, est in (("plug", p), ("mf_raw", m), ("mf_rescaled", rescaled(m, p))):
                    e[k][0] += float((est - t).abs().sum())
                    e[k][1] += tot
        for k, (a, b) in e.items():
            acc.setdefault(key, {}).setdefault(k, []).append(a / b)
out = {}
for key, v in acc.items():
    out[key] = {k: sum(x) / len(x) for k, x in v.items()} | {"n_draws": len(v["plug"])}
out["load"] = list(os.getloadavg())
(HERE / "model_fisher_baseline.json").write_text(json.dumps(out, indent=1) + "\n")
print(json.dumps(out, indent=1))
