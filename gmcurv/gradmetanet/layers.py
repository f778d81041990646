"""Equivariant building blocks of GradMetaNet (Gelberg et al. 2025, Eq. 9).

Shapes: ``h: [..., b, J, C]`` features per (example ``n``, neuron ``j``); ``z: [..., J, C]``
per neuron (leading dimensions stack several gradient sets of one architecture);
``groups: [J]`` the neuron group of each neuron (0 inputs, ``1..L-1`` hidden layers, ``L``
outputs). Every layer commutes with permutations of the neurons inside a group and of the
examples: they only use per-entry maps and means over examples, over a group's neurons,
over all neurons, or over both. Means (not sums) keep the scale independent of ``b`` and
of the widths, so one set of weights serves any widths and set sizes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


# --------------------------------------------------------------------------------- pooling
def group_onehot(groups: Tensor, n_groups: int, dtype: torch.dtype) -> Tensor:
    """``[J, G]`` with column ``g`` = 1/|group g| on that group's neurons (0 for empty)."""
    onehot = torch.nn.functional.one_hot(groups, n_groups).to(dtype)
    return onehot / onehot.sum(0).clamp_min(1.0)


def group_mean(h: Tensor, groups: Tensor, means: Tensor) -> Tensor:
    """Mean over the neurons of each neuron's own group, broadcast back (neuron axis -2).

    `means` is `group_onehot(groups, G)`; ``h: [..., J, C] -> [..., J, C]``.
    """
    pooled = torch.einsum("...jc,jg->...gc", h, means)  # [..., G, C]
    return pooled[..., groups, :]


# ----------------------------------------------------------------------- positional encoding
class PositionalEncoding(nn.Module):
    """Where a neuron sits: its kind (input / hidden / output) and depth ``g / L``.

    ``[J, 3 + 2 n_freq (+ 2 index_freqs)]``: one-hot kind, ``sin/cos(π k g/L)`` for
    ``k = 1..n_freq`` (the layer id of hidden neurons) and, when ``index_freqs > 0``,
    ``sin/cos(i / 10^(4 k / index_freqs))`` of the index ``i`` of input and output neurons
    (zero on hidden neurons, which stay exchangeable). With ``index_freqs = 0`` the input
    and output neurons are exchangeable too (needed when the input features of the
    networks differ, as across datasets).
    """

    def __init__(self, n_freq: int = 4, index_freqs: int = 0):
        super().__init__()
        self.n_freq, self.index_freqs = n_freq, index_freqs

    @property
    def dim(self) -> int:
        return 3 + 2 * self.n_freq + 2 * self.index_freqs

    def forward(self, groups: Tensor, n_groups: int, dtype: torch.dtype) -> Tensor:
        L = n_groups - 1
        g = groups.to(dtype)
        kind = torch.stack([groups == 0, (groups > 0) & (groups < L), groups == L], -1).to(dtype)
        k = torch.arange(1, self.n_freq + 1, dtype=dtype)
        t = math.pi * (g / max(L, 1))[:, None] * k
        parts = [kind, torch.sin(t), torch.cos(t)]
        if self.index_freqs:
            edge = (groups == 0) | (groups == L)
            idx = torch.zeros_like(g)
            for grp in (0, L):
                mask = groups == grp
                idx[mask] = torch.arange(int(mask.sum()), dtype=dtype)
            w = 10.0 ** (-4.0 * torch.arange(self.index_freqs, dtype=dtype) / self.index_freqs)
            u = idx[:, None] * w
            parts += [torch.sin(u) * edge[:, None], torch.cos(u) * edge[:, None]]
        return torch.cat(parts, -1)


# ----------------------------------------------------------------- (example x neuron) layers
class SetInteraction(nn.Module):
    """Interactions across sets over (example x neuron)::

        L(h)[n,j] = M1 h[n,j] + M2 mean_n' h[n',j] + M3 mean_{j' ~ j} h[n,j']
                    + M3' mean_j' h[n,j'] + M4 mean_{n',j'} h[n',j']

    (``j' ~ j``: same group). The paper's sums become means; the per-group mean is the
    extra equivariant term a multi-layer neuron set allows.
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.m1 = nn.Linear(c_in, c_out)
        self.m2 = nn.Linear(c_in, c_out, bias=False)
        self.m3 = nn.Linear(c_in, c_out, bias=False)
        self.m3g = nn.Linear(c_in, c_out, bias=False)
        self.m4 = nn.Linear(c_in, c_out, bias=False)

    def forward(self, h: Tensor, groups: Tensor, means: Tensor) -> Tensor:
        over_n = h.mean(-3, keepdim=True)  # [..., 1, J, C]
        over_group = group_mean(h, groups, means)  # [..., b, J, C]
        over_j = h.mean(-2, keepdim=True)  # [..., b, 1, C]
        over_all = over_n.mean(-2, keepdim=True)  # [..., 1, 1, C]
        return (
            self.m1(h)
            + self.m2(over_n)
            + self.m3(over_group)
            + self.m3g(over_j)
            + self.m4(over_all)
        )


class InteractionBlock(nn.Module):
    """``h + act(SetInteraction(LayerNorm(h)))`` (LayerNorm over channels, per entry)."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.mix = SetInteraction(c, c)
        self.act = nn.GELU()

    def forward(self, h: Tensor, groups: Tensor, means: Tensor) -> Tensor:
        return h + self.act(self.mix(self.norm(h), groups, means))


