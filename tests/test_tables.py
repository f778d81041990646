"""Tables at 80 columns (CI logs): layer names never cut in the middle (shortened from the
left, unique), numbers to the digits that tell rows apart. Snapshots of the rendered text."""

from __future__ import annotations

from io import StringIO

from gmcurv.cli.render import fmt_column, shorten_names
from gmcurv.results import DataInfo, ModelInfo, Report


def _est(value, stderr=None, method="exact"):
    return {"value": value, "stderr": stderr, "n_samples": 64, "method": method,
            "converged": True}  # fmt: skip


def _report(command: str, results: dict) -> Report:
    model = ModelInfo("gpt.safetensors", "0" * 64, 124_439_808, "gpt2", "config.json", "next_token")
    return Report(command, {}, 0, "cpu", "float32", model, DataInfo("d/", 64), results)


def _text(render, report) -> str:
    from rich.console import Console

    buf = StringIO()
    render(report, Console(width=80, file=buf, color_system=None))
    lines = buf.getvalue().splitlines()
    return "\n".join(line.rstrip() for line in lines if not line.startswith("cpu, ")) + "\n"


def test_shorten_names_keeps_the_tail_and_uniqueness():
    names = ["transformer.h.11.attn.c_attn", "transformer.h.11.attn.c_proj", "lm_head"]
    assert shorten_names(names, 20) == ["…h.11.attn.c_attn", "…h.11.attn.c_proj", "lm_head"]
    # tails that would collide stay whole
    twins = ["encoder.layer.0.out", "decoder.layer.0.out"]
    assert shorten_names(twins, 12) == twins
    assert fmt_column([2.30001, 2.30004, 1.0]) == ["2.30001", "2.30004", "1"]


TRACE = """\
gmcurv trace · model gpt.safetensors (gpt2, 124,439,808 params) · data d/ (N=64)
mean loss 3.211
Fisher (empirical): trace 1234
┏━━━━━━━━━━━━━━━━━━━━━━━━━━━━┳━━━━━━━━┳━━━━━━━━━━━━┳━━━━━━━━┳━━━━━━━┳━━━━━━━━┓
┃ layer                      ┃   kind ┃     params ┃  trace ┃ share ┃  λ_max ┃
┡━━━━━━━━━━━━━━━━━━━━━━━━━━━━╇━━━━━━━━╇━━━━━━━━━━━━╇━━━━━━━━╇━━━━━━━╇━━━━━━━━┩
│ …h.11.attn.c_attn          │ linear │  1,771,776 │ 100.02 │  8.1% │  3.001 │
│ …h.11.attn.c_proj          │ linear │    590,592 │ 100.01 │  8.1% │ 3.0004 │
│ …transformer.h.11.mlp.c_fc │ linear │  2,362,368 │  12.34 │  1.0% │  1.234 │
│ model.transformer.wte      │  embed │ 38,597,376 │   1022 │ 82.8% │ 3.0001 │
└────────────────────────────┴────────┴────────────┴────────┴───────┴────────┘
top-1 eigenvalues (gram): 12.5
N=64, method exact
"""


def test_trace_table_snapshot_at_80_columns():
    from gmcurv.cli.trace import render

    layers = {
        "model.transformer.h.11.attn.c_attn": (1_771_776, 100.02, 3.001),
        "model.transformer.h.11.attn.c_proj": (590_592, 100.01, 3.0004),
        "model.transformer.h.11.mlp.c_fc": (2_362_368, 12.34, 1.234),
        "model.transformer.wte": (38_597_376, 1022.0, 3.0001),
    }
    per = {
        name: {"trace": _est(t), "n_params": n, "kind": "embed" if "wte" in name else "linear",
               "eigenvalues": [_est(lam)]}
        for name, (n, t, lam) in layers.items()
    }  # fmt: skip
    results = {
        "loss": _est(3.211),
        "fisher": {"type": "empirical", "n_params": 1, "trace": _est(1234.0),
                   "eigenvalues": [{**_est(12.5), "method": "gram"}], "rank": None,
                   "per_layer": per},
    }  # fmt: skip
    text = _text(render, _report("trace", results))
    assert text == TRACE, text


SWEEP = """\
After pruning (global scope, no retraining, 1,000 examples):
loss; unpruned 2.3
┏━━━━━━━━━━━━┳━━━━━━━━━┳━━━━━━━━┓
┃ criterion  ┃     10% ┃    50% ┃
┡━━━━━━━━━━━━╇━━━━━━━━━╇━━━━━━━━┩
│ magnitude  │ 2.30012 │ 2.3041 │
│ obd        │ 2.30011 │ 2.3102 │
│ obs+update │  2.3001 │    2.3 │
└────────────┴─────────┴────────┘
accuracy; unpruned 14.80%
┏━━━━━━━━━━━━┳━━━━━━━━┳━━━━━━━━┓
┃ criterion  ┃    10% ┃    50% ┃
┡━━━━━━━━━━━━╇━━━━━━━━╇━━━━━━━━┩
│ magnitude  │ 14.80% │ 14.70% │
│ obd        │ 14.80% │ 15.10% │
│ obs+update │ 14.85% │ 15.20% │
└────────────┴────────┴────────┘
"""


def test_saliency_sweep_snapshot_at_80_columns():
    from gmcurv.cli.saliency import _render_sweep

    def pt(f, loss, acc):
        return {"fraction": f, "n_removed": 1, "loss": _est(loss), "accuracy": _est(acc)}

    res = {
        "scope": "global",
        "baseline": {"loss": _est(2.3), "accuracy": _est(0.148), "n": 1000},
        "sweep": {
            "magnitude": [pt(0.1, 2.30012, 0.148), pt(0.5, 2.3041, 0.147)],
            "obd": [pt(0.1, 2.30011, 0.148), pt(0.5, 2.3102, 0.151)],
            "obs+update": [pt(0.1, 2.3001, 0.1485), pt(0.5, 2.3, 0.152)],
        },
    }
    from rich.console import Console

    buf = StringIO()
    _render_sweep(res, Console(width=80, file=buf, color_system=None))
    lines = [line.rstrip() for line in buf.getvalue().splitlines()]
    assert lines[-1].startswith("obs+update: the OBS masks")  # a note, soft-wrapped
    text = "\n".join(lines[:-1]) + "\n"
    assert text == SWEEP, text


def test_pruned_output_shows_the_prediction_beside_the_measurement():
    from rich.console import Console

    from gmcurv.cli.saliency import _render_increase

    p = {
        "before": {"loss": _est(0.10)},
        "after": {"loss": _est(0.60)},
        "predicted_increase": _est(0.002, method="quadratic model ½δwᵀ(F+εI)δw"),
    }
    buf = StringIO()
    _render_increase(p, Console(width=80, file=buf, color_system=None))
    text = " ".join(buf.getvalue().split())
    assert "measured 0.5 · predicted 0.002 (quadratic model" in text
    assert "measured/predicted 250x" in text
    assert "second-order model at the current weights" in text and "known limit" in text
