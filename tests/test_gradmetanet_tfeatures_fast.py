"""Head v2's fast feature extractor against the first implementation (kept here as the
oracle): per-sequence Grams from materialised gradients, the token Gram by float64 einsum,
moments from a normalised float64 copy. Same features to float tolerance on TinyLM,
transformers' GPT-2 (tied head, Conv1D) and Llama (grouped-query attention)."""

from __future__ import annotations

import contextlib
import io
import math
import warnings

import pytest
import torch

from gmcurv.batch import Batch
from gmcurv.capture import Capturer
from gmcurv.factors import LinearFactors, SumOfSources
from gmcurv.gradmetanet import tfeatures as tfe
from gmcurv.gradmetanet.tlayers import HeadV2Input
from gmcurv.gradmetanet.tlm import TinyLM, init_lm, make_task
from gmcurv.objective import Objective

V, D, L, H, T, B = 11, 8, 2, 2, 6, 5


# ------------------------------------------------------------------ the first implementation
def _old_moments(values):
    values = values.double()
    T_ = values.shape[1]
    rms = values.pow(2).mean().sqrt().clamp_min(1e-300)
    u = values / rms
    p = torch.linspace(0.0, 1.0, T_, dtype=u.dtype)[None, :, None] if T_ > 1 else None
    u2 = u * u
    cols = [u.mean(1), u2.mean(1), u.abs().mean(1)]
    if p is None:
        cols += [torch.zeros_like(cols[0])] * 2
    else:
        cols += [(u * p).mean(1), (u2 * p).mean(1)]
    return torch.stack(cols, -1)


def _old_scale(values):
    return 0.5 * math.log(float(values.double().pow(2).mean()) + 1e-300)


def _old_token_gram(x, d, bias):
    N, C, T_, _ = d.shape
    xx = torch.einsum("nti,msi->ntms", x, x)
    if bias:
        xx = xx + 1.0
    dd = torch.einsum("ncto,mdso->nctmds", d, d)
    return (dd * xx[:, None, :, :, None, :]).reshape(N * C * T_, N * C * T_)


def _old_tset(dg, model):
    _, _, hd = tfe.head_config(model)
    layers, tok, n_params, d_model = [], None, 0, 0
    other = torch.zeros(dg.n, dtype=torch.float64)
    gram = torch.zeros(dg.n * dg.columns, dg.n * dg.columns, dtype=torch.float64)
    for blk in dg.blocks:
        sq = blk.source.sq_norms().sum(1).double()
        gram += blk.source.gram().double()
        n_params += blk.dim
        role, src = tfe.layer_role(blk.name), blk.source
        if isinstance(src, SumOfSources):
            linear = [p for p in src.parts if isinstance(p, LinearFactors)]
            if len(linear) == 1:
                role, src = "head", linear[0]
        if role is None or not isinstance(src, LinearFactors):
            other += sq
            continue
        x, dc = src.x.double(), src.delta.double()
        kg = _old_token_gram(x if src.has_weight else x[..., :0], dc, src.has_bias)
        tok = kg if tok is None else tok + kg
        d = dc[:, 0]
        kx, kd = tfe.SIDE_KINDS[role]
        hx = tfe._head_ids(x.shape[-1], hd) if kx == "headdim" else None
        hdd = tfe._head_ids(d.shape[-1], hd) if kd == "headdim" else None
        if kx == "res":
            d_model = x.shape[-1]
        layers.append(
            tfe.TLayer(
                blk.name,
                role,
                tfe.block_index(blk.name),
                tfe.TSide(x, kx, hx),
                tfe.TSide(d, kd, hdd),
                sq,
            )
        )
    n_blocks = 1 + max(la.block for la in layers)
    return tfe.TSet(
        layers, dg.losses.detach().double(), other, gram, tok, n_params, d_model, n_blocks
    )


# ------------------------------------------------------------------ models
def _tiny(dtype):
    m = TinyLM(V, D, L, H, T).to(dtype)
    init_lm(m, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g).to(dtype))
    return m


def _hf(family, dtype):
    import transformers as tf

    torch.manual_seed(0)
    with contextlib.redirect_stderr(io.StringIO()):
        if family == "gpt2":
            cfg = tf.GPT2Config(
                vocab_size=V, n_positions=T, n_embd=D, n_layer=L, n_head=H,
                bos_token_id=0, eos_token_id=0,
            )  # fmt: skip
            model = tf.GPT2LMHeadModel(cfg)
        else:
            cfg = tf.LlamaConfig(
                vocab_size=V, hidden_size=D, intermediate_size=12, num_hidden_layers=L,
                num_attention_heads=H, num_key_value_heads=1, max_position_embeddings=T,
            )  # fmt: skip
            model = tf.LlamaForCausalLM(cfg)
    model.config._attn_implementation = "eager"
    return model.to(dtype).eval()


