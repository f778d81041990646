"""Decomposed gradients of an MLP -> the head's input: per-neuron ``(a, delta)`` sets.

An MLP with linear layers ``l = 0..L-1`` (``z_l = W_l x_l + b_l``, ``x_{l+1} = σ(z_l)``) has
neuron groups ``g = 0..L``: the inputs (group 0), the hidden layers and the outputs
(group ``L``). Example ``n``'s gradient of layer ``l`` is the rank-1 product
``g_n(W_l) = delta_l[n] x_l[n]^T`` (`gmcurv.factors.LinearFactors` with ``T = C = 1``), so
the gradient set is held by neurons: neuron ``j`` of group ``g`` carries
``a[n, j] = x_g[n, j]`` (``g < L``) and ``delta[n, j] = delta_{g-1}[n, j]`` (``g > 0``).

`encode` normalises per layer (``a / s_a[l]``, ``delta / s_d[l]``, ``s`` the RMS over the
set) so that networks of any scale share one input range; per-parameter quantities are
measured in units of ``s_d[l]^2 s_a[l]^2`` (weights) and ``s_d[l]^2`` (biases). Plug-in
estimates on the same set (`plug_in`: Fisher diagonal, OBS curvature ``1/[(F+eps I)^-1]_qq``,
trace, top eigenvalue — all from the engine's closed forms) enter as edge features and as
the baseline the head corrects: every output is a log-ratio to a plug-in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gmcurv.capture import DecomposedGradients
from gmcurv.errors import UnsupportedError
from gmcurv.factors import LinearFactors
from gmcurv.fisher import fisher_diagonal, fisher_eigen, fisher_trace
from gmcurv.gradmetanet.modelfisher import model_fisher_diagonal, rescaled
from gmcurv.losses import CrossEntropy
from gmcurv.models.mlp import ACTIVATIONS, MLP
from gmcurv.objective import Objective
from gmcurv.woodbury import DampedFisher, default_eps

ACTIVATION_VOCAB = tuple(ACTIVATIONS)  # one-hot order of the activation feature
LOG_EPS = 1e-6  # floor inside logs of normalised curvature (units of s_d^2 s_a^2)
LOG_SCALE = 0.2  # log features are multiplied by this to stay O(1)
ENTRY_FEATURES = 2  # (a, delta) per (example, neuron); zero where a neuron has none
EXAMPLE_FEATURES = 2  # log(1 + loss_n), loss_n / mean loss (capped at 10)
EDGE_FEATURES = 4  # read by every head: log plug-in F, log K-FAC, log plug-in OBS, weight
BIAS_FEATURES = 3  # log plug-in F, log plug-in OBS, bias
# Extra edge features (read by heads with ``HeadConfig.edge_extra = 2``, head v1.1): the log
# relative standard error of the plug-in entry and the log of the per-entry shrinkage
# estimate towards K-FAC; bias: the log relative standard error.
EDGE_EXTRA = 2
BIAS_EXTRA = 1
# Then, read by the layer blend (`HeadConfig.blend`, head v1.2): the log model-Fisher diagonal
# on the same set, rescaled to the plug-in's layer total (`gmcurv.gradmetanet.modelfisher`).
EDGE_MODEL_FISHER = EDGE_FEATURES + EDGE_EXTRA  # column of edges[l]
BIAS_MODEL_FISHER = BIAS_FEATURES + BIAS_EXTRA  # column of bias_edges[l]
GLOBAL_FEATURES = 6 + len(ACTIVATION_VOCAB)


# ------------------------------------------------------------------------------ the MLP chain
@dataclass(frozen=True)
class MLPChain:
    """An MLP's linear layers in order (module paths, parameter names) and its activation."""

    paths: tuple[str, ...]
    weights: tuple[str, ...]
    biases: tuple[str | None, ...]
    activation: str

    @property
    def depth(self) -> int:
        return len(self.paths)


_ACT_NAMES = {cls: name for name, cls in ACTIVATIONS.items()}


def _activation_name(module: nn.Module) -> str | None:
    if type(module) is nn.LeakyReLU and module.negative_slope != 0.01:
        return None
    if type(module) is nn.GELU and module.approximate != "none":
        return None
    return _ACT_NAMES.get(type(module))


