"""Recording a forward/backward pass: module inputs via forward hooks, output cotangents
``delta`` via tensor hooks, one entry per call of each module."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gmcurv.capture.plan import module_kind


@dataclass
class Call:
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
            if rec.tick is not None:
                rec.tick(1)

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


class Recorder:
    """Forward hooks on the modules of decomposed blocks; collects (input, output, deltas).

    A module applied to a tensor without the batch dimension (a positional embedding
    looked up with ``arange(T)``, or with a leading 1) feeds every example the same output;
    its output is then expanded to ``[n, ...]`` so that its gradient stays per example
    (the first-batch self-check verifies the model's outputs are unchanged by this).
    """

    def __init__(
        self,
        model: nn.Module,
        paths: Sequence[str],
        n: int,
        tick: Callable[[float], None] | None = None,
    ):
        self.calls: dict[str, list[Call]] = {p: [] for p in paths}
        self.tick = tick  # called once per recorded call and once per cotangent stored
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
                call = Call(
                    x.detach().reshape(self.n, k, *x.shape[1:]),
                    output,
                    shape=(self.n, k, *output.shape[1:]),
                )
                self._record(path, call)
                return None
            broadcast = rows != self.n
            if broadcast:
                if output.shape[0] == 1 and x.shape[0] == 1:
                    output = output.expand(self.n, *output.shape[1:])
                    x = x.expand(self.n, *x.shape[1:])
                else:
                    output = output.unsqueeze(0).expand(self.n, *output.shape)
                    x = x.unsqueeze(0).expand(self.n, *x.shape)
            self._record(path, Call(x.detach(), output, broadcast))
            return output if broadcast else None

        return hook

    def _record(self, path: str, call: Call) -> None:
        self.calls[path].append(call)
        # weak references: a hook on `output` that held the call (which holds `output`) or
        # the recorder would be a cycle through autograd's C++ graph, which Python's
        # garbage collector cannot see — every batch's graph and factors would leak
        call.output.register_hook(_delta_hook(weakref.ref(self), weakref.ref(call)))
        if self.tick is not None:
            self.tick(1)

    def outputs(self) -> list[Tensor]:
        return [c.output for calls in self.calls.values() for c in calls]

    def broadcast_modules(self) -> set[str]:
        return {p for p, calls in self.calls.items() if any(c.broadcast for c in calls)}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@contextlib.contextmanager
def only_selected_require_grad(model: nn.Module, params: dict[str, Tensor]) -> Iterator[None]:
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
