"""GradMetaNet for curvature: a set of ``b`` decomposed gradients -> full-sample curvature.

Pipeline (Eq. 9 of the paper)::

    entries [b, J, F] ⊕ positional encoding ⊕ globals  --embed-->  h [b, J, C_e]
    -> interactions-across-sets blocks over (example x neuron)       h [b, J, C_e]
    -> pooling over examples (+ global term)                         z [J, C_z]
    -> DeepSets blocks over neurons                                  z [J, C_z]
    -> L_Prod: per weight / per bias outputs, invariant head: scalars

Outputs are log-ratios to the plug-in estimates on the same set (`decode`): per parameter
``K = 2`` channels (Fisher diagonal, OBS curvature), and ``S = 3`` scalars (Fisher trace,
Hessian trace and top Hessian eigenvalue, the last two relative to the Fisher trace and
top Fisher eigenvalue of the set). A zero output reproduces the plug-in.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from gmcurv.gradmetanet.blend import LayerBlend
from gmcurv.gradmetanet.features import (
    BIAS_EXTRA,
    BIAS_FEATURES,
    EDGE_FEATURES,
    EXAMPLE_FEATURES,
    GLOBAL_FEATURES,
    HeadInput,
)
from gmcurv.gradmetanet.layers import (
    DeepSets,
    ExamplePool,
    ExampleWeights,
    InteractionBlock,
    InvariantHead,
    PositionalEncoding,
    ProdHead,
    group_onehot,
)

PARAM_TARGETS = ("fisher_diag", "obs_curv")
SCALAR_TARGETS = ("fisher_trace", "hessian_trace", "hessian_top")
FLOOR = 1e-3  # decode floor, relative to the layer's mean plug-in value
ENTRY_INPUTS = 7 + EXAMPLE_FEATURES  # a, d, a², d², a·d, has_a, has_d, example features


def entry_features(inp: HeadInput) -> Tensor:
    """``[..., b, J, ENTRY_INPUTS]``: the (a, delta) pair expanded with products, presence
    flags (from the neuron's group) and the example's own features."""
    a, d = inp.entries[..., 0], inp.entries[..., 1]
    L = inp.depth
    has_a = (inp.groups < L).to(a.dtype).expand_as(a)
    has_d = (inp.groups > 0).to(a.dtype).expand_as(a)
    ex = inp.examples[..., :, None, :].expand(*a.shape, inp.examples.shape[-1])
    return torch.cat([torch.stack([a, d, a * a, d * d, a * d, has_a, has_d], -1), ex], -1)


@dataclass(frozen=True)
class HeadConfig:
    """Sizes of the network (all defaults are those of the shipped head)."""

    entry_channels: int = 16
    n_interaction: int = 2
    neuron_channels: int = 32
    n_deepsets: int = 2
    prod_channels: int = 8
    hidden: int = 32
    n_freq: int = 4
    index_freqs: int = 0
    edge_extra: int = 0  # 0: v1's edge features; EDGE_EXTRA: + sampling error, shrinkage
    blend: int = 0  # 1: the per-layer-role Fisher-diagonal blend (`blend.LayerBlend`, v1.2)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class HeadOutput:
    """Raw log-ratios: ``w[l]: [O_l, I_l, K]``, ``b[l]: [O_l, K]`` or None, ``scalars: [S]``."""

    w: tuple[Tensor, ...]
    b: tuple[Tensor | None, ...]
    scalars: Tensor


class GradMetaNet(nn.Module):
    """The equivariant head (see module doc)."""

    def __init__(self, config: HeadConfig | None = None, seed: int = 0):
        super().__init__()
        cfg = self.config = config or HeadConfig()
        self.pe = PositionalEncoding(cfg.n_freq, cfg.index_freqs)
        ce, cz = cfg.entry_channels, cfg.neuron_channels
        self.embed_entry = nn.Linear(ENTRY_INPUTS, ce)
        self.embed_pos = nn.Linear(self.pe.dim, ce, bias=False)
        self.embed_global = nn.Linear(GLOBAL_FEATURES, ce, bias=False)
        self.interactions = nn.ModuleList(InteractionBlock(ce) for _ in range(cfg.n_interaction))
        self.pool = ExamplePool(ce, cz)
        self.pos_z = nn.Linear(self.pe.dim, cz, bias=False)
        self.deepsets = nn.ModuleList(DeepSets(cz) for _ in range(cfg.n_deepsets))
        self.prod = ProdHead(
            cz,
            ce,
            cfg.prod_channels,
            EDGE_FEATURES + cfg.edge_extra,
            BIAS_FEATURES + (BIAS_EXTRA if cfg.edge_extra else 0),
            cfg.hidden,
            len(PARAM_TARGETS),
        )
        self.scalar = InvariantHead(cz, GLOBAL_FEATURES, cfg.hidden, len(SCALAR_TARGETS))
        self.weights = ExampleWeights(ce, cfg.hidden)
        self.reset_parameters(seed)
        if cfg.blend:
            self.blend = LayerBlend()

    def reset_parameters(self, seed: int = 0) -> None:
        """Linear weights ``U(±1/sqrt(fan_in))`` from a local generator, biases zero, and
        zero final layers: a fresh head reproduces the plug-in (zero log-ratios)."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    bound = 1.0 / math.sqrt(m.in_features)
                    m.weight.uniform_(-bound, bound, generator=gen)
                    if m.bias is not None:
                        m.bias.zero_()
            finals = (
                self.prod.w_final,
                self.prod.b_final,
                self.scalar.mlp[-1],
                self.weights.mlp[-1],
            )
            for final in finals:
                final.weight.zero_()
                final.bias.zero_()

    def forward(self, inp: HeadInput) -> HeadOutput:
        dtype = inp.entries.dtype
        groups = inp.groups
        n_groups = inp.depth + 1
        means = group_onehot(groups, n_groups, dtype)
        pos = self.pe(groups, n_groups, dtype)  # [J, P]
        glob = self.embed_global(inp.globals_)[..., None, None, :]  # [..., 1, 1, C]
        h = self.embed_entry(entry_features(inp)) + self.embed_pos(pos) + glob
        for block in self.interactions:
            h = block(h, groups, means)
        z = self.pool(h) + self.pos_z(pos)
        for block in self.deepsets:
            z = block(z, groups, means)
        counts = torch.bincount(groups, minlength=n_groups).tolist()
        offsets = [0]
        for c in counts:
            offsets.append(offsets[-1] + c)
        n_e = EDGE_FEATURES + self.config.edge_extra
        n_b = BIAS_FEATURES + (BIAS_EXTRA if self.config.edge_extra else 0)
        edges = tuple(e[..., :n_e] for e in inp.edges)
        bias_edges = tuple(None if e is None else e[..., :n_b] for e in inp.bias_edges)
        ws, bs = self.prod(h, z, offsets, edges, bias_edges)
        scalars = self.scalar(z, groups, n_groups, inp.globals_)
        dw, db, dtr = reweighted_shift(inp, self.weights(h), offsets)
        ws = [
            torch.cat([w[..., :1] + d[..., None], w[..., 1:]], -1)
            for w, d in zip(ws, dw, strict=True)
        ]
        bs = [
            None
            if b is None or d is None
            else torch.cat([b[..., :1] + d[..., None], b[..., 1:]], -1)
            for b, d in zip(bs, db, strict=True)
        ]
        scalars = torch.cat([scalars[..., :1] + dtr[..., None], scalars[..., 1:]], -1)
        if self.config.blend:
            ws, bs = self._blend(inp, ws, bs)
        return HeadOutput(tuple(ws), tuple(bs), scalars)

    def _blend(
        self, inp: HeadInput, ws: list[Tensor], bs: list[Tensor | None]
    ) -> tuple[list[Tensor], list[Tensor | None]]:
        """Channel 0 (Fisher diagonal) through `LayerBlend`; the OBS channel unchanged."""
        L = inp.depth
        ws = [
            torch.cat([self.blend(l, L, w[..., 0], inp.edges[l])[..., None], w[..., 1:]], -1)
            for l, w in enumerate(ws)
        ]
        out_b: list[Tensor | None] = []
        for l, b in enumerate(bs):
            e = inp.bias_edges[l]
            if b is None or e is None:
                out_b.append(b)
                continue
            fb = self.blend(l, L, b[..., 0], e, bias=True)
            out_b.append(torch.cat([fb[..., None], b[..., 1:]], -1))
        return ws, out_b


def reweighted_shift(
    inp: HeadInput, alpha: Tensor, offsets: list[int]
) -> tuple[list[Tensor], list[Tensor | None], Tensor]:
    """Log-ratios of the ``α``-weighted plug-in to the plain one (normalised units)::

        P_α[j,i] = Σ_n α_n d[n,j]^2 a[n,i]^2 / Σ_n α_n      (bias: a = 1)
        Δ = log(P_α + floor) - log(P_1 + floor)

    per weight and bias of every layer, with the floor of `log_prediction`, and for the
    trace ``log(Σ α_n s_n / Σ α_n) - log(mean_n s_n)``, ``s_n = ||g_n||^2``. Zero at
    ``α = 1``.
    """
    a2, d2 = inp.entries[..., 0].pow(2), inp.entries[..., 1].pow(2)  # [..., b, J]
    w = alpha / alpha.sum(-1, keepdim=True)  # [..., b]
    ones = torch.full_like(w, 1.0 / w.shape[-1])
    dws, dbs = [], []
    s_alpha = s_one = 0.0
    for l in range(inp.depth):
        ai = a2[..., offsets[l] : offsets[l + 1]]  # [..., b, I]
        dj = d2[..., offsets[l + 1] : offsets[l + 2]]  # [..., b, O]
        floor = FLOOR * inp.plug_w[l][..., 0].to(a2.dtype).mean((-2, -1))[..., None, None]
        pa = torch.einsum("...n,...nj,...ni->...ji", w, dj, ai)
        p1 = torch.einsum("...n,...nj,...ni->...ji", ones, dj, ai)
        dws.append(torch.log(pa + floor) - torch.log(p1 + floor))
        per_example = dj.sum(-1) * ai.sum(-1) * inp.unit_w[l].to(a2.dtype)[..., None]
        pb = inp.plug_b[l]
        if pb is None:
            dbs.append(None)
        else:
            fb = FLOOR * pb[..., 0].to(a2.dtype).mean(-1)[..., None]
            qa = torch.einsum("...n,...nj->...j", w, dj)
            q1 = dj.mean(-2)
            dbs.append(torch.log(qa + fb) - torch.log(q1 + fb))
            per_example = per_example + dj.sum(-1) * inp.unit_b[l].to(a2.dtype)[..., None]
        s_alpha = s_alpha + (w * per_example).sum(-1)
        s_one = s_one + per_example.mean(-1)
    tiny = torch.finfo(a2.dtype).tiny
    dtr = torch.log(s_alpha + tiny) - torch.log(s_one + tiny)
    return dws, dbs, dtr


# ------------------------------------------------------------------------------------ decode
@dataclass(frozen=True)
class Prediction:
    """Decoded predictions in the model's own units (float64).

    ``param[l]: [O_l, I_l, K]`` and ``bias[l]: [O_l, K]`` (channels `PARAM_TARGETS`),
    ``scalars: [S]`` (`SCALAR_TARGETS`).
    """

    param: tuple[Tensor, ...]
    bias: tuple[Tensor | None, ...]
    scalars: Tensor


def _log_base(plug: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``log(plug + FLOOR · mean)``, the mean over the parameter dims, per channel."""
    return torch.log(plug + FLOOR * plug.mean(dims, keepdim=True))


def log_prediction(inp: HeadInput, out: HeadOutput) -> Prediction:
    """Predictions in normalised units and log space: ``log(plug + floor) + r`` per channel,
    ``log(plug scalar) + r`` for scalars (differentiable, overflow-free; used in training).

    The floor (`FLOOR` times the layer's mean plug-in value per channel) lets the head
    predict curvature where the set saw none (e.g. a unit inactive on all ``b`` examples).
    """
    params, biases = [], []
    for l in range(inp.depth):
        params.append(_log_base(inp.plug_w[l].to(out.w[l].dtype), (-3, -2)) + out.w[l])
        pb, ob = inp.plug_b[l], out.b[l]
        biases.append(None if pb is None or ob is None else _log_base(pb.to(ob.dtype), (-2,)) + ob)
    scalars = torch.log(inp.plug_scalars.to(out.scalars.dtype).clamp_min(1e-300)) + out.scalars
    return Prediction(tuple(params), tuple(biases), scalars)


def decode(inp: HeadInput, out: HeadOutput) -> Prediction:
    """Predictions in the model's units: ``unit · (plug-in + floor) · exp(log-ratio)``."""
    d = HeadOutput(
        tuple(w.double() for w in out.w),
        tuple(None if b is None else b.double() for b in out.b),
        out.scalars.double(),
    )
    logp = log_prediction(inp.to(torch.float64), d)
    params = [
        torch.exp(p) * u.double()[..., None, None, None]
        for p, u in zip(logp.param, inp.unit_w, strict=True)
    ]
    biases = [
        None if p is None else torch.exp(p) * u.double()[..., None, None]
        for p, u in zip(logp.bias, inp.unit_b, strict=True)
    ]
    return Prediction(tuple(params), tuple(biases), torch.exp(logp.scalars))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def widen_edges(state: dict[str, Tensor], edge_extra: int) -> dict[str, Tensor]:
    """A v1 head's weights for a head with `edge_extra` more edge features: the new input
    columns of the edge layers are zero, so the widened head computes exactly what the v1
    head does until it is trained (fine-tuning starts from v1)."""
    out = dict(state)
    for key, base, extra in (
        ("prod.edge.weight", EDGE_FEATURES, edge_extra),
        ("prod.b_edge.weight", BIAS_FEATURES, BIAS_EXTRA if edge_extra else 0),
    ):
        w = out[key]
        if w.shape[1] == base:
            out[key] = torch.cat([w, w.new_zeros(w.shape[0], extra)], 1)
    return out
