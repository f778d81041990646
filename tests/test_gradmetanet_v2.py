"""Head v2: equivariance to a transformer's symmetries (float64, end to end through the
capture), and the feature extractor on transformers' own GPT-2 / Llama checkpoints."""

from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch

from gmcurv.batch import Batch
from gmcurv.gradmetanet.tfeatures import ROLES, extract, layer_role
from gmcurv.gradmetanet.tlayers import HeadV2, HeadV2Input
from gmcurv.gradmetanet.tlm import TinyLM, init_lm, make_task
from gmcurv.objective import Objective

V, D, L, H, T, B = 11, 8, 2, 2, 6, 5
E = D // H


def _model(seed=0):
    m = TinyLM(V, D, L, H, T).double()
    init_lm(m, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial biases and norms
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


def _head():
    h = HeadV2(seed=3).double()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # a fresh head's scalar layer is zero: make the outputs non-trivial
        for p in h.rho[-1].parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return h


def _run(model, ids, fisher="empirical"):
    obj = Objective.build(model, "next_token")
    inp = HeadV2Input.from_tset(extract(obj, Batch(ids, None, 0), fisher))
    with torch.no_grad():
        head = _head()
        out = head(inp)
    return inp, out, head.neurons_by_side(out, inp)


def _perms(kind: str, gen: torch.Generator) -> dict:
    """Random permutations of one kind (``new index j holds old index perm[j]``)."""
    ident = {"res": torch.arange(D), "mlp": [torch.arange(4 * D)] * L}
    ident["qkv"] = [torch.arange(3 * D)] * L
    ident["v"] = [torch.arange(D)] * L
    ident["seq"] = torch.arange(B)
    p = dict(ident)
    if kind in ("residual", "composite"):
        p["res"] = torch.randperm(D, generator=gen)
    if kind in ("mlp", "composite"):
        p["mlp"] = [torch.randperm(4 * D, generator=gen) for _ in range(L)]
    if kind in ("heads", "headdims", "composite"):
        qkv, vs = [], []
        for _ in range(L):
            pi = torch.randperm(H, generator=gen) if kind != "headdims" else torch.arange(H)
            same = kind == "heads"
            sqk = [torch.arange(E) if same else torch.randperm(E, generator=gen) for _ in range(H)]
            sv = [torch.arange(E) if same else torch.randperm(E, generator=gen) for _ in range(H)]
            q = torch.cat([int(pi[h]) * E + sqk[h] for h in range(H)])
            v = torch.cat([int(pi[h]) * E + sv[h] for h in range(H)])
            qkv.append(torch.cat([q, D + q, 2 * D + v]))
            vs.append(v)
        p["qkv"], p["v"] = qkv, vs
    if kind in ("sequences", "composite"):
        p["seq"] = torch.randperm(B, generator=gen)
    return p


def _permuted(model, p):
    m = TinyLM(V, D, L, H, T).double()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    r = p["res"]
    for k in list(sd):
        w = sd[k]
        if k in ("tok.weight", "pos.weight"):
            sd[k] = w[:, r]
        elif ".ln" in k or k.startswith("ln."):
            sd[k] = w[r]
        elif k.endswith(("qkv.weight", "fc.weight")) or k == "head.weight":
            sd[k] = w[:, r]
        elif k.endswith(("proj.weight", "out.weight", "proj.bias", "out.bias")):
            sd[k] = w[r]
    for layer in range(L):
        b = f"blocks.{layer}."
        q, v, mm = p["qkv"][layer], p["v"][layer], p["mlp"][layer]
        sd[b + "qkv.weight"], sd[b + "qkv.bias"] = sd[b + "qkv.weight"][q], sd[b + "qkv.bias"][q]
        sd[b + "proj.weight"] = sd[b + "proj.weight"][:, v]
        sd[b + "fc.weight"], sd[b + "fc.bias"] = sd[b + "fc.weight"][mm], sd[b + "fc.bias"][mm]
        sd[b + "out.weight"] = sd[b + "out.weight"][:, mm]
    m.load_state_dict(sd)
    return m


def _side_perm(name: str, side: int, p) -> torch.Tensor:
    role = layer_role(name)
    blk = int(name.split(".")[1]) if name.startswith("blocks.") else -1
    if (role, side) in (
        ("attn_in", 0),
        ("mlp_in", 0),
        ("head", 0),
        ("attn_out", 1),
        ("mlp_out", 1),
    ):
        return p["res"]
    if (role, side) == ("attn_in", 1):
        return p["qkv"][blk]
    if (role, side) == ("attn_out", 0):
        return p["v"][blk]
    if role in ("mlp_in", "mlp_out"):
        return p["mlp"][blk]
    return torch.arange(V)  # LM head outputs: vocabulary, not permuted


@pytest.mark.parametrize("kind", ["residual", "mlp", "heads", "headdims", "sequences", "composite"])
def test_head_v2_is_equivariant(kind):
    model = _model()
    ids, _ = make_task("count", B, T, seed=0)
    ids = ids % V
    inp, out, z1 = _run(model, ids)
    p = _perms(kind, torch.Generator().manual_seed(7))
    pm = _permuted(model, p)
    with torch.no_grad():  # the permuted model is the same function
        torch.testing.assert_close(pm(ids), model(ids), rtol=0, atol=1e-12)
    inp2, out2, z2s = _run(pm, ids[p["seq"]])
    if kind != "sequences":  # MC labels are drawn per (seed, position): same for the same function
        _, out_mc, _ = _run(model, ids, "mc")
        _, out2_mc, _ = _run(pm, ids, "mc")
        torch.testing.assert_close(out2_mc.r_top, out_mc.r_top, rtol=1e-8, atol=1e-10)
    for a, b in ((out.r_trace, out2.r_trace), (out.r_top, out2.r_top)):
        assert float(a) != 0.0
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10)
    assert inp2.plug_trace == pytest.approx(inp.plug_trace, rel=1e-10)
    names = ["blocks.0.qkv", "blocks.0.proj", "blocks.0.fc", "blocks.0.out"]
    names += [n.replace("0", "1") for n in names] + ["head"]
    moved = 0
    for k, name in enumerate(names):
        for side in (0, 1):
            z, z2 = z1[2 * k + side], z2s[2 * k + side]
            perm = _side_perm(name, side, p)
            torch.testing.assert_close(z2, z[perm], rtol=1e-8, atol=1e-10)
            moved += int(not torch.equal(perm, torch.arange(len(perm))))
    assert moved > 0 or kind == "sequences"