TRANSFORMER_REFUSAL = (
    "on transformers the GradMetaNet head (head v2) answers only the top Hessian eigenvalue "
    "(gmcurv eigen --curvature hessian --method learned): for the Hessian trace Hutchinson "
    "wins at equal time on held-out causal LMs (mean relative error 0.09 vs 0.27 for the "
    "plug-in from the head's gradients; a learned correction of tr H - tr GGN and control "
    "variates built on the plug-in all lose to it, by 10-150 %), and it has no Fisher "
    "diagonal or saliencies (numbers: `gmcurv head info`; in the repository: "
    "bench/gradmetanet/HEAD_V2_DESIGN.md)"
)


def _is_transformer(model: nn.Module) -> bool:
    """Whether `model` has attention projections (TinyLM, GPT-2, Llama names)."""
    from gmcurv.gradmetanet.tfeatures import layer_role

    roles = {layer_role(name) for name, _ in model.named_modules()}
    return "attn_in" in roles


def mlp_chain(model: nn.Module) -> MLPChain:
    """The linear chain of a gmcurv `MLP` or of an ``nn.Sequential`` of Linear/activation.

    Raises `UnsupportedError` for anything else (the head only knows MLPs).
    """
    refuse = UnsupportedError(
        f"the GradMetaNet head supports MLPs (Linear layers with one elementwise activation), "
        f"not {type(model).__name__}",
        hint="use --method exact (or auto) for this model",
    )
    if isinstance(model, MLP):
        paths, act = tuple(model._paths), model.activation_name
        linears = model.linears
    elif isinstance(model, nn.Sequential):
        mods = list(model.named_children())
        linears_named = [(n, m) for n, m in mods if isinstance(m, nn.Linear)]
        others = [m for _, m in mods if not isinstance(m, nn.Linear)]
        names = {_activation_name(m) for m in others}
        if not linears_named or None in names or len(names) > 1:
            raise refuse
        # Linear, act, Linear, act, ..., Linear
        kinds = ["L" if isinstance(m, nn.Linear) else "A" for _, m in mods]
        if "".join(kinds) != "LA" * (len(linears_named) - 1) + "L":
            raise refuse
        paths = tuple(n for n, _ in linears_named)
        linears = [m for _, m in linears_named]
        act = names.pop() if names else "identity"
    else:
        if _is_transformer(model):
            raise UnsupportedError(TRANSFORMER_REFUSAL, hint="use --method exact (or auto)")
        raise refuse
    return MLPChain(
        paths,
        tuple(f"{p}.weight" for p in paths),
        tuple(
            f"{p}.bias" if lin.bias is not None else None
            for p, lin in zip(paths, linears, strict=True)
        ),
        act,
    )


def check_supported(objective: Objective, fisher: str = "empirical") -> MLPChain:
    """The chain of an objective the head can read, or `UnsupportedError` saying why not."""
    chain = mlp_chain(objective.model)
    hint = "use --method exact (or auto)"
    if not isinstance(objective.loss, CrossEntropy) or objective.loss.shift:
        raise UnsupportedError(
            f"the GradMetaNet head was trained for cross-entropy classifiers, not "
            f"loss {objective.loss.name!r}",
            hint=hint,
        )
    if fisher != "empirical":
        raise UnsupportedError(
            f"the GradMetaNet head reads empirical-Fisher gradients, not --fisher {fisher}",
            hint="use --fisher empirical with --method learned, or " + hint,
        )
    wanted = {n for n in chain.weights + chain.biases if n is not None}
    if set(objective.params) != wanted:
        raise UnsupportedError(
            "the GradMetaNet head needs the gradients of every layer of the MLP",
            hint="drop --layers with --method learned, or " + hint,
        )
    return chain


