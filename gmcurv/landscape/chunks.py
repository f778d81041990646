"""Model outputs for a chunk of grid points: stacked, vmapped, or one point at a time.

`ChunkOutputs` tries, in order: the stacked-Linear form (`gmcurv.landscape.stacked`), trusted
only after it agreed with ``vmap`` on the first chunk; ``vmap(functional_call)`` over the
stacked parameters; a loop over the points (models ``vmap`` cannot batch, e.g. data-dependent
control flow). Once a form fails it is not tried again.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor
from torch.func import vmap

from gmcurv.landscape.stacked import (
    Buffers,
    FastLinears,
    LinearFn,
    LinearRoutes,
    NotStackableError,
    affine_chunk,
    affine_point,
    stacked_linear,
)
from gmcurv.objective import Objective

VMAP_ERRORS = (RuntimeError, NotImplementedError, ValueError)


def agree(a: Tensor, b: Tensor) -> bool:
    """Same shape and equal within round-off of the dtype (1e-3 low precision, else 1e-9)."""
    if a.shape != b.shape:
        return False
    tol = 1e-3 if a.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
    return bool(torch.allclose(a, b, rtol=tol, atol=tol * float(b.abs().max().clamp_min(1e-30))))


class ChunkOutputs:
    """Outputs ``[C, B, ...]`` of the model at a chunk of points (see the module docstring).

    `mode` is the form in use ('stacked', 'vmap' or 'loop'); `vmapped` is False once ``vmap``
    failed."""

    def __init__(self, objective: Objective, fast: FastLinears) -> None:
        self.objective = objective
        self.fast = fast
        self.mode = "stacked" if fast.stackable else "vmap"
        self.vmapped = True
        self._trusted = False  # stacked outputs agreed with vmap on the first chunk
        self._buffers = Buffers()
        self._router = LinearRoutes()

    def __call__(
        self, c: Tensor, params: Mapping[str, Tensor], inputs, terms: Mapping[str, Tensor]
    ) -> Tensor:
        """`c` ``[C, K]`` coordinates, `params` the stacked parameters of the chunk, `terms`
        the affine input terms of this batch."""
        outs: Tensor | None = None
        if self.mode == "stacked":
            got = self._stacked(c, params, inputs, terms)
            if self._trusted:
                outs = got
            else:  # the first chunk: run vmap too, and compare
                try:
                    outs = self._vmapped(params, inputs, terms)
                except VMAP_ERRORS:
                    self.vmapped = False
                self._trusted = got is not None and outs is not None and agree(got, outs)
            if not self._trusted or got is None:
                self.mode = "vmap"
        if outs is None and self.vmapped:
            try:
                outs = self._vmapped(params, inputs, terms)
            except VMAP_ERRORS:
                self.vmapped = False  # e.g. data-dependent control flow: loop instead
        if outs is None:
            self.mode = "loop"
            points = [{k: v[j] for k, v in params.items()} for j in range(c.shape[0])]
            outs = torch.stack([self._one(p, inputs, terms) for p in points])
        return outs

    def _call(self, params: Mapping[str, Tensor], inputs, routes: dict[int, LinearFn]) -> Tensor:
        if not routes:
            return self.objective.outputs(inputs, params)
        self._router.routes = routes
        try:
            with self._router:
                return self.objective.outputs(inputs, params)
        finally:
            self._router.routes = {}

    def _affine_routes(self, params, terms, chunk: bool) -> dict[int, LinearFn]:
        if chunk:
            return {
                id(params[w]): affine_chunk(terms[m], self._buffers, m)
                for m, (w, _) in self.fast.affine.items()
            }
        return {id(params[w]): affine_point(terms[m]) for m, (w, _) in self.fast.affine.items()}

    def _stacked(self, c: Tensor, params, inputs, terms) -> Tensor | None:
        routes = self._affine_routes(params, terms, chunk=True)
        for m, (w, _) in self.fast.stacked.items():
            routes[id(params[w])] = stacked_linear(self._buffers, m)
        try:
            out = self._call(params, inputs, routes)
        except (NotStackableError, RuntimeError, ValueError, IndexError):
            return None
        return out if isinstance(out, Tensor) and out.shape[0] == c.shape[0] else None

    def _one(self, params, inputs, terms) -> Tensor:
        return self._call(params, inputs, self._affine_routes(params, terms, chunk=False))

    def _vmapped(self, params, inputs, terms) -> Tensor:
        return vmap(lambda p: self._one(p, inputs, terms))(dict(params))