def _hf(family: str, tmp_path):
    import transformers as tf

    from gmcurv.io.checkpoint import load_model

    torch.manual_seed(0)
    if family == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=V, n_positions=T, n_embd=D, n_layer=L, n_head=H, bos_token_id=0,
            eos_token_id=0,
        )  # fmt: skip
        model = tf.GPT2LMHeadModel(cfg)
    else:
        cfg = tf.LlamaConfig(
            vocab_size=V, hidden_size=D, intermediate_size=12, num_hidden_layers=L,
            num_attention_heads=H, num_key_value_heads=1, max_position_embeddings=T,
        )  # fmt: skip
        model = tf.LlamaForCausalLM(cfg)
    with contextlib.redirect_stderr(io.StringIO()):
        model.save_pretrained(str(tmp_path / family))
    with warnings.catch_warnings():  # GPT-2: "eval mode: Dropout is off"
        warnings.simplefilter("ignore")
        lm = load_model(tmp_path / family, dtype=torch.float64)
        return Objective.build(lm.model, lm.loss)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_extractor_reads_transformers_checkpoints(family, tmp_path):
    obj = _hf(family, tmp_path)
    ids, _ = make_task("count", B, T, seed=1)
    ids = ids % V
    s = extract(obj, Batch(ids, None, 0), "empirical")
    assert {layer.role for layer in s.layers} == set(ROLES)
    per_block = 4 if family == "gpt2" else 7  # c_attn c_proj c_fc c_proj | q k v o gate up down
    assert len(s.layers) == L * per_block + 1 and s.d_model == D and s.n_blocks == L
    # the plug-in from the grouped factors is the engine's empirical Fisher of the set
    from gmcurv.capture import capture
    from gmcurv.fisher import fisher_trace

    want = fisher_trace(capture(obj, Batch(ids, None, 0)))
    assert s.seq_trace / s.tokens == pytest.approx(want, rel=1e-10)
    inp = HeadV2Input.from_tset(s)
    with torch.no_grad():
        out = _head()(inp)
        perm = torch.randperm(B, generator=torch.Generator().manual_seed(2))
        s2 = extract(obj, Batch(ids[perm], None, 0), "empirical")
        out2 = _head()(HeadV2Input.from_tset(s2))
        mc = HeadV2Input.from_tset(extract(obj, Batch(ids, None, 0)))  # the head's default
        assert torch.isfinite(_head()(mc).r_trace) and mc.plug_trace > 0
    assert torch.isfinite(out.trace(inp)) and torch.isfinite(out.top(inp))
    torch.testing.assert_close(out2.r_top, out.r_top, rtol=1e-8, atol=1e-10)
    if family == "llama":  # grouped-query attention: k/v have one head, q has two
        kv = next(la for la in s.layers if la.name.endswith("k_proj"))
        assert kv.d.values.shape[-1] == D // H and int(kv.d.heads.max()) == 0


