"""Capture per-example gradients in decomposed form with one backward pass per Fisher column.

Forward hooks record each supported module's input (``a``, or token indices); tensor hooks on
its output record ``delta = ∂(Σ_n <G[c,n], f_n>)/∂y`` for every column ``c`` of the chosen
Fisher (`gmcurv.losses`), so that with sum-over-examples semantics ``delta[n]`` belongs to
example ``n`` alone. Supported modules:

==============  ==============================================================
``linear``      ``nn.Linear``: leading dimensions become tokens, bias folded into ``a``;
                an input flattened to ``[N*T, I]`` (OPT's fc1/fc2) is mapped back to
                ``[N, T, I]`` (rows example-major, verified by the self-check)
``conv1d``      Hugging Face ``Conv1D`` (GPT-2; weight ``[I, O]``, ``y = x W + b``): as
                ``linear``, with the weight gradient transposed
``conv2d``      ``nn.Conv2d`` (groups = 1): unfolded patches, positions become tokens
``embedding``   ``nn.Embedding``: one-hot inputs kept as indices
``norm``        LayerNorm / GroupNorm / BatchNorm / RMSNorm affine parameters:
                ``g = Σ_positions delta ⊙ x̂`` (and ``Σ delta`` for the bias), exact and cheap;
                Hugging Face RMSNorms (``LlamaRMSNorm`` etc., ``y = w ⊙ x / rms(x)``) too
``tied``        a parameter reached through several of the above (sum of sources)
``dense``       anything else: per-example gradients from ``torch.func`` (``vmap`` of ``vjp``)
==============  ==============================================================

On the first examples the summed factors are checked against autograd's gradient; a block
that disagrees (a weight also used outside its module's forward) falls back to ``dense``
with a warning, so every parameter is always covered, correctly. A module whose inputs
cannot be mapped to examples (a leading dimension that is not a multiple of ``N``) falls
back to ``dense`` the same way, on any batch. Subclasses that override ``forward`` (e.g.
OPT's positional embedding, called with the attention mask) are ``dense``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vjp, vmap
from torch.utils._pytree import tree_map

from gmcurv.data import Batch, DataSample, batch_size_of, slice_inputs
from gmcurv.distributed import gather_decomposed
from gmcurv.errors import ConfigError, GmcurvWarning, UnsupportedError
from gmcurv.factors import (
    DenseGradients,
    EmbeddingFactors,
    GradientSource,
    LinearFactors,
    SumOfSources,
)
from gmcurv.losses import FISHER_TYPES
from gmcurv.objective import Objective
from gmcurv.rng import example_noise

_NORMS: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._BatchNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

_NORM_FORWARDS = {c.forward for c in _NORMS}

ProgressFn = Callable[[int], None]


# ------------------------------------------------------------------------------------ plans
@dataclass(frozen=True)
class BlockPlan:
    """A set of parameters whose per-example gradients are captured together."""

    name: str  # module path (or parameter name for dense blocks)
    kind: str  # linear | conv2d | embedding | norm | tied | dense
    params: tuple[str, ...]  # parameter names, in flat order
    modules: tuple[str, ...]  # module paths whose forward calls produce the gradient


def _own_forward(module: nn.Module, base: type[nn.Module]) -> bool:
    """Does `module` compute `base`'s forward (not a subclass that overrides it)?"""
    return type(module).forward is base.forward


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (``y = x W + b``, weight ``[I, O]``), without importing it."""
    w = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and type(module).__module__.startswith("transformers.")
        and isinstance(w, Tensor)
        and w.ndim == 2
        and w.shape[1] == getattr(module, "nf", None)
    )


def is_hf_rms_norm(module: nn.Module) -> bool:
    """A Hugging Face RMSNorm (``LlamaRMSNorm``, ``Qwen2RMSNorm``, ...): ``w ⊙ x / rms(x)``.

    Recognised by name and shape; a variant computing something else (e.g. ``(1 + w)``)
    fails the first-batch self-check and falls back to dense, with a warning.
    """
    w = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("RMSNorm")
        and type(module).__module__.startswith("transformers.")
        and isinstance(w, Tensor)
        and w.ndim == 1
        and getattr(module, "bias", None) is None
        and isinstance(_rms_eps(module), float)
    )


def _rms_eps(module: nn.Module) -> float | None:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return float(eps) if isinstance(eps, (int, float)) else None


def module_kind(module: nn.Module) -> str:
    """How a module's own parameters are captured (see module doc)."""
    if isinstance(module, nn.Linear) and _own_forward(module, nn.Linear):
        return "linear"
    if is_hf_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.Conv2d) and module.groups == 1 and _own_forward(module, nn.Conv2d):
        return "conv2d"
    if (
        isinstance(module, nn.Embedding)
        and _own_forward(module, nn.Embedding)
        and module.max_norm is None
        and not module.scale_grad_by_freq
        and not module.sparse
    ):
        return "embedding"
    if isinstance(module, _NORMS) and type(module).forward in _NORM_FORWARDS:
        return "norm"
    if is_hf_rms_norm(module):
        return "norm"
    return "dense"