# ---------------------------------------------------------------------------- gradient sets
@dataclass(frozen=True)
class GradientSet:
    """``b`` per-example gradients of an MLP as factors, plus its weights (float64).

    ``x[l]: [b, I_l]`` layer inputs (no bias column), ``delta[l]: [b, O_l]``,
    ``weight[l]: [O_l, I_l]``, ``bias[l]: [O_l]`` or None, ``losses: [b]``.
    """

    x: tuple[Tensor, ...]
    delta: tuple[Tensor, ...]
    weight: tuple[Tensor, ...]
    bias: tuple[Tensor | None, ...]
    losses: Tensor
    activation: str

    @property
    def b(self) -> int:
        return int(self.losses.shape[0])

    @property
    def depth(self) -> int:
        return len(self.x)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Neurons per group: inputs, hidden layers, outputs."""
        return (self.x[0].shape[1], *(d.shape[1] for d in self.delta))


def gradient_set(
    dg: DecomposedGradients, chain: MLPChain, params: Mapping[str, Tensor]
) -> GradientSet:
    """Read the chain's factors out of captured gradients (empirical Fisher, one token)."""
    by_name = {b.name: b for b in dg.blocks}
    xs, ds = [], []
    for path in chain.paths:
        block = by_name.get(path)
        src = None if block is None else block.source
        if not isinstance(src, LinearFactors) or src.columns != 1 or src.tokens != 1:
            raise UnsupportedError(
                f"layer {path}: no rank-1 factors with one column and one token to read",
                hint="the head needs an MLP on vector inputs and --fisher empirical; "
                "use --method exact",
            )
        xs.append(src.x[:, 0].double())
        ds.append(src.delta[:, 0, 0].double())
    return GradientSet(
        tuple(xs),
        tuple(ds),
        tuple(params[w].detach().double() for w in chain.weights),
        tuple(None if b is None else params[b].detach().double() for b in chain.biases),
        dg.losses.detach().double(),
        chain.activation,
    )


# ---------------------------------------------------------------------------------- plug-in
@dataclass(frozen=True)
class PlugIn:
    """Closed forms on the same ``b`` gradients: what the head is measured against.

    ``diag_w[l]: [O_l, I_l]``, ``diag_b[l]: [O_l]`` the Fisher diagonal; ``obs_w``/``obs_b``
    the OBS curvature ``1/[(F + eps I)^-1]_qq`` (block-diagonal F, eps from `default_eps`);
    ``trace`` ``tr F``; ``top`` ``λ_max(F)``; ``eps`` the damping.
    """

    diag_w: tuple[Tensor, ...]
    diag_b: tuple[Tensor | None, ...]
    obs_w: tuple[Tensor, ...]
    obs_b: tuple[Tensor | None, ...]
    trace: float
    top: float
    eps: float


def plug_in(dg: DecomposedGradients, chain: MLPChain) -> PlugIn:
    """Fisher diagonal, OBS curvature, trace and top eigenvalue of the set ``dg``."""
    diag = fisher_diagonal(dg)
    eps = default_eps(dg)
    inv = DampedFisher(dg, eps, "block").inverse_diagonal()

    def pick(table: Mapping[str, Tensor], name: str | None, invert: bool = False):
        if name is None:
            return None
        v = table[name].double()
        return 1.0 / v if invert else v

    return PlugIn(
        tuple(pick(diag, w) for w in chain.weights),
        tuple(pick(diag, b) for b in chain.biases),
        tuple(pick(inv, w, True) for w in chain.weights),
        tuple(pick(inv, b, True) for b in chain.biases),
        fisher_trace(dg),
        float(fisher_eigen(dg, k=1).values[0]),
        eps,
    )


# ----------------------------------------------------------------------------- head inputs
@dataclass(frozen=True)
class HeadInput:
    """One gradient set, encoded (float32 unless cast).

    ``entries: [b, J, 2]`` the normalised ``(a, delta)`` per (example, neuron);
    ``examples: [b, EXAMPLE_FEATURES]``; ``groups: [J]`` the neuron group (0 inputs .. L
    outputs); ``edges[l]: [O_l, I_l, EDGE_FEATURES]``; ``bias_edges[l]: [O_l, BIAS_FEATURES]``
    or None; ``globals_: [GLOBAL_FEATURES]``.
    Decoding: ``plug_w[l]``/``plug_b[l]`` normalised plug-in channels ``[..., 2]``
    (Fisher diagonal, OBS curvature) and their units ``unit_w[l]``, ``unit_b[l]``;
    ``plug_scalars: [3]`` = (tr F, tr F, λ_max F) of the set (the bases of the scalar
    log-ratios: Fisher trace, Hessian trace, top Hessian eigenvalue). `stack_inputs` adds a
    leading dimension to every tensor but ``groups`` (sets of one architecture).
    """

    entries: Tensor
    examples: Tensor
    groups: Tensor
    edges: tuple[Tensor, ...]
    bias_edges: tuple[Tensor | None, ...]
    globals_: Tensor
    plug_w: tuple[Tensor, ...]
    plug_b: tuple[Tensor | None, ...]
    unit_w: tuple[Tensor, ...]
    unit_b: tuple[Tensor, ...]
    plug_scalars: Tensor

    @property
    def depth(self) -> int:
        return len(self.edges)

    @property
    def b(self) -> int:
        return int(self.entries.shape[-3])

    def to(self, dtype: torch.dtype) -> HeadInput:
        def c(t):
            return None if t is None else t.to(dtype)

        return HeadInput(
            c(self.entries),
            c(self.examples),
            self.groups,
            tuple(c(e) for e in self.edges),
            tuple(c(e) for e in self.bias_edges),
            c(self.globals_),
            tuple(c(p) for p in self.plug_w),
            tuple(c(p) for p in self.plug_b),
            self.unit_w,
            self.unit_b,
            self.plug_scalars.double(),
        )