def _objective(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Objective.build(model, "next_token")


def _close(a, b, rtol):
    torch.testing.assert_close(
        torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
        rtol=rtol, atol=rtol,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("family", "dtype", "fisher", "rtol"),
    [
        ("tiny", torch.float64, "mc", 1e-10),
        ("tiny", torch.float64, "exact", 1e-10),  # several columns
        ("tiny", torch.float32, "mc", 2e-5),
        ("gpt2", torch.float64, "mc", 1e-10),
        ("gpt2", torch.float32, "empirical", 2e-5),
        ("llama", torch.float64, "mc", 1e-10),
    ],
)
def test_fast_features_equal_the_first_implementation(family, dtype, fisher, rtol):
    model = _tiny(dtype) if family == "tiny" else _hf(family, dtype)
    obj = _objective(model)
    ids, _ = make_task("count", B, T, seed=1)
    dg = Capturer(obj, fisher, 1, 0, check=False)(Batch(ids % V, None, 0))
    new, old = tfe.tset_from_gradients(dg, model), _old_tset(dg, model)
    assert [la.name for la in new.layers] == [la.name for la in old.layers]
    for a, b in zip(new.layers, old.layers, strict=True):
        _close(a.sq_norms, b.sq_norms, rtol)
        for sa, sb in ((a.x, b.x), (a.d, b.d)):
            assert sa.kind == sb.kind
            _close(tfe.moments(sa.values), _old_moments(sb.values), rtol)
            assert tfe.side_scale(sa.values) == pytest.approx(_old_scale(sb.values), abs=rtol)
    for f in ("other_sq", "gram", "tok_gram", "losses"):
        _close(getattr(new, f), getattr(old, f), rtol)
    for f in ("plug_trace", "plug_top", "seq_trace", "seq_top"):
        assert getattr(new, f) == pytest.approx(getattr(old, f), rel=rtol)
    ni, oi = HeadV2Input.from_tset(new), HeadV2Input.from_tset(old)
    assert ni.m.dtype == torch.float64
    for f in ("m", "consts", "layer_feats", "globals"):
        _close(getattr(ni, f), getattr(oi, f), rtol)


def test_moments_of_a_zero_side_and_one_token():
    z = torch.zeros(2, 3, 4)
    assert torch.equal(tfe.moments(z), torch.zeros(2, 4, tfe.N_MOMENTS, dtype=torch.float64))
    v = torch.randn(2, 1, 4, dtype=torch.float64)
    _close(tfe.moments(v), _old_moments(v), 1e-12)


def test_sym_gram_is_the_full_product():
    a = torch.randn(37, 5, dtype=torch.float64)
    _close(tfe.sym_gram(a, 4), a @ a.T, 1e-12)


def _old_mc_columns(p, w, uniforms, mc_samples):
    import torch.nn.functional as F

    n_classes = p.shape[-1]
    u = uniforms.to(p.dtype).movedim(1, 0)
    cdf = p.cumsum(-1)
    draws = (cdf.unsqueeze(0) <= u.unsqueeze(-1)).sum(-1).clamp_max(n_classes - 1)
    onehot = F.one_hot(draws, n_classes).to(p.dtype)
    return w * (p - onehot) / math.sqrt(mc_samples)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 3])
def test_mc_columns_are_bitwise_the_one_hot_form(dtype, k):
    from gmcurv.losses import softmax

    g = torch.Generator().manual_seed(0)
    for shape in ((5, 7, 13), (4, 11), (3, 2, 4, 50)):
        p = (3 * torch.randn(*shape, generator=g, dtype=dtype)).softmax(-1)
        w = torch.rand(*shape[:-1], 1, generator=g, dtype=dtype)
        un = torch.rand(shape[0], k, *shape[1:-1], generator=g, dtype=torch.float64)
        un[..., 0] = 0.0
        if len(shape) > 2:
            un[..., -1] = 1.0
        assert torch.equal(softmax.mc_columns(p, w, un, k), _old_mc_columns(p, w, un, k))


@pytest.mark.parametrize("k", [1, 2])
def test_next_token_mc_columns_padded_in_place(k):
    from gmcurv.losses.cross_entropy import CrossEntropy
    from gmcurv.losses.tokens import token_weights

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 9, generator=g)
    ids = torch.randint(0, 9, (3, 6), generator=g)
    noise = torch.rand(3, k, 5, generator=g, dtype=torch.float64)
    cols = CrossEntropy(shift=True).output_columns(logits, ids, "mc", k, noise)
    p = logits[:, :-1].softmax(-1)
    w = token_weights(ids[:, 1:], p.dtype).unsqueeze(-1)
    want = _old_mc_columns(p, w, noise, k)
    assert cols.shape == (k, 3, 6, 9)
    assert torch.equal(cols[:, :, :-1], want) and not cols[:, :, -1].any()
