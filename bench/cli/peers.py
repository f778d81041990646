"""The peers' equivalent of a ``gmcurv`` command, as a script run in its own process.

``python bench/cli/peers.py TASK WORKLOAD`` builds the workload (`bench/workloads.py`, the
same weights and data the gmcurv checkpoint holds), pays torch's lazy imports of the first
backward and the peer library's own import as start-up (as gmcurv does: its modules are
imported before the command's timed stage), times the computation once (cold, like a
command line run) and prints ``{"compute": seconds, "value": ..., "peer": ...}`` as JSON.
Until 2026-12-01 the peer's import (BackPACK about 0.1-0.2 s, PyHessian about 15 ms) was
inside its timed compute, which flattered gmcurv's ratios on the Fisher/GGN rows.

Tasks: ``fisher`` (empirical Fisher trace: BackPACK BatchL2Grad on MLPs, torch.func
per-example gradients elsewhere), ``ggn`` (exact GGN trace: BackPACK DiagGGNExact),
``hessian100`` (Hutchinson Hessian trace with 100 probes: PyHessian, ``tol=0``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.fx.experimental.symbolic_shapes
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from workloads import build


def fisher(w) -> tuple[str, float]:
    if w.name == "W3":  # Embedding / LayerNorm / attention: BackPACK cannot, torch.func can
        from torch.func import functional_call, grad, vmap

        params = {k: p.detach() for k, p in w.model.named_parameters()}

        def loss(p, x, y):
            out = functional_call(w.model, p, (x.unsqueeze(0),))
            return nn.functional.cross_entropy(out, y.unsqueeze(0))

        g = vmap(grad(loss), in_dims=(None, 0, 0))(params, w.x, w.y)
        return "torch.func", sum(float(v.pow(2).sum()) for v in g.values()) / w.n
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    model = extend(w.model)
    lossfn = extend(nn.CrossEntropyLoss(reduction="sum"))
    with backpack(BatchL2Grad()):
        lossfn(model(w.x), w.y).backward()
    return "BackPACK BatchL2Grad", sum(float(p.batch_l2.sum()) for p in model.parameters()) / w.n


def ggn(w) -> tuple[str, float]:
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact

    model = extend(w.model)
    lossfn = extend(nn.CrossEntropyLoss())
    loss = lossfn(model(w.x), w.y)
    with backpack(DiagGGNExact()):
        loss.backward()
    return "BackPACK DiagGGNExact", float(sum(p.diag_ggn_exact.sum() for p in model.parameters()))


def hessian100(w) -> tuple[str, float]:
    """PyHessian's Hutchinson loop (``hessian.trace``'s body) for exactly 100 probes.

    ``hessian.trace(maxIter=100, tol=0.0)`` itself stops early when the running mean is
    negative (its test ``|mean - prev| / (prev + 1e-6) < tol`` has a negative denominator):
    on W2 the first sample is -0.12 and it returned after 2 products, which made its time
    look 50x faster per product."""
    from pyhessian import hessian
    from pyhessian.utils import group_product, hessian_vector_product

    torch.manual_seed(0)
    h = hessian(w.model, nn.CrossEntropyLoss(), data=(w.x, w.y), cuda=False)
    samples = []
    for _ in range(100):
        v = [torch.randint_like(p, high=2) for p in h.params]
        for v_i in v:
            v_i[v_i == 0] = -1
        hv = hessian_vector_product(h.gradsH, h.params, v)
        samples.append(group_product(hv, v).item())
    return "PyHessian trace (100 probes)", float(sum(samples) / len(samples))


TASKS = {"fisher": fisher, "ggn": ggn, "hessian100": hessian100}
IMPORTS = {  # the peer library, imported before the clock starts (start-up, as for gmcurv)
    "fisher": ["torch.func", "backpack", "backpack.extensions"],
    "ggn": ["backpack", "backpack.extensions"],
    "hessian100": ["pyhessian", "pyhessian.utils"],
}


def main() -> None:
    task, workload = sys.argv[1], sys.argv[2]
    w = build(workload)
    for name in IMPORTS[task]:
        with contextlib.suppress(ImportError):  # reported by the task itself
            importlib.import_module(name)
    t0 = time.perf_counter()
    try:
        peer, value = TASKS[task](w)
    except Exception as e:  # a peer that cannot handle the model
        print(json.dumps({"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}))
        return
    print(json.dumps({"compute": time.perf_counter() - t0, "value": value, "peer": peer}))


if __name__ == "__main__":
    main()