def stack_inputs(items: list[HeadInput]) -> HeadInput:
    """Stack encoded sets of the same architecture along a new leading dimension."""
    first = items[0]
    for it in items[1:]:
        if not torch.equal(it.groups, first.groups) or it.b != first.b:
            raise ValueError("stack_inputs needs sets of one architecture and one size b")

    def st(get):
        vals = [get(it) for it in items]
        return None if vals[0] is None else torch.stack(vals)

    L = first.depth
    return HeadInput(
        st(lambda it: it.entries),
        st(lambda it: it.examples),
        first.groups,
        tuple(st(lambda it, l=l: it.edges[l]) for l in range(L)),
        tuple(st(lambda it, l=l: it.bias_edges[l]) for l in range(L)),
        st(lambda it: it.globals_),
        tuple(st(lambda it, l=l: it.plug_w[l]) for l in range(L)),
        tuple(st(lambda it, l=l: it.plug_b[l]) for l in range(L)),
        tuple(st(lambda it, l=l: it.unit_w[l]) for l in range(L)),
        tuple(st(lambda it, l=l: it.unit_b[l]) for l in range(L)),
        st(lambda it: it.plug_scalars),
    )


def _rms(t: Tensor) -> float:
    return max(math.sqrt(float(t.pow(2).mean())) if t.numel() else 0.0, 1e-30)


def _log(t: Tensor) -> Tensor:
    return LOG_SCALE * torch.log(t.clamp_min(0.0) + LOG_EPS)


def sample_accuracy(delta_out: Tensor) -> float:
    """Share of examples the model classifies correctly, read off ``delta = p - onehot(y)``."""
    y = delta_out.argmin(1)  # the true class is the only negative entry
    p = delta_out.clone()
    idx = torch.arange(len(y))
    p[idx, y] += 1.0
    return float((p.argmax(1) == y).double().mean())