class ExamplePool(nn.Module):
    """Pool over examples, plus the global term: ``z[j] = A mean_n h[n,j] + B mean_n h[n,j]^2
    + C mean_{n,j'} h[n,j']`` (the second moment keeps the spread over the set)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.mean = nn.Linear(c_in, c_out)
        self.square = nn.Linear(c_in, c_out, bias=False)
        self.glob = nn.Linear(c_in, c_out, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        m = h.mean(-3)  # [..., J, C]
        return self.mean(m) + self.square(h.pow(2).mean(-3)) + self.glob(m.mean(-2, keepdim=True))


# --------------------------------------------------------------------------- neuron layers
class DeepSets(nn.Module):
    """DeepSets over neurons: ``z + act(M1 LN(z) + M2 mean_{j'~j} LN(z) + M3 mean_j' LN(z))``."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.m1 = nn.Linear(c, c)
        self.m2 = nn.Linear(c, c, bias=False)
        self.m3 = nn.Linear(c, c, bias=False)
        self.act = nn.GELU()

    def forward(self, z: Tensor, groups: Tensor, means: Tensor) -> Tensor:
        y = self.norm(z)
        mix = self.m1(y) + self.m2(group_mean(y, groups, means)) + self.m3(y.mean(-2, keepdim=True))
        return z + self.act(mix)


class ExampleWeights(nn.Module):
    """Learned weights of the examples, ``α_n = 2 σ(MLP(mean_j h[n,j]))`` in ``(0, 2)``
    (1 at initialisation): equivariant over examples, invariant to neuron permutations.

    They define a reweighted plug-in ``Σ_n α_n g_n^2 / Σ_n α_n`` whose log-ratio to the
    plain one the head adds to its Fisher outputs — so it can discount (or stress) examples
    whose gradients dominate a small set, the main source of the plug-in's error when
    per-example gradients are heavy-tailed (well-trained classifiers).
    """

    def __init__(self, c: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(c, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, h: Tensor) -> Tensor:
        return 2.0 * torch.sigmoid(self.mlp(h.mean(-2)))[..., 0]  # [..., b]


# ---------------------------------------------------------------------------------- heads
class ProdHead(nn.Module):
    """``L_Prod``: per-parameter outputs of linear layer ``l`` (inputs = group ``l``,
    outputs = group ``l+1``)::

        W[j,i] = MLP([z_j, z_i, mean_n u[n,i] ⊙ v[n,j], e_ij])
        b[j]   = MLP([z_j, mean_n w[n,j], e_j])

    ``u, v, w`` are per-entry projections of the (example x neuron) features, so the
    product pooled over examples can express ``mean_n delta_j^2 a_i^2`` — the plug-in
    Fisher diagonal — which pooling each neuron separately cannot; ``e`` are edge features.
    The first MLP layer is applied to each part separately and broadcast-added.
    """

    def __init__(self, c_z: int, c_h: int, c_p: int, e_w: int, e_b: int, hidden: int, outputs: int):
        super().__init__()
        self.u = nn.Linear(c_h, c_p, bias=False)
        self.v = nn.Linear(c_h, c_p, bias=False)
        self.w = nn.Linear(c_h, c_p, bias=False)
        self.out_j = nn.Linear(c_z, hidden)
        self.in_i = nn.Linear(c_z, hidden, bias=False)
        self.prod = nn.Linear(c_p, hidden, bias=False)
        self.edge = nn.Linear(e_w, hidden, bias=False)
        self.w_out = nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        self.w_final = nn.Linear(hidden, outputs)
        self.b_j = nn.Linear(c_z, hidden)
        self.b_prod = nn.Linear(c_p, hidden, bias=False)
        self.b_edge = nn.Linear(e_b, hidden, bias=False)
        self.b_out = nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        self.b_final = nn.Linear(hidden, outputs)

    def forward(
        self,
        h: Tensor,
        z: Tensor,
        offsets: list[int],
        edges: tuple[Tensor, ...],
        bias_edges: tuple[Tensor | None, ...],
    ) -> tuple[list[Tensor], list[Tensor | None]]:
        b = h.shape[-3]
        u, v, w = self.u(h), self.v(h), self.w(h)
        zj_all, zi_all = self.out_j(z), self.in_i(z)
        bj_all = self.b_j(z)
        wb_mean = w.mean(-3)  # [..., J, c_p]
        ws, bs = [], []
        for l, e in enumerate(edges):
            ins = slice(offsets[l], offsets[l + 1])
            outs = slice(offsets[l + 1], offsets[l + 2])
            prod = torch.einsum("...nic,...njc->...jic", u[..., ins, :], v[..., outs, :]) / b
            pre = (
                zj_all[..., outs, None, :]
                + zi_all[..., None, ins, :]
                + self.prod(prod)
                + self.edge(e)
            )  # [..., O, I, hidden]
            ws.append(self.w_final(self.w_out(pre)))
            be = bias_edges[l]
            if be is None:
                bs.append(None)
                continue
            pre_b = bj_all[..., outs, :] + self.b_prod(wb_mean[..., outs, :]) + self.b_edge(be)
            bs.append(self.b_final(self.b_out(pre_b)))
        return ws, bs


class InvariantHead(nn.Module):
    """Scalars from neuron features: ``MLP([mean_j z, mean_inputs z, mean_hidden z,
    mean_outputs z, globals])`` — invariant to every neuron permutation."""

    def __init__(self, c_z: int, n_globals: int, hidden: int, outputs: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(4 * c_z + n_globals, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, outputs),
        )

    def forward(self, z: Tensor, groups: Tensor, n_groups: int, globals_: Tensor) -> Tensor:
        L = n_groups - 1
        hidden = (groups > 0) & (groups < L)
        parts = [
            z.mean(-2),
            z[..., groups == 0, :].mean(-2),
            z[..., hidden, :].mean(-2) if bool(hidden.any()) else torch.zeros_like(z[..., 0, :]),
            z[..., groups == L, :].mean(-2),
            globals_,
        ]
        return self.mlp(torch.cat(parts, -1))