def plan_capture(model: nn.Module, params: dict[str, Tensor]) -> list[BlockPlan]:
    """Group the selected parameters into capture blocks (one per module; tied ones merged)."""
    name_of = {id(p): n for n, p in params.items()}
    users: dict[int, list[str]] = {}  # param id -> module paths using it directly
    kinds: dict[str, str] = {}
    owned: dict[str, list[str]] = {}  # module path -> its selected parameter names
    for path, module in model.named_modules():
        mine = [name_of[id(p)] for p in module.parameters(recurse=False) if id(p) in name_of]
        if not mine:
            continue
        kinds[path], owned[path] = module_kind(module), mine
        for p in module.parameters(recurse=False):
            if id(p) in name_of:
                users.setdefault(id(p), []).append(path)
    # connected components of modules that share parameters
    parent = {m: m for m in owned}

    def find(m: str) -> str:
        while parent[m] != m:
            parent[m] = parent[parent[m]]
            m = parent[m]
        return m

    for paths in users.values():
        for other in paths[1:]:
            parent[find(other)] = find(paths[0])
    groups: dict[str, list[str]] = {}
    for m in owned:
        groups.setdefault(find(m), []).append(m)
    order = {n: i for i, n in enumerate(params)}
    plans = []
    for members in groups.values():
        names = sorted({n for m in members for n in owned[m]}, key=order.__getitem__)
        member_kinds = {kinds[m] for m in members}
        if len(members) == 1:
            kind = kinds[members[0]]
        else:
            kind = "dense" if "dense" in member_kinds or "norm" in member_kinds else "tied"
        plans.append(BlockPlan(members[0] or names[0], kind, tuple(names), tuple(members)))
    return sorted(plans, key=lambda b: order[b.params[0]])


# ------------------------------------------------------------------------ captured gradients
@dataclass(frozen=True)
class Block:
    """One block's per-example gradients (see `gmcurv.factors`)."""

    name: str
    kind: str
    source: GradientSource

    @property
    def params(self) -> tuple[str, ...]:
        return self.source.names

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return self.source.shapes

    @property
    def dim(self) -> int:
        return self.source.dim


@dataclass(frozen=True)
class DecomposedGradients:
    """Per-example, per-column gradients of every selected parameter, block by block.

    ``F = (1/N) Σ_n Σ_c g[n,c] g[n,c]^T`` over the concatenation of all blocks.
    """

    blocks: tuple[Block, ...]
    fisher: str
    losses: Tensor  # [N] per-example loss

    @property
    def n(self) -> int:
        return int(self.losses.shape[0])

    @property
    def columns(self) -> int:
        return self.blocks[0].source.columns if self.blocks else 1

    @property
    def n_params(self) -> int:
        return sum(b.dim for b in self.blocks)

    def select(self, index: Tensor) -> DecomposedGradients:
        """Restrict to examples `index`."""
        blocks = tuple(replace(b, source=b.source.select(index)) for b in self.blocks)
        return replace(self, blocks=blocks, losses=self.losses[index])

    @staticmethod
    def cat(parts: Sequence[DecomposedGradients]) -> DecomposedGradients:
        """Concatenate batches along examples."""
        first = parts[0]
        if len(parts) == 1:
            return first
        blocks = tuple(
            replace(group[0], source=type(group[0].source).cat([b.source for b in group]))
            for group in zip(*[p.blocks for p in parts], strict=True)
        )
        return replace(first, blocks=blocks, losses=torch.cat([p.losses for p in parts]))