def _summary(head, base, cov=0.8):
    q = {"head": {"mean": head, "median": head}, "coverage_80": cov}
    for b in ("plugin", "mc_equal_time", "hutch_lanczos_equal_time", "plugin_seq"):
        q[b] = {"mean": base, "median": base, "head_win_rate": 0.9 if head < base else 0.2,
                "head_gain_mean": 1 - head / base}  # fmt: skip
    return q


def test_card_v2_section_states_targets_met_and_missed():
    from gmcurv.gradmetanet.card import V2_END, V2_START, update_v2

    res = {
        "zoo": {
            "groups": 3,
            "train_groups": 2,
            "train_items": 48,
            "cpu_seconds": 600,
            "wall_seconds": 1800,
        },
        "summary": {
            "all-test": {
                "n": 10,
                "models": 5,
                "hvps_equal_time": 1,
                "trace": _summary(0.5, 1.0),
                "top": _summary(0.9, 0.8, 0.5),
            },
        },
    }
    timing = {"head_over_backward_median": 2.0, "rows": [{"head_total": 2.0, "backward": 1.0}],
              "loadavg": [10.0]}  # fmt: skip
    card = update_v2("# card\n\n## Reproduce\nx\n", res, timing)
    assert V2_START in card and card.index(V2_START) < card.index("## Reproduce")
    rows = {line.split(" | ")[0]: line for line in card.splitlines() if line.startswith("| ")}
    key = "than every equal-cost baseline (and winning: lower median, win rate > 50 %)"
    assert "| met |" in rows[f"| Hessian trace: >= 25 % lower mean error {key}"]
    assert "| missed |" in rows[f"| Hessian λ_max: >= 25 % lower mean error {key}"]
    assert "| missed |" in rows["| Hessian λ_max: 80 % intervals cover 75-85 %"]
    assert (
        "| missed |" in rows["| 124M GPT-2 (random init, 8 x 128 tokens): head < 1.5x one backward"]
    )
    again = update_v2(card, res, timing)  # regenerating replaces the section in place
    assert again.count(V2_START) == 1 and again.count(V2_END) == 1


@pytest.mark.parametrize(
    ("layers", "rel"), [(("head",), 1e-9), (("qkv", "proj", "fc", "out", "head"), 0.05)]
)
def test_token_level_plug_in_is_the_ggn_with_exact_columns(tmp_path, layers, rel):
    """``(T_eff/b) Σ_{n,t} g_nt g_nt^T`` over exact C-class columns against the engine's GGN
    trace (basis vectors): exact for the LM head, within 5 % with the layers under attention
    (cross-position terms dropped; 2.6 % here)."""
    from safetensors.torch import save_file

    from gmcurv.capture import Capturer
    from gmcurv.gradmetanet.tfeatures import predicted_tokens, tset_from_gradients
    from gmcurv.io.data import load_data
    from gmcurv.operator import CurvatureOperator
    from gmcurv.stochastic import exact_trace

    model = _model()
    ids, _ = make_task("count", B, T, seed=0)
    ids = ids % V
    full = Objective.build(model, "next_token")
    lin = {k: v for k, v in full.params.items() if k.split(".")[-2] in layers}
    obj = Objective(model, full.loss, lin, full.mode, full.seed)
    batch = Batch(ids, None, 0)
    s = tset_from_gradients(Capturer(obj, "exact", 1, 0, check=False)(batch), model)
    s.tokens = predicted_tokens(batch)
    save_file({"inputs": ids}, str(tmp_path / "d.safetensors"))
    op = CurvatureOperator(obj, load_data(tmp_path / "d.safetensors"), B, kind="ggn")
    want = exact_trace(op.matvec, op.size).value
    assert float(s.other_sq.abs().sum()) == 0.0
    assert s.plug_trace == pytest.approx(want, rel=rel)


def test_learned_refuses_transformers_saying_why():
    from gmcurv.errors import UnsupportedError
    from gmcurv.gradmetanet.features import check_supported

    obj = Objective.build(_model(), "next_token")
    with pytest.raises(UnsupportedError, match="head v2") as e:
        check_supported(obj)
    assert "--method exact" in e.value.hint
