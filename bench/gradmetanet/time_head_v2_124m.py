"""Head v2's time at GPT-2 small (124M, random init, 8 x 128 tokens) over one backward.

    PYTHONPATH=. python bench/gradmetanet/time_head_v2_124m.py \
        --out bench/gradmetanet/head_v2_124m.json

Interleaved in one process, float32, one thread (the machine is shared): ``reps`` times
(a) one plain forward + backward of the mean next-token loss (the unit of the issue's
target, "the time of one backward" taken as forward + backward, the cheapest thing that
yields a gradient), (b) head v2 end to end: Monte Carlo capture of the per-token factors,
grouping and features (`tfeatures.extract`, `HeadV2Input.from_tset`), the network; (c)
the shipped λ_max correction (`ttop`): the same capture and grouping, then `tset_features`
(per-sequence and token Gram eigenvalues) and the correction — ``top_total``, whose median
ratio to (a) is ``top_over_backward_median``. The parts are timed separately. Nothing is
downloaded: the config is transformers' default ``GPT2Config()`` with random weights.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import time
from pathlib import Path

import torch

from gmcurv.batch import Batch
from gmcurv.capture import Capturer
from gmcurv.gradmetanet.tfeatures import predicted_tokens, tset_from_gradients
from gmcurv.gradmetanet.tlayers import HeadV2, HeadV2Config, HeadV2Input
from gmcurv.gradmetanet.ttop import tset_features
from gmcurv.gradmetanet.ttrain import load_top_correction
from gmcurv.objective import Objective


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/gradmetanet/head_v2_124m.json")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--b", type=int, default=8)
    ap.add_argument("--t", type=int, default=128)
    ap.add_argument("--note", default="")
    ap.add_argument("--layers", type=int, default=12, help="n_layer (12 = GPT-2 small)")
    args = ap.parse_args(argv)
    import transformers as tf

    torch.set_num_threads(1)
    torch.manual_seed(0)
    with contextlib.redirect_stderr(io.StringIO()):
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=args.layers)).eval()
    model.config._attn_implementation = "eager"
    obj = Objective.build(model, "next_token")
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 50257, (args.b, args.t), generator=torch.Generator().manual_seed(1))
    batch = Batch(ids, None, 0)
    head = HeadV2(HeadV2Config(channels=12, blocks=1))
    corr, _ = load_top_correction()
    rows = []
    load0 = os.getloadavg()
    for _ in range(args.reps):
        t0 = time.perf_counter()
        loss = obj.per_example_loss(batch).mean()
        loss.backward()
        t_bwd = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        dg = Capturer(obj, "mc", 1, 0, check=False)(batch)  # = tfeatures.extract
        tc = time.perf_counter()
        s = tset_from_gradients(dg, model)
        s.tokens = predicted_tokens(batch)
        del dg
        tg = time.perf_counter()
        corr.predict(s.seq_top, tset_features(s))  # also caches λ_max(Ĝ) for the network
        t_top = time.perf_counter() - tg
        t1 = time.perf_counter()
        inp = HeadV2Input.from_tset(s)
        t2 = time.perf_counter()
        with torch.no_grad():
            head(inp)
        t3 = time.perf_counter()
        rows.append(
            {
                "backward": t_bwd,
                "capture": tc - t0,
                "group": tg - tc,
                "capture_and_group": tg - t0,
                "features": t2 - t1 + t_top,
                "network": t3 - t2,
                "head_total": t3 - t0,
                "top_correction": t_top,
                "top_total": tg - t0 + t_top,
            }
        )
    ratio = statistics.median(r["head_total"] / r["backward"] for r in rows)
    out = {
        "model": "transformers GPT2Config() random init"
        + ("" if args.layers == 12 else f", n_layer={args.layers}"),
        "n_params": n_params,
        "tokens": [args.b, args.t],
        "dtype": "float32",
        "threads": 1,
        "loadavg": os.getloadavg(),
        "loadavg_start": load0,
        "rows": rows,
        "head_over_backward_median": ratio,
        "top_over_backward_median": statistics.median(r["top_total"] / r["backward"] for r in rows),
        "target": "< 1.5",
        "met": ratio < 1.5,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M"),
    }
    if args.note:
        out["note"] = args.note
    Path(args.out).write_text(json.dumps(out, indent=1))
    keys = ("head_over_backward_median", "top_over_backward_median", "met")
    print(json.dumps({k: out[k] for k in keys}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