# ------------------------------------------------------------------------------- recording
@dataclass
class _Call:
    inputs: Tensor  # [n, ...]: rows of a flattened [n*k, ...] input are viewed as [n, k, ...]
    output: Tensor
    broadcast: bool = False
    deltas: dict[int, Tensor] = field(default_factory=dict)
    shape: tuple[int, ...] = ()  # the output (and its deltas) seen per example

    def __post_init__(self) -> None:
        self.shape = self.shape or tuple(self.output.shape)


def _delta_hook(recorder: weakref.ref, call: weakref.ref) -> Callable[[Tensor], None]:
    """Tensor hook storing ``∂/∂output`` of the current column into the call's deltas."""

    def hook(g: Tensor) -> None:
        rec, c = recorder(), call()
        if rec is not None and c is not None:
            c.deltas[rec.column] = g.detach().reshape(c.shape)

    return hook


_ROW_WISE = ("linear", "conv1d")  # kinds whose rows may be flattened examples x tokens


def _row_wise(module: nn.Module) -> bool:
    """Does the module act on each row (leading index) of its input independently?"""
    kind = module_kind(module)
    if kind in _ROW_WISE:
        return True
    return kind == "norm" and not isinstance(
        module, (nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
    )


class _Recorder:
    """Forward hooks on the modules of decomposed blocks; collects (input, output, deltas).

    A module applied to a tensor without the batch dimension (a positional embedding
    looked up with ``arange(T)``, or with a leading 1) feeds every example the same output;
    its output is then expanded to ``[n, ...]`` so that its gradient stays per example
    (the first-batch self-check verifies the model's outputs are unchanged by this).
    """

    def __init__(self, model: nn.Module, paths: Sequence[str], n: int):
        self.calls: dict[str, list[_Call]] = {p: [] for p in paths}
        self.n = n
        self.column = 0
        self.active = True
        self.unmapped: dict[str, int] = {}  # module -> leading dim that is not examples
        self._handles = [model.get_submodule(p).register_forward_hook(self._hook(p)) for p in paths]

    def _hook(self, path: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            if not self.active or not torch.is_grad_enabled() or not args:
                return None
            if not isinstance(output, Tensor) or not output.requires_grad or output.ndim == 0:
                return None
            x = args[0]
            rows = output.shape[0]
            if rows != self.n and _row_wise(module) and x.shape[0] == rows:
                if rows % self.n or output.shape[0] == 1:
                    self.unmapped[path] = rows  # no example structure: dense fallback
                    return None
                # flattened [n*k, ...] rows, example-major (checked by the self-check)
                k = rows // self.n
                call = _Call(
                    x.detach().reshape(self.n, k, *x.shape[1:]),
                    output,
                    shape=(self.n, k, *output.shape[1:]),
                )
                self.calls[path].append(call)
                output.register_hook(_delta_hook(weakref.ref(self), weakref.ref(call)))
                return None
            broadcast = rows != self.n
            if broadcast:
                if output.shape[0] == 1 and x.shape[0] == 1:
                    output = output.expand(self.n, *output.shape[1:])
                    x = x.expand(self.n, *x.shape[1:])
                else:
                    output = output.unsqueeze(0).expand(self.n, *output.shape)
                    x = x.unsqueeze(0).expand(self.n, *x.shape)
            call = _Call(x.detach(), output, broadcast)
            self.calls[path].append(call)
            # weak references: a hook on `output` that held the call (which holds `output`)
            # or the recorder would be a cycle through autograd's C++ graph, which Python's
            # garbage collector cannot see — every batch's graph and factors would leak
            output.register_hook(_delta_hook(weakref.ref(self), weakref.ref(call)))
            return output if broadcast else None

        return hook

    def outputs(self) -> list[Tensor]:
        return [c.output for calls in self.calls.values() for c in calls]

    def broadcast_modules(self) -> set[str]:
        return {p for p, calls in self.calls.items() if any(c.broadcast for c in calls)}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@contextlib.contextmanager
def _only_selected_require_grad(model: nn.Module, params: dict[str, Tensor]) -> Iterator[None]:
    """Temporarily freeze parameters outside the selection (saves their backward work)."""
    keep = {id(p) for p in params.values()}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in keep]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


# ------------------------------------------------------------------------- factor builders
def _stack_deltas(call: _Call, columns: int) -> Tensor:
    """``[C, *output.shape]`` (zeros for columns whose gradient did not reach the module)."""
    zero = None
    out = []
    for c in range(columns):
        d = call.deltas.get(c)
        if d is None:
            zero = zero if zero is not None else call.output.new_zeros(call.shape)
            d = zero
        out.append(d)
    return out[0].unsqueeze(0) if columns == 1 else torch.stack(out)


def _tokens(x: Tensor, n: int) -> Tensor:
    """``[n, *lead, D] -> [n, T, D]``."""
    return x.reshape(n, -1, x.shape[-1])


def _linear_source(module: nn.Linear, calls: list[_Call], names: dict, n: int, columns: int):
    a_parts, d_parts = [], []
    for call in calls:
        d = _stack_deltas(call, columns)  # [C, n, *lead, O]
        d_parts.append(d.reshape(columns, n, -1, d.shape[-1]).transpose(0, 1))
        a_parts.append(_tokens(call.inputs, n))
    return _with_bias(_cat(d_parts, 2), _cat(a_parts, 1), module, names)


def _conv1d_source(module: nn.Module, calls: list[_Call], names: dict, n: int, columns: int):
    """Hugging Face ``Conv1D``: a linear map stored ``[I, O]`` (factors marked transposed)."""
    return replace(_linear_source(module, calls, names, n, columns), transposed=True)


def _conv2d_source(module: nn.Conv2d, calls: list[_Call], names: dict, n: int, columns: int):
    a_parts, d_parts = [], []
    for call in calls:
        x = call.inputs
        if module.padding_mode != "zeros":
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            padding = 0
        elif isinstance(module.padding, str):
            padding = _same_padding(module, x)
        else:
            padding = module.padding
        if isinstance(padding, tuple) and len(padding) == 4:  # asymmetric 'same' padding
            x, padding = F.pad(x, padding), 0
        patches = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)
        a_parts.append(patches.transpose(1, 2))  # [n, L, I k k]
        d = _stack_deltas(call, columns)  # [C, n, O, H', W']
        d_parts.append(d.reshape(columns, n, d.shape[2], -1).permute(1, 0, 3, 2))
    return _with_bias(_cat(d_parts, 2), _cat(a_parts, 1), module, names)


