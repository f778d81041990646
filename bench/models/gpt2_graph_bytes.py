"""Bytes of GPT-2's gradient graph (8 x 128 tokens) at 1 and 2 layers, counted the old way
(every saved tensor at its full size, each time it is saved) and gmcurv's
(`gmcurv.graphcache`: each storage once, the parameters' not at all), extrapolated linearly
to the 12 layers of GPT-2 124M. ``python bench/models/gpt2_graph_bytes.py``
"""

from __future__ import annotations

import time

import torch
import transformers

from gmcurv.batch import Batch
from gmcurv.graphcache import _storage, gradient_graph
from gmcurv.objective import Objective


def graph_bytes(layers: int) -> dict[str, float]:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(use_cache=False, n_layer=layers)
    model = transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation="eager").eval()
    ids = torch.randint(0, 50257, (8, 128), generator=torch.Generator().manual_seed(0))
    obj = Objective.build(model, "next_token")
    seen = {p.untyped_storage().data_ptr() for p in obj.params.values()}
    naive, dedup = [0], [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        naive[0] += t.numel() * t.element_size()
        key, nbytes = _storage(t)
        if key not in seen:
            seen.add(key)
            dedup[0] += nbytes
        return t

    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gradient_graph(obj, Batch(ids, None, 0), list(obj.params), None)
    return {"naive_gb": naive[0] / 1e9, "dedup_gb": dedup[0] / 1e9, "s": time.perf_counter() - t0}


def main() -> None:
    torch.set_num_threads(2)
    one, two = graph_bytes(1), graph_bytes(2)
    print(1, one)
    print(2, two)
    print("12 layers:", {k: one[k] + 11 * (two[k] - one[k]) for k in ("naive_gb", "dedup_gb")})


if __name__ == "__main__":
    main()
