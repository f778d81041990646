"""Fast paths for Linear layers when many grid points share one forward pass.

A chunk of ``C`` grid points is a set of stacked parameters ``θ_c = θ0 + Σ_k c_k d_k``
(``[C, *shape]`` each), run through the model with `torch.func.functional_call`. Two kinds
of ``nn.Linear`` layer have a cheaper form than ``vmap`` over the points:

- **input layers** (`input_linears`): applied once to the raw input tensor ``x``; their
  output is affine in the coordinates, ``x (W0 + Σ c_k D_k)ᵀ + b0 + Σ c_k db_k =
  base + Σ c_k proj_k``. The terms ``[K+1, B, out]`` are computed once per batch
  (`affine_terms`) and each point costs a ``[1, K+1] x [K+1, B·out]`` product; the layer's
  weight slot in the parameters carries the point's coordinates instead of a weight.
- **stacked layers** (`stackable_linears`): when *every* selected parameter sits in a Linear
  layer called once, the whole chunk runs without ``vmap``: each layer sees ``[C, B.., in]``
  and its stacked weight ``[C, out, in]`` and computes one ``baddbmm``.

No module is modified: `LinearRoutes` is a `TorchFunctionMode` that, for the duration of one
functional call, sends ``F.linear`` to the stacked or affine product when its weight *is*
(by identity) one of the tensors handed to ``functional_call``; every other op runs as is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from gmcurv.objective import Objective

Names = tuple[str, str | None]  # (weight, bias) parameter names of a Linear layer
LinearFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]  # (input, weight, bias) -> out


class NotStackableError(Exception):
    """A stacked Linear layer saw an input without the leading chunk dimension."""


class LinearRoutes(TorchFunctionMode):
    """``F.linear(x, w, b)`` -> ``routes[id(w)](x, w, b)`` for the routed weights; other
    calls run unchanged. `routes` is set per call (the tensors it names are alive then)."""

    def __init__(self) -> None:
        super().__init__()
        self.routes: dict[int, LinearFn] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear and len(args) >= 2:
            route = self.routes.get(id(args[1]))
            if route is not None:
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                return route(args[0], args[1], bias)
        return func(*args, **kwargs)


class Buffers:
    """A reused output tensor per layer and shape: large temporaries are not returned to the
    OS and re-faulted on every chunk (a chunk's outputs are consumed before the next runs)."""

    def __init__(self) -> None:
        self._held: dict[tuple, Tensor] = {}

    def get(self, key: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        if (key, shape) not in self._held:
            self._held[(key, shape)] = like.new_empty(shape)
        return self._held[(key, shape)]


def stacked_linear(buffers: Buffers, key: str) -> LinearFn:
    """``x [C, B.., in]``, ``W [C, out, in]``, ``b [C, out]`` -> ``x_c W_cᵀ + b_c`` per point."""

    def run(x: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
        if x.shape[0] != W.shape[0]:
            raise NotStackableError
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])
        buf = buffers.get(key, (x3.shape[0], x3.shape[1], W.shape[1]), x3)
        if b is None:
            out = torch.bmm(x3, W.transpose(1, 2), out=buf)
        else:
            out = torch.baddbmm(b.unsqueeze(1), x3, W.transpose(1, 2), out=buf)
        return out.reshape(*x.shape[:-1], W.shape[1])

    return run


def affine_chunk(terms: Tensor, buffers: Buffers, key: str) -> LinearFn:
    """Input layer for a chunk: the weight slot holds the coordinates ``c [C, K]``;
    ``[1, c] @ terms`` gives ``[C, B.., out]`` (the layer's input is not needed)."""

    def run(_x: Tensor, c: Tensor, _b: Tensor | None) -> Tensor:
        ones = torch.ones_like(c[:, :1])
        flat = terms.reshape(terms.shape[0], -1)
        buf = buffers.get(key, (c.shape[0], flat.shape[1]), flat)
        out = torch.mm(torch.cat([ones, c], 1), flat, out=buf)
        return out.reshape(c.shape[0], *terms.shape[1:])

    return run


def affine_point(terms: Tensor) -> LinearFn:
    """Input layer for one point (also under ``vmap``): weight slot = coordinates ``[K]``."""

    def run(_x: Tensor, cv: Tensor, _b: Tensor | None) -> Tensor:
        return torch.tensordot(torch.cat([torch.ones_like(cv[:1]), cv]), terms, dims=1)

    return run


def affine_terms(
    x: Tensor,
    layers: Mapping[str, Names],
    center: Mapping[str, Tensor],
    dirs: list[Mapping[str, Tensor]],
) -> dict[str, Tensor]:
    """Per input layer ``[K+1, B, out]``: ``x W0ᵀ + b0``, then ``x D_kᵀ + db_k`` per direction."""
    terms = {}
    for mname, (w, b) in layers.items():
        rows = [
            torch.nn.functional.linear(x, src[w], src[b] if b else None) for src in (center, *dirs)
        ]
        terms[mname] = torch.stack(rows)
    return terms


# ----------------------------------------------------------------------- which layers qualify
def _probe_linears(objective: Objective, inputs) -> tuple[dict[str, int], set[str]]:
    """Calls per ``nn.Linear`` module in one forward, and those fed the raw input tensor."""
    calls: dict[str, int] = {}
    direct: set[str] = set()
    handles = []
    for mname, m in objective.model.named_modules():
        if type(m) is torch.nn.Linear:

            def pre(_m, args, mname=mname):
                calls[mname] = calls.get(mname, 0) + 1
                if args and args[0] is inputs:
                    direct.add(mname)

            handles.append(m.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            objective.outputs(inputs)
    finally:
        for h in handles:
            h.remove()
    return calls, direct


def _own_params(objective: Objective, mname: str) -> Names | None:
    """(weight, bias) names of Linear `mname` if all are selected and untied, else None."""
    owners: dict[int, int] = {}
    for _, p in objective.model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    m = objective.model.get_submodule(mname)
    prefix = f"{mname}." if mname else ""
    w, b = prefix + "weight", (prefix + "bias") if m.bias is not None else None
    names = [w] + ([b] if b else [])
    ok = all(n in objective.params and owners[id(objective.params[n])] == 1 for n in names)
    return (w, b) if ok else None


def input_linears(objective: Objective, inputs) -> dict[str, Names]:
    """``nn.Linear`` modules applied once, directly, to the model's input tensor, whose
    weight (and bias, if any) are selected and not tied: ``{module: (weight, bias)}``."""
    if not isinstance(inputs, Tensor):
        return {}
    calls, direct = _probe_linears(objective, inputs)
    out = {}
    for mname in sorted(direct):
        own = _own_params(objective, mname) if calls.get(mname) == 1 else None
        if own is not None:
            out[mname] = own
    return out


def stackable_linears(objective: Objective, inputs) -> dict[str, Names]:
    """All ``nn.Linear`` modules holding selected parameters, when those are *all* the
    selected parameters (untied, each module called once): such models can run a chunk of
    grid points as stacked weights ``[C, out, in]`` through ``baddbmm`` without ``vmap``
    (checked against ``vmap`` on the first chunk before it is trusted). Else ``{}``."""
    if not isinstance(inputs, Tensor):
        return {}
    calls, _ = _probe_linears(objective, inputs)
    out: dict[str, Names] = {}
    for mname, count in calls.items():
        own = _own_params(objective, mname)
        if own is None or count != 1:
            continue
        out[mname] = own
    covered = {n for names in out.values() for n in names if n is not None}
    return out if covered == set(objective.params) else {}


@dataclass
class FastLinears:
    """The layers with a fast form: `affine` input layers and the other `stacked` layers
    (``{module: (weight, bias)}``); `stackable` when the whole model can run stacked."""

    affine: dict[str, Names]
    stacked: dict[str, Names]
    stackable: bool

    @classmethod
    def plan(cls, objective: Objective, inputs, *, affine: bool, stacked: bool) -> FastLinears:
        aff = input_linears(objective, inputs) if affine else {}
        stack = stackable_linears(objective, inputs) if stacked else {}
        return cls(aff, {m: n for m, n in stack.items() if m not in aff}, bool(stack))

    @property
    def affine_params(self) -> set[str]:
        """Parameters of the affine layers (their slots carry coordinates, not weights)."""
        return {n for names in self.affine.values() for n in names if n is not None}