def entry_shrinkage(
    p: Tensor, d2: Tensor, a2: Tensor, kfac: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Per-entry sampling error of the plug-in and its shrinkage towards K-FAC.

    With ``g_n[j,i]^2 = d2[n,j] a2[n,i]`` and ``p = mean_n g^2`` (the plug-in, normalised
    units), the variance of ``p`` is estimated by ``v = (mean_n g^4 - p^2) / (b - 1)``;
    returned: ``LOG_SCALE/2 · log(v / p^2 + LOG_EPS)`` (log relative standard error, ``[O, I]``)
    and, given `kfac` ``k``, the per-entry shrinkage ``k + λ (p - k)`` with
    ``λ = max((p-k)^2 - v, 0) / ((p-k)^2)`` (the plug-in where it is far from K-FAC relative
    to its noise, K-FAC where the difference is within the noise).
    """
    b = d2.shape[0]
    p4 = torch.einsum("nj,ni->ji", d2.pow(2), a2.pow(2)) / b
    p = p.reshape(p4.shape)
    var = (p4 - p.pow(2)).clamp_min(0.0) / max(b - 1, 1)
    rel = 0.5 * LOG_SCALE * torch.log(var / p.pow(2).clamp_min(1e-300) + LOG_EPS)
    if kfac is None:
        return rel, None
    diff = p - kfac
    excess = (diff.pow(2) - var).clamp_min(0.0)
    lam = excess / (excess + var).clamp_min(1e-300)
    return rel, kfac + lam * diff


def encode(gs: GradientSet, plug: PlugIn, dtype: torch.dtype = torch.float32) -> HeadInput:
    """Normalised head input for one gradient set (see module doc)."""
    L, b = gs.depth, gs.b
    s_a = [_rms(x) for x in gs.x]
    s_d = [_rms(d) for d in gs.delta]
    xs = [x / s for x, s in zip(gs.x, s_a, strict=True)]
    ds = [d / s for d, s in zip(gs.delta, s_d, strict=True)]
    loss = gs.losses
    examples = torch.stack(
        [torch.log1p(loss), (loss / max(float(loss.mean()), 1e-30)).clamp_max(10.0)], 1
    )  # [b, 2]
    parts, groups = [], []
    for g, size in enumerate(gs.sizes):
        a = xs[g] if g < L else torch.zeros(b, size, dtype=torch.float64)
        d = ds[g - 1] if g > 0 else torch.zeros(b, size, dtype=torch.float64)
        parts.append(torch.stack([a, d], -1))  # [b, size, 2]
        groups.append(torch.full((size,), g, dtype=torch.long))
    entries = torch.cat(parts, 1)

    edges, bias_edges, plug_w, plug_b, unit_w, unit_b = [], [], [], [], [], []
    model_w, model_b = model_fisher_diagonal(gs)
    for l in range(L):
        uw, ub = s_d[l] ** 2 * s_a[l] ** 2, s_d[l] ** 2
        pw = torch.stack([plug.diag_w[l] / uw, plug.obs_w[l] / uw], -1)  # [O, I, 2]
        kfac = ds[l].pow(2).mean(0)[:, None] * xs[l].pow(2).mean(0)[None, :]
        w = gs.weight[l]
        w_rms = _rms(w)
        d2, a2 = ds[l].pow(2), xs[l].pow(2)
        rel_se, shrunk = entry_shrinkage(pw[..., 0], d2, a2, kfac)
        model = rescaled(model_w[l], plug.diag_w[l]) / uw
        edges.append(
            torch.stack(
                [
                    *(_log(pw[..., 0]), _log(kfac), _log(pw[..., 1]), w / w_rms),
                    *(rel_se, _log(shrunk), _log(model)),
                ],
                -1,
            )
        )
        plug_w.append(pw)
        unit_w.append(torch.tensor(uw, dtype=torch.float64))
        unit_b.append(torch.tensor(ub, dtype=torch.float64))
        if gs.bias[l] is None:
            bias_edges.append(None)
            plug_b.append(None)
            continue
        diag_b, obs_b = plug.diag_b[l], plug.obs_b[l]
        assert diag_b is not None and obs_b is not None
        pb = torch.stack([diag_b / ub, obs_b / ub], -1)  # [O, 2]
        rel_b, _ = entry_shrinkage(pb[:, 0], d2, torch.ones(b, 1, dtype=d2.dtype), None)
        model_bias = rescaled(model_b[l], diag_b) / ub
        bias_edges.append(
            torch.stack(
                [_log(pb[:, 0]), _log(pb[:, 1]), gs.bias[l] / w_rms, rel_b[:, 0], _log(model_bias)],
                -1,
            )
        )
        plug_b.append(pb)

    sq = sum(
        d.pow(2).sum(1) * (x.pow(2).sum(1) + (0.0 if bb is None else 1.0))
        for d, x, bb in zip(gs.delta, gs.x, gs.bias, strict=True)
    )  # per-example ||g_n||^2
    ess = float(sq.sum() ** 2 / (b * sq.pow(2).sum()).clamp_min(1e-300))
    onehot = [float(gs.activation == a) for a in ACTIVATION_VOCAB]
    globals_ = torch.tensor(
        [
            math.log(b) / 5.0,
            L / 4.0,
            ess,
            plug.top / max(plug.trace, 1e-300),
            math.log1p(float(loss.mean())),
            sample_accuracy(gs.delta[-1]),
            *onehot,
        ],
        dtype=torch.float64,
    )
    scalars = torch.tensor([plug.trace, plug.trace, plug.top], dtype=torch.float64)
    out = HeadInput(
        entries,
        examples,
        torch.cat(groups),
        tuple(edges),
        tuple(bias_edges),
        globals_,
        tuple(plug_w),
        tuple(plug_b),
        tuple(unit_w),
        tuple(unit_b),
        scalars,
    )
    return out.to(dtype)