def _same_padding(module: nn.Conv2d, x: Tensor) -> tuple[int, ...] | int:
    if module.padding == "valid":
        return 0
    pads: list[int] = []
    for k, d in zip(reversed(module.kernel_size), reversed(module.dilation), strict=True):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


def _with_bias(delta: Tensor, x: Tensor, module: nn.Module, names: dict) -> LinearFactors:
    has_w, has_b = "weight" in names, "bias" in names
    order = [names[k] for k in ("weight", "bias") if k in names]
    shapes = [tuple(getattr(module, k).shape) for k in ("weight", "bias") if k in names]
    return LinearFactors(tuple(order), tuple(shapes), delta, x, has_w, has_b)


def _cat(parts: list[Tensor], dim: int) -> Tensor:
    """``torch.cat`` without the copy when there is one part (the common single call)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _embedding_source(
    module: nn.Embedding, calls: list[_Call], names: dict, n: int, columns: int
) -> EmbeddingFactors:
    idx_parts, d_parts = [], []
    for call in calls:
        idx = call.inputs.reshape(n, -1)
        d = _stack_deltas(call, columns)
        d = d.reshape(columns, n, -1, d.shape[-1]).transpose(0, 1)
        if module.padding_idx is not None:
            d = d * (idx != module.padding_idx)[:, None, :, None].to(d.dtype)
        idx_parts.append(idx)
        d_parts.append(d)
    return EmbeddingFactors(
        (names["weight"],),
        (tuple(module.weight.shape),),
        _cat(d_parts, 2),
        _cat(idx_parts, 1),
    )


def _normalized(module: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """``x̂`` (the input before the affine map) and the dims the parameters broadcast over."""
    if isinstance(module, nn.LayerNorm):
        k = len(module.normalized_shape)
        xh = F.layer_norm(x, module.normalized_shape, eps=module.eps)
        return xh, tuple(range(1, x.ndim - k))
    if hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm):
        k = len(module.normalized_shape)
        xh = F.rms_norm(x, module.normalized_shape, eps=module.eps)
        return xh, tuple(range(1, x.ndim - k))
    if is_hf_rms_norm(module):  # the library's own x̂ (its dtype casts included): w = 1
        ones = {"weight": torch.ones_like(module.weight)}
        with torch.no_grad():
            xh = torch.func.functional_call(module, ones, (x,))
        return xh, tuple(range(1, x.ndim - 1))
    if isinstance(module, nn.GroupNorm):
        xh = F.group_norm(x, module.num_groups, eps=module.eps)
        return xh, tuple(range(2, x.ndim))
    assert isinstance(module, nn.modules.batchnorm._BatchNorm)
    batch_stats = module.training or module.running_mean is None
    xh = F.batch_norm(
        x,
        None if batch_stats else module.running_mean,
        None if batch_stats else module.running_var,
        training=batch_stats,
        eps=module.eps,
    )
    return xh, tuple(range(2, x.ndim))


def _norm_source(
    module: nn.Module, calls: list[_Call], names: dict, n: int, columns: int
) -> DenseGradients:
    parts: dict[str, Tensor] = {}
    for call in calls:
        xh, dims = _normalized(module, call.inputs)
        d = _stack_deltas(call, columns).transpose(0, 1)  # [n, C, *shape]
        sum_dims = tuple(k + 1 for k in dims)  # shifted by the column axis
        grads = {}
        if "weight" in names:
            grads["weight"] = (d * xh[:, None]).sum(sum_dims) if sum_dims else d * xh[:, None]
        if "bias" in names:
            grads["bias"] = d.sum(sum_dims) if sum_dims else d
        for k, v in grads.items():
            parts[k] = v if k not in parts else parts[k] + v
    order = [k for k in ("weight", "bias") if k in names]
    g = torch.cat([parts[k].reshape(n, columns, -1) for k in order], dim=-1)
    shapes = tuple(tuple(getattr(module, k).shape) for k in order)
    return DenseGradients(tuple(names[k] for k in order), shapes, g)


_BUILDERS = {
    "linear": _linear_source,
    "conv1d": _conv1d_source,
    "conv2d": _conv2d_source,
    "embedding": _embedding_source,
    "norm": _norm_source,
}


# ------------------------------------------------------------------------------ the session
CHECK_EXAMPLES = 8  # the one-off self-check runs on the first batch's first examples


def _head(batch: Batch, m: int) -> Batch:
    """The first `m` examples of a batch (same start index: Monte Carlo noise agrees)."""
    targets = None if batch.targets is None else batch.targets[:m]
    return Batch(slice_inputs(batch.inputs, slice(0, m)), targets, batch.start)


class Capturer:
    """Captures `DecomposedGradients` batch by batch for one objective and Fisher type.

    The self-check (`check`) runs once, on the first `CHECK_EXAMPLES` examples of the
    first batch: a hooked capture of that slice against a plain forward and backward.
    """

    def __init__(
        self,
        objective: Objective,
        fisher: str = "empirical",
        mc_samples: int = 1,
        seed: int = 0,
        check: bool = True,
    ):
        if fisher not in FISHER_TYPES:
            raise ConfigError(f"unknown --fisher {fisher!r}", hint=f"use one of {FISHER_TYPES}")
        if mc_samples < 1:
            raise ConfigError(f"--mc-samples must be at least 1, got {mc_samples}")
        self.objective = objective
        self.fisher = fisher
        self.mc_samples = mc_samples
        self.seed = seed
        self.plans = plan_capture(objective.model, objective.params)
        self._check_pending = check
        self.fallbacks: list[str] = []  # blocks moved to dense by the self-check

    @property
    def dense_modules(self) -> list[str]:
        """Module paths whose parameters need dense per-example gradients."""
        return [p.name for p in self.plans if p.kind == "dense"]

    def __call__(self, batch: Batch) -> DecomposedGradients:
        if self._check_pending:
            self._check_pending = False
            n = len(batch)
            small = n <= CHECK_EXAMPLES
            part = batch if small else _head(batch, CHECK_EXAMPLES)
            dg, out, cols, broadcast = self._capture(part)
            bad = self._self_check(part, dg, out, cols, broadcast)
            if bad:
                self.fallbacks += bad
                self.plans = [
                    replace(p, kind="dense", modules=()) if p.name in bad else p for p in self.plans
                ]
            if small and not bad:
                return dg
        return self._capture(batch)[0]

    # --------------------------------------------------------------------------- internals
    def _noise(self, batch: Batch, out: Tensor) -> Tensor | None:
        """Monte Carlo draws for this batch, a function of (seed, example index) only."""
        if self.fisher != "mc":
            return None
        shape, kind = self.objective.loss.noise_spec(out.shape, self.mc_samples)
        return example_noise(
            self.seed, batch.start, out.shape[0], shape, kind, out.dtype, out.device
        )

    def _capture(self, batch: Batch):
        """One hooked forward, one backward per column; (gradients, outputs, columns, ...)."""
        obj = self.objective
        n = batch_size_of(batch.inputs)
        model = obj.model
        hooked = [p for p in self.plans if p.kind != "dense"]
        paths = [m for p in hooked for m in p.modules]
        recorder = _Recorder(model, paths, n)
        try:
            with _only_selected_require_grad(model, obj.params), torch.enable_grad():
                out = obj.outputs(batch.inputs)
                targets = obj.targets(batch, out)
                losses = obj.loss.per_example(out.detach(), targets)
                cols = obj.loss.output_columns(
                    out, targets, self.fisher, self.mc_samples, self._noise(batch, out)
                )
                recorder.active = False
                outputs = recorder.outputs()
                C = cols.shape[0]
                for c in range(C if outputs else 0):
                    recorder.column = c
                    torch.autograd.grad(
                        out,
                        outputs,
                        grad_outputs=cols[c],
                        retain_graph=c < C - 1,
                        allow_unused=True,
                    )
        finally:
            recorder.remove()
        if recorder.unmapped:
            self._unmapped_to_dense(recorder.unmapped, n)
            return self._capture(batch)
        blocks = [Block(plan.name, plan.kind, self._build(plan, recorder, n, C)) for plan in hooked]
        dense = [p for p in self.plans if p.kind == "dense"]
        if dense:
            blocks += self._dense_blocks(dense, batch, cols)
        order = {p.name: i for i, p in enumerate(self.plans)}
        blocks.sort(key=lambda b: order[b.name])
        broadcast = {p.name for p in hooked if set(p.modules) & recorder.broadcast_modules()}
        dg = DecomposedGradients(tuple(blocks), self.fisher, losses.detach())
        return dg, out.detach(), cols, broadcast

    def _unmapped_to_dense(self, unmapped: dict[str, int], n: int) -> None:
        """Move blocks whose module inputs have no example structure to dense (with a note)."""
        bad = [p.name for p in self.plans if set(p.modules) & set(unmapped)]
        self.fallbacks += bad
        self.plans = [
            replace(p, kind="dense", modules=()) if p.name in bad else p for p in self.plans
        ]
        shown = ", ".join(f"{m} ({r} rows)" for m, r in sorted(unmapped.items())[:4])
        warnings.warn(
            f"modules {shown} get inputs whose leading dimension is not a multiple of the "
            f"{n} examples of the batch, so rows cannot be mapped to examples; their "
            "per-example gradients are computed densely instead",
            GmcurvWarning,
            stacklevel=4,
        )

    def _build(self, plan: BlockPlan, recorder: _Recorder, n: int, columns: int):
        model = self.objective.model
        params = self.objective.params
        sources = []
        for path in plan.modules:
            module = model.get_submodule(path)
            local = {
                k: name
                for k, p in module.named_parameters(recurse=False)
                for name in plan.params
                if params[name] is p
            }
            calls = recorder.calls[path]
            kind = module_kind(module)
            if not calls:
                sources.append(self._zero_source(module, local, n, columns))
                continue
            sources.append(_BUILDERS[kind](module, calls, local, n, columns))
        return (
            sources[0]
            if len(sources) == 1
            else SumOfSources(
                plan.params, tuple(tuple(params[k].shape) for k in plan.params), tuple(sources)
            )
        )

    def _zero_source(self, module: nn.Module, local: dict, n: int, columns: int):
        """A module that was not called: its parameters get zero gradient."""
        params = self.objective.params
        names = tuple(local.values())
        shapes = tuple(tuple(params[k].shape) for k in names)
        dim = sum(math.prod(s) for s in shapes)
        ref = params[names[0]]
        return DenseGradients(names, shapes, ref.new_zeros(n, columns, dim))

    def _dense_blocks(self, plans: list[BlockPlan], batch: Batch, cols: Tensor) -> list[Block]:
        """Per-example, per-column gradients via ``vmap`` over examples of ``vjp``."""
        obj = self.objective
        names = [n for p in plans for n in p.params]
        fixed = {k: v.detach() for k, v in obj.params.items() if k not in names}
        primals = {k: obj.params[k].detach() for k in names}

        def one(x, cot):  # x: one example (no batch dim); cot: [C, *out_shape]
            def f(p):
                xb = tree_map(lambda t: t.unsqueeze(0), x)
                return obj.outputs(xb, {**fixed, **p})[0]

            _, pull = vjp(f, primals)
            return vmap(pull)(cot)[0]

        from gmcurv.hessian import twice_differentiable_attention

        try:
            # attention on the math kernel: the fused CPU kernel has no vmap batching rule
            with twice_differentiable_attention():
                g = vmap(one)(batch.inputs, cols.transpose(0, 1))
        except Exception as e:  # torch.func cannot trace some modules (e.g. train-mode BN)
            raise UnsupportedError(
                f"per-example gradients of {', '.join(p.name for p in plans)} could not be "
                f"computed with torch.func: {type(e).__name__}: {str(e).splitlines()[0]}",
                hint="exclude those parameters with --layers, or use --mode eval",
            ) from None
        n, C = cols.shape[1], cols.shape[0]
        blocks = []
        for plan in plans:
            shapes = tuple(tuple(obj.params[k].shape) for k in plan.params)
            flat = torch.cat([g[k].reshape(n, C, -1) for k in plan.params], dim=-1)
            blocks.append(Block(plan.name, "dense", DenseGradients(plan.params, shapes, flat)))
        return blocks

    def _self_check(
        self,
        batch: Batch,
        dg: DecomposedGradients,
        hooked_out: Tensor,
        cols: Tensor,
        broadcast: set[str],
    ) -> list[str]:
        """Blocks to move to dense: checked against a plain, hook-free forward and backward.

        The model's outputs must be unchanged by the hooks (else the broadcast-expanded
        modules are at fault); per block, ``Σ_n g[n, 0]`` must equal autograd's ``J^T G[0]``
        (else a parameter is used outside its module) and, in eval mode, ``g[e, 0]`` must
        equal autograd's gradient of example ``e`` alone for the first and last example
        (else examples mix inside the model, e.g. a batch-less tensor used non-broadcast).
        """
        obj = self.objective
        with _only_selected_require_grad(obj.model, obj.params), torch.enable_grad():
            ref_out = obj.outputs(batch.inputs)
            if ref_out.shape != hooked_out.shape or not torch.allclose(
                ref_out.detach(), hooked_out, rtol=1e-5, atol=1e-6
            ):
                if not broadcast:  # pragma: no cover - hooks never change outputs otherwise
                    raise UnsupportedError("capturing gradients changed the model's outputs")
                warnings.warn(
                    f"modules {', '.join(sorted(broadcast))} run without the batch dimension "
                    "in a way gmcurv cannot expand; their per-example gradients are computed "
                    "densely instead",
                    GmcurvWarning,
                    stacklevel=3,
                )
                return sorted(broadcast)
            params = list(obj.params.values())
            n = dg.n
            probes = sorted({0, n - 1}) if obj.mode == "eval" else []
            masks = [None, *probes]  # None: the sum over the batch; e: example e alone
            refs = []
            for k, e in enumerate(masks):
                cot = cols[0]
                if e is not None:
                    cot = torch.zeros_like(cot)
                    cot[e] = cols[0][e]
                grads = torch.autograd.grad(
                    ref_out,
                    params,
                    grad_outputs=cot,
                    retain_graph=k < len(masks) - 1,
                    allow_unused=True,
                )
                refs.append(dict(zip(obj.params, grads, strict=True)))
        tol = 1e-8 if obj.dtype == torch.float64 else 2e-3
        floors = [
            1e-3
            * math.sqrt(sum(float(g.double().pow(2).sum()) for g in r.values() if g is not None))
            for r in refs
        ]
        u = torch.zeros(dg.n, dg.columns, dtype=obj.dtype, device=obj.device)
        u[:, 0] = 1.0
        bad = []
        for block in dg.blocks:
            if block.kind == "dense":
                continue
            got_sets = [block.source.vjp(u)] + [
                {k: v[0, 0] for k, v in block.source.materialize(slice(e, e + 1)).items()}
                for e in probes
            ]
            for got, ref, floor in zip(got_sets, refs, floors, strict=True):
                if not _agrees(got, ref, block.params, tol, floor):
                    bad.append(block.name)
                    break
        if bad:
            warnings.warn(
                f"the decomposed gradients of {', '.join(bad)} disagree with autograd (a "
                "parameter also used outside its module's forward, e.g. through F.linear, or "
                "examples mixed inside the model); their per-example gradients are computed "
                "densely instead",
                GmcurvWarning,
                stacklevel=3,
            )
        return bad


def _agrees(
    got: dict[str, Tensor], ref: dict[str, Tensor | None], names, tol: float, floor: float
) -> bool:
    """``||got - ref|| <= tol max(||ref||, floor)`` over a block (absent gradients are 0)."""
    err = ref_sq = 0.0
    for name in names:
        g = got[name].double()
        r = ref[name]
        r = torch.zeros_like(g) if r is None else r.double()
        err += float((g - r).pow(2).sum())
        ref_sq += float(r.pow(2).sum())
    return math.sqrt(err) <= tol * max(math.sqrt(ref_sq), floor, 1e-30)


# ------------------------------------------------------------------------------ convenience
def capture(
    objective: Objective,
    batch: Batch,
    fisher: str = "empirical",
    mc_samples: int = 1,
    seed: int = 0,
) -> DecomposedGradients:
    """Decomposed per-example gradients of one batch."""
    return Capturer(objective, fisher, mc_samples, seed)(batch)


def capture_stream(
    objective: Objective,
    data: DataSample,
    batch_size: int,
    fisher: str = "empirical",
    mc_samples: int = 1,
    seed: int = 0,
    progress: ProgressFn | None = None,
    capturer: Capturer | None = None,
    budget_bytes: int | None = None,
    keep: bool = False,
) -> Iterator[DecomposedGradients]:
    """Capture batch after batch (memory: one batch of factors at a time).

    A memory preflight runs first (`gmcurv.memory.preflight_capture`; `budget_bytes`
    None = the default budget); `keep`: the caller holds every batch's factors.
    """
    from gmcurv.memory import preflight_capture

    cap = capturer or Capturer(objective, fisher, mc_samples, seed)
    preflight_capture(objective, data, batch_size, cap.fisher, cap.mc_samples, budget_bytes, keep)
    for batch in data.batches(batch_size, objective.device, objective.dtype):
        dg = cap(batch)
        if progress:
            progress(dg.n)
        yield dg


def capture_all(
    objective: Objective,
    data: DataSample,
    batch_size: int,
    fisher: str = "empirical",
    mc_samples: int = 1,
    seed: int = 0,
    progress: ProgressFn | None = None,
    budget_bytes: int | None = None,
) -> DecomposedGradients:
    """All examples' factors at once (needed for Gram kernels), memory O(N (I+O)) per layer.

    Under torchrun each rank captures its shard and the factors are all-gathered.
    """
    stream = capture_stream(
        objective, data, batch_size, fisher, mc_samples, seed, progress, None, budget_bytes, True
    )
    local = DecomposedGradients.cat(list(stream))
    return gather_decomposed(local)  # all ranks' examples under torchrun
