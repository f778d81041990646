"""Head v2: an equivariant network over a transformer's per-token decomposed gradients.

Input (`HeadV2Input.from_tset`): per layer side ``s`` the token-pooled moments
``m_s [b, J_s, 5]`` (`tfeatures.moments`), its neuron kind, layer role and head ids; per
layer its share of the plug-in trace; global summaries (`tfeatures.global_features`).

1. **embed** per (sequence ``n``, neuron ``j``): ``h = gelu(W_e [m, kind, role, side, scale])``
   (kind/role/side one-hots and the side's log-scale are the same for all its neurons);
2. **interaction** (twice): ``h <- h + gelu(A h + B mean_n h + C mean_{j∈side} h
   + D mean_{j'∈head(j)} h + E res(h))`` where ``mean_{head}`` pools the dimensions of one
   attention head (= the side mean off headdim sides) and ``res(h)[j]`` is, on residual
   sides, the mean over *all* residual sides of the model of neuron ``j``'s features (the
   residual permutation is one for the whole model), on other sides the side mean;
3. **per neuron** ``z = mean_n h`` ([J, C]: the equivariant per-neuron output);
4. **per layer** ``φ([mean_j z, rms_j z] of both sides, log share, role, depth)``, pooled
   over all layers and over each role (means) ``⊕`` globals (standardised on the training
   set, clipped to ±3) → ``ρ`` → two scalars ``(r_tr, r_top)``, bounded by
   ``3 tanh(·/3)`` (``ρ``'s last layer starts at zero: a fresh head is the plug-in):

       tr H ≈ tr Ĝ · (1 + r_tr)             (signed: tr H < 0 on some untrained transformers)
       λ_max(H) ≈ T_eff λ_max(F_S) · exp(r_top)

   with ``tr Ĝ`` the token-level GGN plug-in and ``T_eff λ_max(F_S)`` the per-sequence one
   (`tfeatures.TSet`; the per-sequence top eigenvalue was the better λ plug-in on the zoo).

Every operation is a per-entry map or a mean over sequences, over a side's neurons, over
one head's neurons or over the residual neurons shared by sides, so the output commutes with
permutations of sequences, residual dimensions, MLP hidden neurons of a block, attention
heads of a block (q, k, v and the output projection's head blocks together) and dimensions
inside a head; the scalars are invariant. Means (not sums) make one set of weights serve
every width, depth, head count and set size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gmcurv.gradmetanet.tfeatures import (
    KINDS,
    N_GLOBALS,
    N_MOMENTS,
    ROLES,
    TSet,
    global_features,
    moments,
    side_scale,
)

EMBED_IN = N_MOMENTS + len(KINDS) + len(ROLES) + 2
R_MAX = 3.0  # outputs are bounded: |r| <= 3 (a trace within [-2, 4] x plug-in, λ within e^±3)


def _segment_mean(h: Tensor, ids: Tensor, n: int) -> Tensor:
    """Mean of ``h [..., J, C]`` over the neurons of each segment ``ids [J]``, broadcast back."""
    shape = (*h.shape[:-2], n, h.shape[-1])
    tot = torch.zeros(shape, dtype=h.dtype).index_add_(-2, ids, h)
    cnt = torch.zeros(n, dtype=h.dtype).index_add_(0, ids, torch.ones_like(ids, dtype=h.dtype))
    return (tot / cnt.clamp_min(1.0)[:, None])[..., ids, :]


@dataclass
class HeadV2Input:
    """All sides of all layers packed along one neuron axis ``J`` (module doc)."""

    m: Tensor  # [b, J, N_MOMENTS] token-pooled moments
    consts: Tensor  # [J, EMBED_IN - N_MOMENTS] kind, role, output-side flag, relative scale
    side: Tensor  # [J] side id (layer k: sides 2k = inputs, 2k+1 = outputs)
    head: Tensor  # [J] attention-head id (headdim neurons); the side's own id elsewhere
    res: Tensor  # [J] residual-neuron id (res neurons) or a per-side id elsewhere
    n_head_ids: int
    n_res_ids: int
    layer_feats: Tensor  # [L, 1 + len(ROLES) + 1] log share, role one-hot, depth
    roles: Tensor  # [L] role index
    globals: Tensor  # [N_GLOBALS]
    plug_trace: float
    plug_top: float
    seq_trace: float = 0.0  # the per-sequence (unbiased) plug-in, for comparison
    seq_top: float = 0.0

    @property
    def n_sides(self) -> int:
        return 2 * len(self.roles)

    @classmethod
    def from_tset(cls, s: TSet) -> HeadV2Input:
        scales = [side_scale(v) for layer in s.layers for v in (layer.x.values, layer.d.values)]
        mean_scale = sum(scales) / len(scales)
        ms, consts, side, head, res = [], [], [], [], []
        feats, roles = [], []
        tr = s.plug_trace
        n_sides = 2 * len(s.layers)
        next_head = n_sides  # ids 0..S-1: "own side"; then attention heads
        d = s.d_model
        for k, layer in enumerate(s.layers):
            r = ROLES.index(layer.role)
            for out, sd in enumerate((layer.x, layer.d)):
                sid = 2 * k + out
                J = sd.values.shape[-1]
                c = torch.zeros(EMBED_IN - N_MOMENTS, dtype=torch.float64)
                c[KINDS.index(sd.kind)] = 1.0
                c[len(KINDS) + r] = 1.0
                c[len(KINDS) + len(ROLES)] = float(out)
                c[-1] = scales[sid] - mean_scale
                ms.append(moments(sd.values))
                consts.append(c.expand(J, -1))
                side.append(torch.full((J,), sid))
                if sd.heads is not None:
                    head.append(next_head + sd.heads)
                    next_head += int(sd.heads.max()) + 1
                else:
                    head.append(torch.full((J,), sid))
                res.append(torch.arange(J) if sd.kind == "res" else torch.full((J,), d + sid))
            share = float(layer.sq_norms.mean()) / max(tr, 1e-300)
            onehot = [float(i == r) for i in range(len(ROLES))]
            depth = (layer.block + 1) / s.n_blocks if layer.block >= 0 else 1.0
            feats.append([math.log(share + 1e-12), *onehot, depth])
            roles.append(r)
        return cls(
            torch.cat(ms, 1),
            torch.cat(consts),
            torch.cat(side),
            torch.cat(head),
            torch.cat(res),
            next_head,
            d + n_sides,
            torch.tensor(feats, dtype=torch.float64),
            torch.tensor(roles),
            global_features(s),
            tr,
            s.plug_top,
            s.seq_trace,
            s.seq_top,
        )


@dataclass(frozen=True)
class HeadV2Config:
    channels: int = 16
    layer_hidden: int = 32
    blocks: int = 2
    hidden: int = 64

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.GELU(), nn.Linear(h, o))


class Interaction(nn.Module):
    """One equivariant interaction block over all sides (module doc, step 2)."""

    def __init__(self, c: int):
        super().__init__()
        self.lin = nn.ModuleList(nn.Linear(c, c, bias=(i == 0)) for i in range(5))

    def forward(self, h: Tensor, inp: HeadV2Input) -> Tensor:
        pooled_n = h.mean(0)  # [J, C]
        side_mean = _segment_mean(pooled_n, inp.side, inp.n_sides)
        head_mean = _segment_mean(h, inp.head, inp.n_head_ids)
        xl = _segment_mean(pooled_n, inp.res, inp.n_res_ids)
        a, b, c, d, e = self.lin
        upd = a(h) + b(pooled_n) + c(side_mean) + d(head_mean) + e(xl)
        return h + nn.functional.gelu(upd)


@dataclass
class HeadV2Output:
    r_trace: Tensor  # scalar
    r_top: Tensor  # scalar
    neurons: Tensor  # [J, C] per neuron (all sides packed; `HeadV2.neurons_by_side`)

    def trace(self, inp: HeadV2Input) -> Tensor:  # float64: r = 0 is the plug-in exactly
        return inp.plug_trace * (1.0 + self.r_trace.double())

    def top(self, inp: HeadV2Input) -> Tensor:
        return inp.seq_top * torch.exp(self.r_top.double())


class HeadV2(nn.Module):
    """Head v2 (module doc)."""

    def __init__(self, config: HeadV2Config | None = None, seed: int = 0):
        super().__init__()
        self.config = cfg = config or HeadV2Config()
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        c, lh = cfg.channels, cfg.layer_hidden
        self.embed = nn.Linear(EMBED_IN, c)
        self.blocks = nn.ModuleList(Interaction(c) for _ in range(cfg.blocks))
        self.phi = _mlp(4 * c + 1 + len(ROLES) + 1, lh, lh)
        self.rho = _mlp((1 + len(ROLES)) * lh + N_GLOBALS, cfg.hidden, 2)
        nn.init.zeros_(self.rho[-1].weight)
        nn.init.zeros_(self.rho[-1].bias)
        torch.random.set_rng_state(gen_state)
        self.register_buffer("g_mean", torch.zeros(N_GLOBALS))
        self.register_buffer("g_std", torch.ones(N_GLOBALS))

    def forward(self, inp: HeadV2Input) -> HeadV2Output:
        dt = self.embed.weight.dtype
        b, J, _ = inp.m.shape
        x = torch.cat([inp.m.to(dt), inp.consts.to(dt).expand(b, J, -1)], -1)
        h = nn.functional.gelu(self.embed(x))
        for blk in self.blocks:
            h = blk(h, inp)
        z = h.mean(0)  # [J, C]: per-neuron equivariant output
        S = inp.n_sides
        cnt = torch.zeros(S, dtype=dt).index_add_(0, inp.side, torch.ones(J, dtype=dt))
        m1 = torch.zeros(S, z.shape[1], dtype=dt).index_add_(0, inp.side, z) / cnt[:, None]
        m2 = torch.zeros(S, z.shape[1], dtype=dt).index_add_(0, inp.side, z * z) / cnt[:, None]
        per_side = torch.cat([m1, m2.clamp_min(0).add(1e-12).sqrt()], -1)  # [S, 2C]
        per_layer = per_side.reshape(S // 2, -1)  # [L, 4C]: input side, output side
        u = self.phi(torch.cat([per_layer, inp.layer_feats.to(dt)], -1))  # [L, lh]
        agg = [u.mean(0)]
        for r in range(len(ROLES)):
            sel = inp.roles == r
            agg.append(u[sel].mean(0) if bool(sel.any()) else torch.zeros_like(u[0]))
        g = ((inp.globals.to(dt) - self.g_mean.to(dt)) / self.g_std.to(dt)).clamp(-3.0, 3.0)
        out = self.rho(torch.cat([*agg, g]))
        return HeadV2Output(
            R_MAX * torch.tanh(out[0] / R_MAX), R_MAX * torch.tanh(out[1] / R_MAX), z
        )

    def neurons_by_side(self, out: HeadV2Output, inp: HeadV2Input) -> list[Tensor]:
        """The per-neuron outputs ``[J_s, C]`` of each side, in side order."""
        return [out.neurons[inp.side == s] for s in range(inp.n_sides)]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
