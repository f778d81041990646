"""Hessian and GGN as matrix-free operators over the objective's flat parameter space.

``H = ∇² L(θ)`` and ``G = (1/N) Σ_n J_n^T Λ_n J_n`` (``Λ_n`` the loss Hessian w.r.t. the
outputs, see `gmcurv.losses`) for ``L = (1/N) Σ_n L_n``, and their difference
``R = H - G = (1/N) Σ_n Σ_o r[n,o] ∇²f[n,o]`` with ``r = ∂L_n/∂f_n`` held fixed (the
"residual" kind: the Hessian of ``θ -> <r, f(θ)>``). Products accumulate over data
batches in a fixed order, checked on every pass (a batch fingerprint per position).
Hessian-vector products use forward-over-reverse (``torch.func.jvp`` of
``torch.func.grad``) through ``functional_call`` and fall back to reverse-over-reverse
automatically when an op has no forward-mode rule.
``.backward(create_graph=True)`` is never used. ``F.scaled_dot_product_attention`` runs on
PyTorch's math kernel inside these products: the fused kernels (the CPU flash kernel in
torch 2.13) have neither a forward-mode rule nor a differentiable backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp, vmap

from gmcurv.data import Batch, DataSample
from gmcurv.errors import ConfigError, DataError
from gmcurv.fisher import LayerCurvature
from gmcurv.lanczos import lanczos
from gmcurv.objective import Objective
from gmcurv.params import ParamSpace
from gmcurv.results import Estimate

CURVATURES = ("hessian", "ggn", "residual")


def twice_differentiable_attention() -> contextlib.AbstractContextManager:
    """Route ``scaled_dot_product_attention`` to the math kernel (second-order safe)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _detached(objective: Objective) -> dict[str, Tensor]:
    return {k: p.detach() for k, p in objective.params.items()}


def batch_hvp(
    objective: Objective, batch: Batch, vector: dict[str, Tensor], forward_mode: bool = True
) -> dict[str, Tensor]:
    """``∇²(Σ_n L_n) v`` on one batch (sum over its examples)."""
    with twice_differentiable_attention():
        return _batch_hvp(objective, batch, vector, forward_mode)


def _batch_hvp(
    objective: Objective, batch: Batch, vector: dict[str, Tensor], forward_mode: bool
) -> dict[str, Tensor]:
    params = _detached(objective)

    def total(p: dict[str, Tensor]) -> Tensor:
        return objective.per_example_loss(batch, p).sum()

    if forward_mode:
        return jvp(grad(total), (params,), (vector,))[1]

    # reverse-over-reverse: ∇_θ <∇_θ L, v>
    def directional(p: dict[str, Tensor]) -> Tensor:
        g = grad(total)(p)
        return sum((g[k] * vector[k]).sum() for k in g)  # type: ignore[return-value]

    return grad(directional)(params)


def batch_ggnvp(
    objective: Objective, batch: Batch, vector: dict[str, Tensor], forward_mode: bool = True
) -> dict[str, Tensor]:
    """``Σ_n J_n^T Λ_n J_n v`` on one batch."""
    with twice_differentiable_attention():
        return _batch_ggnvp(objective, batch, vector, forward_mode)


def _batch_ggnvp(
    objective: Objective, batch: Batch, vector: dict[str, Tensor], forward_mode: bool
) -> dict[str, Tensor]:
    params = _detached(objective)

    def f(p: dict[str, Tensor]) -> Tensor:
        return objective.outputs(batch.inputs, p)

    out, pull = vjp(f, params)
    if forward_mode:
        jv = jvp(f, (params,), (vector,))[1]
    else:  # J v = d/du <J^T u, v> via double vjp
        u = torch.zeros_like(out, requires_grad=True)
        with torch.enable_grad():
            jtu = pull(u)[0]
            dot = sum((jtu[k] * vector[k]).sum() for k in jtu)
            jv = torch.autograd.grad(dot, u)[0]
    targets = objective.targets(batch, out)
    lam_jv = objective.loss.output_hessian_vp(out.detach(), targets, jv.detach())
    return pull(lam_jv)[0]


def output_residuals(objective: Objective, batch: Batch) -> Tensor:
    """``r = ∂(Σ_n L_n)/∂f`` at the current parameters (outputs' shape, detached)."""
    with torch.enable_grad():
        out = objective.outputs(batch.inputs, _detached(objective)).detach().requires_grad_(True)
        total = objective.loss.per_example(out, objective.targets(batch, out)).sum()
        return torch.autograd.grad(total, out)[0].detach()


def batch_residual_vp(
    objective: Objective,
    batch: Batch,
    vector: dict[str, Tensor],
    forward_mode: bool = True,
    residuals: Tensor | None = None,
) -> dict[str, Tensor]:
    """``Σ_n Σ_o r[n,o] ∇²f[n,o] v`` on one batch: the batch's ``(H - G) v`` (times its size)."""
    r = output_residuals(objective, batch) if residuals is None else residuals
    with twice_differentiable_attention():
        params = _detached(objective)

        def total(p: dict[str, Tensor]) -> Tensor:
            return (objective.outputs(batch.inputs, p) * r).sum()

        if forward_mode:
            return jvp(grad(total), (params,), (vector,))[1]

        def directional(p: dict[str, Tensor]) -> Tensor:
            g = grad(total)(p)
            return sum((g[k] * vector[k]).sum() for k in g)  # type: ignore[return-value]

        return grad(directional)(params)


def _checksum(t: Tensor | dict[str, Tensor] | None) -> float:
    """Order-sensitive checksum of a batch's rows (``Σ_i (i+1) rowsum_i``)."""
    if t is None:
        return 0.0
    if isinstance(t, dict):
        return sum(_checksum(v) for v in t.values())
    rows = t.detach().reshape(t.shape[0], -1).double().sum(1)
    weights = torch.arange(1, rows.numel() + 1, dtype=torch.float64, device=rows.device)
    return float((rows * weights).sum())


def fingerprint(batch: Batch) -> tuple[int, int, float, float]:
    """What identifies a batch across passes: start index, size, input and target checksums."""
    return (batch.start, len(batch), _checksum(batch.inputs), _checksum(batch.targets))


def _nbytes(batch: Batch) -> int:
    parts = list(batch.inputs.values()) if isinstance(batch.inputs, dict) else [batch.inputs]
    if batch.targets is not None:
        parts.append(batch.targets)
    return sum(t.numel() * t.element_size() for t in parts)


DEFAULT_CACHE_BYTES = 256 * 2**20  # keep the data sample in memory up to this size
DEFAULT_GRAPH_BYTES = 2**30  # at least this much for per-batch gradient graphs (Hessian, eval)


def default_graph_bytes() -> int:
    """Graph cache budget: a quarter of the memory available now, shared by the ranks on
    this host (torchrun's ``LOCAL_WORLD_SIZE``), at least 1 GiB.

    Over budget the graphs are dropped and every product recomputes its batch's forward
    and backward (about 2x the time, bounded memory), so a generous default only trades
    memory that is free anyway for speed.
    """
    import os

    from gmcurv.memory import available_bytes

    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(DEFAULT_GRAPH_BYTES, available_bytes() // (4 * local_ranks))


@dataclass
class CurvatureOperator:
    """``v -> C v`` for ``C`` the Hessian, the GGN or their difference (``kind='residual'``)
    of the mean loss over `data` (flat vectors).

    Counts products in `n_matvecs`. Forward mode is tried first and switched off for good
    on ``NotImplementedError``. Batches are kept in memory after the first pass when the
    sample is at most `cache_bytes`; otherwise they are re-read on every product and
    checked against the first pass's fingerprints (`DataError` if the order changed).
    """

    objective: Objective
    data: DataSample
    batch_size: int = 256
    kind: str = "hessian"
    forward_mode: bool = True
    n_matvecs: int = 0
    progress: Callable[[int], None] | None = None
    _batches: list[Batch] | None = field(default=None, repr=False)
    cache_bytes: int = DEFAULT_CACHE_BYTES
    _prints: list[tuple] | None = field(default=None, repr=False)
    _residuals: dict[int, Tensor] = field(default_factory=dict, repr=False)
    cache_graph: bool | None = None
    graph_bytes: int = field(default_factory=default_graph_bytes)
    _graphs: dict[int, tuple[list[Tensor], tuple[Tensor, ...]]] = field(
        default_factory=dict, repr=False
    )
    _graph_held: int = field(default=0, repr=False)
    merge: bool = True  # one whole-sample graph when the budget allows (`whole_sample_batch`)

    def __post_init__(self) -> None:
        if self.kind not in CURVATURES:
            raise ConfigError(f"unknown curvature {self.kind!r}", hint=f"use one of {CURVATURES}")

    @property
    def space(self) -> ParamSpace:
        return self.objective.space

    @property
    def size(self) -> int:
        return self.space.size

    @property
    def n(self) -> int:
        """Examples averaged over (all ranks' under torchrun)."""
        from gmcurv.distributed import current

        return self.data.n_total if current().active else self.data.n

    @staticmethod
    def _reduce(out: dict[str, Tensor]) -> dict[str, Tensor]:
        """Sum partial products over ranks under torchrun (each holds a shard)."""
        from gmcurv.distributed import current

        comm = current()
        return {k: comm.all_reduce(v) for k, v in out.items()} if comm.active else out

    def batches(self):
        """The data's batches in a fixed order (cached, or re-read and fingerprint-checked)."""
        if self._batches is not None:
            yield from self._batches
            return
        first_pass = self._prints is None
        prints: list[tuple] = []
        kept: list[Batch] | None = []
        held = 0
        stream = self.data.batches(self.batch_size, self.objective.device, self.objective.dtype)
        for i, batch in enumerate(stream):
            fp = fingerprint(batch)
            prints.append(fp)
            if first_pass:
                if kept is not None:
                    held += _nbytes(batch)
                    kept = [*kept, batch] if held <= self.cache_bytes else None
            elif i >= len(self._prints) or self._prints[i] != fp:  # type: ignore[arg-type]
                raise self._order_error(f"batch {i}, starting at example {batch.start}")
            yield batch
        if first_pass:
            self._prints, self._batches = prints, kept
            if kept is None:
                self._residuals.clear()  # nothing is cached when the batches are not
                self._drop_graphs()
        elif len(prints) != len(self._prints):  # type: ignore[arg-type]
            raise self._order_error("the number of batches")

    def _order_error(self, what: str) -> DataError:
        return DataError(
            f"{self.data.path}: the data changed between passes ({what} differs from the "
            "first pass)",
            hint="curvature products need the same batches in the same order on every pass: "
            "do not shuffle, and keep the files unchanged while gmcurv runs",
        )

    def _residual(self, index: int, batch: Batch) -> Tensor:
        if index not in self._residuals:
            r = output_residuals(self.objective, batch)
            if self._batches is not None or self._prints is None:  # cached, or first pass
                self._residuals[index] = r
            return r
        return self._residuals[index]

    # -- cached gradient graphs: H v = ∇<g, v> by one backward through g's graph ----------
    def _graph_wanted(self) -> bool:
        if self.kind == "ggn" or self.objective.mode != "eval" or self.cache_graph is False:
            return False
        return self._batches is not None or self._prints is None  # cached data, or first pass

    def _drop_graphs(self) -> None:
        self._graphs.clear()
        self._graph_held = 0
        if self.cache_graph is None:
            self.cache_graph = False

    def _graph(self, index: int, batch: Batch) -> tuple[list[Tensor], tuple[Tensor, ...]] | None:
        """``(leaves, g)`` with ``g = ∇(Σ_n L_n)`` (Hessian) or ``g = ∇<f, r>`` (residual,
        ``r`` fixed) built with ``create_graph`` (kept while
        all batches' graphs fit in `graph_bytes`, counted through saved tensors)."""
        if index in self._graphs:
            return self._graphs[index]
        held = [0]

        def pack(t: Tensor) -> Tensor:
            held[0] += t.numel() * t.element_size()
            return t

        names = self.space.names
        r = self._residual(index, batch) if self.kind == "residual" else None
        leaves = [self.objective.params[k].detach().requires_grad_(True) for k in names]
        with (
            twice_differentiable_attention(),
            torch.enable_grad(),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            params = dict(zip(names, leaves, strict=True))
            if self.kind == "residual":  # (H - G) v = ∇<∇<f, r>, v> with r held fixed
                total = (self.objective.outputs(batch.inputs, params) * r).sum()
            else:
                total = self.objective.per_example_loss(batch, params).sum()
            g = torch.autograd.grad(total, leaves, create_graph=True)
        self._graph_held += held[0]
        if self._graph_held > self.graph_bytes:
            self._drop_graphs()
            return None
        self._graphs[index] = (leaves, g)
        return self._graphs[index]

    def _graph_product(self, index: int, batch: Batch, vec: dict[str, Tensor], batched: bool):
        graph = self._graph(index, batch) if self._graph_wanted() else None
        if graph is None:
            return None
        leaves, g = graph
        names = self.space.names
        live = [i for i, t in enumerate(g) if t.requires_grad]  # constant parts: no curvature
        if not live:
            return {k: vec[k].new_zeros(vec[k].shape) for k in names}
        outs = [vec[names[i]] for i in live]
        with torch.enable_grad():
            hv = torch.autograd.grad(
                [g[i] for i in live],
                leaves,
                grad_outputs=outs,
                retain_graph=True,
                is_grads_batched=batched,
                allow_unused=True,
            )
        return {
            k: vec[k].new_zeros(vec[k].shape) if t is None else t.detach()
            for k, t in zip(names, hv, strict=True)
        }

    def _call(self, index: int, batch: Batch, vec: dict[str, Tensor], forward: bool):
        if self.kind == "hessian":
            if index >= 0 and (out := self._graph_product(index, batch, vec, False)) is not None:
                return out
            return batch_hvp(self.objective, batch, vec, forward)
        if self.kind == "ggn":
            return batch_ggnvp(self.objective, batch, vec, forward)
        if index >= 0 and (out := self._graph_product(index, batch, vec, False)) is not None:
            return out
        r = self._residual(index, batch)
        return batch_residual_vp(self.objective, batch, vec, forward, r)

    def _batch_product(
        self, batch: Batch, vec: dict[str, Tensor], index: int = -1
    ) -> dict[str, Tensor]:
        if self.forward_mode:
            try:
                return self._call(index, batch, vec, True)
            except (NotImplementedError, RuntimeError) as e:
                if "forward" not in str(e).lower() and not isinstance(e, NotImplementedError):
                    raise
                self.forward_mode = False
        return self._call(index, batch, vec, False)

    def _product_batches(self):
        """`batches`, merged into one once the sample's gradient graph is known to fit
        `graph_bytes` (`whole_sample_batch`: one backward per product, as PyHessian does)."""
        if self.merge and len(self._graphs) > 1:
            whole_sample_batch(self)
        return self.batches()

    def matvec_dict(self, vector: dict[str, Tensor]) -> dict[str, Tensor]:
        """``C v`` in parameter layout."""
        out: dict[str, Tensor] | None = None
        for i, batch in enumerate(self._product_batches()):
            part = self._batch_product(batch, vector, i)
            out = part if out is None else {k: out[k] + part[k] for k in out}
        assert out is not None
        out = self._reduce(out)
        self.n_matvecs += 1
        if self.progress:
            self.progress(1)
        return {k: v / self.n for k, v in out.items()}

    def matvec(self, v: Tensor) -> Tensor:
        """``C v`` for a flat vector (any float dtype; computed in the model's dtype)."""
        vec = self.space.unflatten(v.to(self.objective.dtype))
        return self.space.flatten(self.matvec_dict(vec)).to(v.dtype)

    __call__ = matvec

    def matmat(self, V: Tensor) -> Tensor:
        """``C V^T`` for ``V: [m, P]`` (rows are vectors), ``[m, P]``; the products of one
        batch run vectorised with ``torch.func.vmap`` when the model allows, else in a loop."""
        vecs = self.space.unflatten(V.to(self.objective.dtype))
        out: dict[str, Tensor] | None = None
        for i, batch in enumerate(self._product_batches()):
            part = self._batch_matmat(batch, vecs, i, V.shape[0])
            out = part if out is None else {k: out[k] + part[k] for k in out}
        assert out is not None
        out = self._reduce(out)
        self.n_matvecs += V.shape[0]
        if self.progress:
            self.progress(V.shape[0])
        m = V.shape[0]
        flat = torch.cat([out[k].reshape(m, -1) for k in self.space.names], dim=1)  # [m, P]
        return (flat / self.n).to(V.dtype)

    _vmap_ok: bool = True

    def _batch_matmat(self, batch: Batch, vecs: dict[str, Tensor], index: int, m: int):
        if self.kind == "hessian" and self._vmap_ok and self._graph_wanted():
            try:
                out = self._graph_product(index, batch, vecs, True)
                if out is not None:
                    return out
            except Exception:  # no batching rule somewhere: one product at a time
                self._vmap_ok = False
        if self._vmap_ok:
            if self.kind == "residual":
                self._residual(index, batch)  # computed outside vmap
            try:
                return vmap(lambda v: self._batch_product(batch, v, index))(vecs)
            except Exception:  # no batching rule somewhere: one product at a time
                self._vmap_ok = False
        rows = [
            self._batch_product(batch, {k: t[j] for k, t in vecs.items()}, index) for j in range(m)
        ]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def is_random(self, seed: int = 0) -> bool:
        """Whether products are random (train mode with active Dropout): two products with
        the same vector disagree. Costs two products, and only in that case."""
        if self.objective.mode != "train" or not any(
            isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0
            for m in self.objective.model.modules()
        ):
            return False
        gen = torch.Generator(device=self.objective.device).manual_seed(seed)
        v = torch.randn(self.size, generator=gen, dtype=torch.float64, device=self.objective.device)
        a, b = self.matvec(v), self.matvec(v)
        return not torch.allclose(a, b, rtol=1e-6, atol=1e-12)


def whole_sample_batch(op: CurvatureOperator) -> bool:
    """After a first pass that kept every batch's data and gradient graph within the
    budget, make the sample one batch: its graph holds the same saved tensors (their
    measured sum fits), and a product becomes one backward over the whole sample instead
    of one per batch (fewer, larger kernels; values equal up to summation order). The
    per-batch graphs and residuals are dropped and rebuilt once for the merged batch.
    Decided once; False when the first pass did not keep everything."""
    op.merge = False
    n_batches = len(op._prints or [])
    if op._batches is None or len(op._graphs) != n_batches or not op._graph_wanted():
        return False
    from gmcurv.data import concat_batches

    merged = concat_batches(op._batches)
    op._graphs.clear()
    op._graph_held = 0
    op._residuals.clear()
    op._batches = [merged]
    op._prints = [fingerprint(merged)]
    return True


# ------------------------------------------------------------------------------ dense
DENSE_MAX_PARAMS = 2000  # --method auto: dense below this many parameters ...
DENSE_MAX_WORK = 20_000_000  # ... and N * P at most this (P products over N examples)


def dense_matrix(op: CurvatureOperator, budget_bytes: int | None = None) -> Tensor:
    """The ``[P, P]`` matrix (float64, symmetrised) from ``P`` products with basis vectors."""
    from gmcurv.memory import preflight

    P = op.size
    preflight(
        8.0 * P * P * 2,
        budget_bytes,
        f"the dense {P} x {P} curvature matrix",
        "use --method hutchpp / lanczos, or restrict --layers",
    )
    A = torch.zeros(P, P, dtype=torch.float64)
    chunk = max(1, min(P, 256))
    for lo in range(0, P, chunk):
        hi = min(P, lo + chunk)
        E = torch.zeros(hi - lo, P, dtype=torch.float64, device=op.objective.device)
        E[torch.arange(hi - lo), torch.arange(lo, hi)] = 1.0
        A[lo:hi] = op.matmat(E).double().cpu()
    return (A + A.T) / 2


def resolve_method(method: str, n_params: int, n: int) -> str:
    """``auto`` -> ``exact`` for tiny problems (dense matrix), else ``hutchpp``."""
    if method != "auto":
        return method
    if n_params <= DENSE_MAX_PARAMS and n_params * n <= DENSE_MAX_WORK:
        return "exact"
    return "hutchpp"


# ------------------------------------------------------------------- exact GGN trace
EXACT_GGN_MAX_COLUMNS = 256  # C-class factors per example beyond which auto goes stochastic
DEFAULT_TRACE_RTOL = 0.01  # stochastic traces stop at 1 % relative standard error


def _ggn_scale(objective: Objective, batch: Batch) -> Tensor | None:
    """Per-example factor turning the exact Fisher into the GGN (None: they are equal).

    Cross-entropy averaged over an example's ``T_n`` valid tokens has token weights
    ``w = 1/T_n``: the exact Fisher is ``Σ_t w^2 J_t^T Λ_t J_t`` and the GGN
    ``Σ_t w J_t^T Λ_t J_t``, so ``GGN_n = T_n F_n``. For MSE (``Λ = (2/E) I``) and one
    prediction per example they coincide.
    """
    from gmcurv.losses import IGNORE_INDEX, CrossEntropy

    loss = objective.loss
    if not isinstance(loss, CrossEntropy):
        return None
    tgt = objective.targets(batch, None)  # type: ignore[arg-type]  # CE ignores outputs
    if loss.shift:
        tgt = tgt[:, 1:]
    if tgt.ndim < 2:
        return None
    return (tgt != IGNORE_INDEX).reshape(tgt.shape[0], -1).sum(1).clamp_min(1).double()


def exact_ggn_columns(objective: Objective, data: DataSample) -> int:
    """C-class factor columns per example the exact GGN trace needs."""
    example = data.first(1, objective.device, objective.dtype)
    with torch.no_grad():
        out = objective.outputs(example.inputs)
    return objective.loss.n_columns(out.shape, "exact", 1)


def exact_ggn_trace(
    objective: Objective,
    data: DataSample,
    batch_size: int = 256,
    budget_bytes: int | None = None,
    progress: Callable[[int], None] | None = None,
    check: bool = True,
):
    """``tr G`` per block from the C-class square-root factors (no products):
    ``tr G = (1/N) Σ_n s_n Σ_c ||g[n,c]||^2`` with ``s_n`` from `_ggn_scale`.

    Returns a `gmcurv.fisher.FisherAccumulator` whose ``trace(block)`` gives the value on
    the sample and the standard error over examples. `check`: the capture's first-batch
    self-check against autograd (`gmcurv.capture.Capturer`); leave on unless the model's
    capture was already verified.
    """
    from gmcurv.capture import Capturer
    from gmcurv.fisher import FisherAccumulator
    from gmcurv.memory import preflight_capture

    cap = Capturer(objective, "exact", check=check)
    preflight_capture(objective, data, batch_size, "exact", 1, budget_bytes, False)
    acc = FisherAccumulator(diagonal=False)
    for batch in data.batches(batch_size, objective.device, objective.dtype):
        dg = cap(batch)
        scale = _ggn_scale(objective, batch)
        for b in dg.blocks:
            acc.block_params[b.name] = b.params
            acc.block_kinds[b.name] = b.kind
            s = b.source.sq_norms().sum(1).double()
            acc.sq_norms.setdefault(b.name, []).append(s if scale is None else s * scale)
        acc.losses.append(dg.losses.double())
        if progress:
            progress(dg.n)
    return acc.gathered()  # all ranks' examples under torchrun


# ------------------------------------------------------------------ command level
@dataclass(frozen=True)
class CurvatureSummary:
    """Trace (total, per layer) and top eigenvalues of the Hessian or GGN on a sample."""

    kind: str
    method: str
    trace: Estimate
    eigenvalues: list[Estimate]
    per_layer: dict[str, LayerCurvature]
    n_params: int
    n_matvecs: int
    notes: list[str] = field(default_factory=list)
    stopped: str | None = None  # stochastic trace: 'tol' or 'probes' (the cap); else None


def capture_blocks(objective: Objective) -> dict[str, tuple[tuple[str, ...], str]]:
    """Per-layer blocks, the same as the Fisher's: ``{name: (param names, kind)}``."""
    from gmcurv.capture import plan_capture

    return {p.name: (p.params, p.kind) for p in plan_capture(objective.model, objective.params)}


def _n_params(objective: Objective, names: tuple[str, ...]) -> int:
    return sum(objective.params[k].numel() for k in names)


def _dense_summary(op, A: Tensor, blocks, k: int, per_layer: bool) -> tuple[Estimate, list, dict]:
    n, P = op.n, op.size
    method = "exact(dense)"

    def eig_estimates(M: Tensor) -> list[Estimate]:
        w = torch.linalg.eigvalsh(M).flip(0)[:k]
        return [Estimate(float(v), None, n, method, True, n_matvecs=P, residual=0.0) for v in w]

    trace = Estimate.exact_value(float(torch.diagonal(A).sum()), n, method, n_matvecs=P)
    layers = {}
    if per_layer:
        offsets = op.space.offsets()
        for name, (params, kind) in blocks.items():
            idx = torch.cat([torch.arange(offsets[p].start, offsets[p].stop) for p in params])
            sub = A[idx][:, idx]
            layers[name] = LayerCurvature(
                Estimate.exact_value(float(torch.diagonal(sub).sum()), n, method, n_matvecs=P),
                len(idx),
                kind,
                eig_estimates(sub)[:1],
            )
    return trace, eig_estimates(A) if k > 0 else [], layers


def lanczos_preflight(n: int, k: int, max_iters: int | None, budget: int | None) -> None:
    """Stop early when the Lanczos basis (float64, ``max_iters + 1`` vectors of `n`) would
    exceed the memory budget (GPT-2 124M: 61 vectors are 60 GB)."""
    from gmcurv.memory import preflight

    steps = min(n, max_iters or max(4 * k + 20, 60)) + 1
    preflight(
        8.0 * steps * n,
        budget,
        f"the Lanczos basis for the top-{k} eigenvalues ({steps} vectors of {n:,} parameters)",
        "use --k 0 (no eigenvalues), a smaller --max-iters, or restrict --layers",
    )


def sketch_fits(n: int, probes: int, budget: int | None) -> bool:
    """Whether Hutch++'s sketch (``probes/3`` vectors of `n`, with their products and
    orthonormal basis, float64) fits the memory budget."""
    from gmcurv.memory import default_budget

    limit = default_budget() if budget is None else budget
    return 3 * 8.0 * (probes // 3) * n <= limit


def lanczos_estimates(
    op: CurvatureOperator,
    k: int,
    tol: float,
    max_iters: int | None,
    seed: int,
    vectors: bool,
    restarts: int = 0,
    budget_bytes: int | None = None,
):
    """Top-k by Lanczos on `op` as `Estimate`s, converged when the eigenvalue error bound
    is within ``tol |λ_max|`` (`gmcurv.lanczos`, gap rule) — never when products are random.
    `restarts` > 0 deflates converged pairs and restarts to recover repeated eigenvalues."""
    lanczos_preflight(op.size, k, max_iters, budget_bytes)
    before = op.n_matvecs
    res = lanczos(
        op.matvec,
        op.size,
        k,
        tol=tol,
        max_iters=max_iters,
        seed=seed,
        dtype=torch.float64,
        device=op.objective.device,
        vectors=vectors,
        max_restarts=restarts,
        criterion="gap",
    )
    random = op.is_random(seed)
    return lanczos_to_estimates(res, op.n_matvecs - before, random), res, random


def lanczos_to_estimates(res, n_mv: int, random: bool = False) -> list[Estimate]:
    """A `gmcurv.lanczos.LanczosResult` as `Estimate`s (never converged when random)."""
    return [
        Estimate(
            float(v),
            None,
            res.iterations,
            "lanczos",
            bool(c) and not random,
            n_matvecs=n_mv,
            residual=float(r),
        )
        for v, r, c in zip(res.values, res.residuals, res.converged, strict=True)
    ]


def curvature_summary(
    objective: Objective,
    data: DataSample,
    kind: str,
    *,
    method: str = "auto",
    probes: int = 100,
    k: int = 5,
    per_layer: bool = True,
    seed: int = 0,
    tol: float = 1e-3,
    max_iters: int | None = None,
    batch_size: int = 256,
    budget_bytes: int | None = None,
    progress: Callable[[int], None] | None = None,
    restarts: int = 0,
    rtol: float | None = DEFAULT_TRACE_RTOL,
    phase: Callable[[str, int | None], None] | None = None,
    cache: dict | None = None,
) -> CurvatureSummary:
    """Everything ``gmcurv trace --curvature hessian|ggn`` reports.

    Methods: ``exact`` (dense matrix from ``P`` products), ``hutchinson`` / ``hutchpp``
    (at most `probes` products, stopping once the total's standard error is at most
    `rtol` of the reported trace; every layer's trace from the same products,
    `gmcurv.stochastic.shared_block_traces`), ``auto``: exact when tiny, else the GGN
    trace exactly from C-class factors (`exact_ggn_trace`) and, for the Hessian,
    ``tr H = tr G + tr(H - G)`` with Hutch++ on the residual ``H - G`` only — or no
    products at all when the network is piecewise linear in each layer
    (`gmcurv.piecewise`: the within-layer blocks of ``H - G`` vanish); falls back to
    Hutch++ on the matrix itself when the factors would be too many.
    Top-k eigenvalues by Lanczos (tolerance `tol` on eigenvalue error bounds relative to
    ``|λ_max|``); ``k = 0`` skips them. `phase(label, total)` announces each phase.
    `cache`: a dict shared by calls on the same objective and data (``--curvature all``),
    so that the GGN's factors are captured once for the GGN and the Hessian.
    """
    from gmcurv.piecewise import piecewise_linear_reason
    from gmcurv.stochastic import shared_block_traces

    if kind not in ("hessian", "ggn"):
        raise ConfigError(f"unknown curvature {kind!r}", hint="use hessian or ggn")
    blocks = capture_blocks(objective)
    P, n = objective.space.size, data.n
    resolved = resolve_method(method, P, n)
    if resolved not in ("exact", "hutchinson", "hutchpp"):
        raise ConfigError(
            f"--method {resolved} does not estimate traces",
            hint="use auto, exact, hutchinson or hutchpp",
        )
    announce = phase or (lambda label, total: None)
    op = CurvatureOperator(objective, data, batch_size, kind, progress=progress)
    notes: list[str] = []
    stopped: str | None = None
    eigs: list[Estimate] | None = None  # from the trace's Lanczos basis, when shared
    if resolved == "exact":
        announce("dense matrix: products", P)
        A = dense_matrix(op, budget_bytes)
        tr, eigs, layers = _dense_summary(op, A, blocks, k, per_layer)
        return CurvatureSummary(kind, "exact(dense)", tr, eigs, layers, P, op.n_matvecs, notes)

    exact_ggn = method == "auto" and exact_ggn_columns(objective, data) <= EXACT_GGN_MAX_COLUMNS
    ggn_part: dict[str, tuple[float, float]] = {}
    if exact_ggn:
        key = ("exact_ggn_trace", batch_size)
        if cache is not None and key in cache:
            acc = cache[key]
        else:
            announce("GGN from factors: examples", n)
            acc = exact_ggn_trace(objective, data, batch_size, budget_bytes, progress=progress)
            if cache is not None:
                cache[key] = acc
        ggn_part = {b: acc.trace(b) for b in blocks}
        notes.append("GGN trace exact from the C-class square-root factors (no products)")
    pl_reason = piecewise_linear_reason(objective.model, objective.mode)
    space, dtype, device = objective.space, objective.dtype, objective.device
    parts: dict[str, Estimate] = {}
    if exact_ggn and (kind == "ggn" or pl_reason is not None):
        label = "exact(factors)" if kind == "ggn" else "exact-ggn+zero(H-G)"
        if kind == "hessian":
            notes.append(f"H - G: {pl_reason}")
        for b, (value, se) in ggn_part.items():
            parts[b] = Estimate.exact_value(value, n, label, data_stderr=se, n_matvecs=0)
        value, se = acc.trace(None)
        total = Estimate.exact_value(value, n, label, data_stderr=se, n_matvecs=0)
    else:
        target = CurvatureOperator(objective, data, batch_size, "residual") if exact_ggn else op
        target.progress = progress
        prefix = "exact-ggn+" if exact_ggn else ""
        suffix = "(H-G)" if exact_ggn else ""
        base = sum(v for v, _ in ggn_part.values())
        wanted = {b: p for b, (p, _) in blocks.items()} if per_layer else {}
        if method == "auto" and resolved == "hutchpp" and not sketch_fits(P, probes, budget_bytes):
            resolved = "hutchinson"  # unbiased either way; Hutch++ only lowers the variance
            notes.append(
                f"Hutchinson, not Hutch++: a sketch of {probes // 3} vectors of {P:,} "
                "parameters does not fit the memory budget"
            )
        if method == "auto" and not exact_ggn and k > 0 and not op.is_random(seed):
            lanczos_preflight(P, k, max_iters, budget_bytes)
            # the eigenvalues' Lanczos basis deflates the trace: its products serve both
            from gmcurv.lanczos_trace import lanczos_block_traces

            announce("Lanczos, then trace: products", probes)
            lz, res = lanczos_block_traces(
                op.matvec, space, wanted, k, probes, tol=tol, max_iters=max_iters,
                restarts=restarts, seed=seed, device=device, rtol=rtol, offset=base,
            )  # fmt: skip
            eigs = lanczos_to_estimates(lz, lz.n_matvecs)
            notes.append(
                f"the trace reuses the {lz.basis.shape[0]} Lanczos products of the top-{k} "
                "eigenvalues as its deflation basis (exact on that subspace), then Hutchinson "
                "probes on the complement"
            )
        else:
            announce(f"{'H - G' if exact_ggn else 'trace'}: products", probes)
            res = shared_block_traces(
                target.matvec,
                space,
                wanted,
                probes,
                resolved,
                seed=seed,
                dtype=dtype,
                device=device,
                rtol=rtol,
                offset=base,
            )
        stopped = res.stopped
        for b, e in res.blocks.items():
            parts[b] = _shifted(e, ggn_part.get(b, (0.0, 0.0))[0], prefix, suffix, n)
        total = _shifted(res.total, base, prefix, suffix, n)
        if rtol and stopped != "tol" and not total.exact:
            # the cap came first: the trace misses the requested precision (--strict: exit 3)
            total = replace(total, converged=False)
        if stopped == "tol":
            notes.append(
                f"stochastic trace stopped at {res.total.n_matvecs} products: relative "
                f"standard error <= {rtol:g} (--tol)"
            )
        else:
            notes.append(
                f"stochastic trace stopped at the cap of {probes} products (--probes) before "
                + (f"a relative standard error of {rtol:g}" if rtol else "any tolerance")
            )
        if per_layer:
            notes.append("per-layer traces share the total's products (v_b^T (A v)_b)")
        if exact_ggn:
            op.n_matvecs += target.n_matvecs
    if k > 0 and eigs is None:
        announce("Lanczos: products", max_iters or max(4 * k + 20, 60))
        eigs, _, random = lanczos_estimates(
            op, k, tol, max_iters, seed, False, restarts, budget_bytes
        )
        if random:
            notes.append("products are random (train mode with Dropout): nothing converged")
    layers = {
        b: LayerCurvature(parts[b], _n_params(objective, p), kd, [])
        for b, (p, kd) in blocks.items()
        if b in parts
    }
    return CurvatureSummary(
        kind, total.method, total, eigs or [], layers, P, op.n_matvecs, notes, stopped
    )


def _shifted(e, base: float, prefix: str, suffix: str, n: int) -> Estimate:
    """A `TraceEstimate` of the residual plus the exact GGN part, as an `Estimate`."""
    method = prefix + e.method + suffix
    if e.exact:
        return Estimate.exact_value(base + e.value, n, method, n_matvecs=e.n_matvecs)
    return Estimate(base + e.value, e.stderr, e.n_probes, method, True, n_matvecs=e.n_matvecs)


@dataclass(frozen=True)
class EigenSummary:
    """Top-k eigenvalues (and optionally unit eigenvectors in parameter layout)."""

    kind: str
    method: str
    values: list[Estimate]
    vectors: list[dict[str, Tensor]] | None
    n_params: int
    n_matvecs: int
    notes: list[str] = field(default_factory=list)


def top_eigen(
    objective: Objective,
    data: DataSample,
    kind: str,
    k: int = 5,
    *,
    method: str = "auto",
    tol: float = 1e-3,
    max_iters: int | None = None,
    seed: int = 0,
    vectors: bool = False,
    batch_size: int = 256,
    fisher: str = "empirical",
    budget_bytes: int | None = None,
    progress: Callable[[int], None] | None = None,
    restarts: int = 0,
) -> EigenSummary:
    """What ``gmcurv eigen`` reports: the Hessian/GGN by dense ``eigh`` (``exact``, tiny
    models) or Lanczos; the Fisher on the exact Gram route (`gmcurv.fisher.fisher_eigen`)."""
    P, n = objective.space.size, data.n
    if kind == "fisher":
        from gmcurv.capture import capture_all
        from gmcurv.fisher import fisher_eigen

        dg = capture_all(objective, data, batch_size, fisher, budget_bytes=budget_bytes)
        res = fisher_eigen(dg, k, vectors=vectors, seed=seed)
        values = [
            Estimate(
                float(v), None, dg.n, res.method, bool(c), n_matvecs=res.n_matvecs,
                residual=float(r),
            )
            for v, r, c in zip(res.values, res.residuals, res.converged, strict=True)
        ]  # fmt: skip
        return EigenSummary(kind, res.method, values, res.vectors, P, res.n_matvecs)
    if kind not in ("hessian", "ggn"):
        raise ConfigError(f"unknown curvature {kind!r}", hint="use hessian, ggn or fisher")
    resolved = method if method != "auto" else resolve_method("auto", P, n)
    resolved = "lanczos" if resolved in ("hutchpp", "hutchinson") and method == "auto" else resolved
    if resolved not in ("exact", "lanczos"):
        raise ConfigError(
            f"--method {method} does not compute eigenvalues",
            hint="use auto, exact or lanczos (and --curvature fisher for the Gram route)",
        )
    op = CurvatureOperator(objective, data, batch_size, kind, progress=progress)
    if resolved == "exact":
        A = dense_matrix(op, budget_bytes)
        w, V = torch.linalg.eigh(A)
        w, V = w.flip(0)[:k], V.flip(1)[:, :k]
        values = [
            Estimate(float(v), None, n, "exact(dense)", True, n_matvecs=P, residual=0.0) for v in w
        ]
        vecs = [_layout(op, V[:, j]) for j in range(len(w))] if vectors else None
        return EigenSummary(kind, "exact(dense)", values, vecs, P, op.n_matvecs)
    values, res, random = lanczos_estimates(
        op, k, tol, max_iters, seed, vectors, restarts, budget_bytes
    )
    notes = ["products are random (train mode with Dropout): nothing converged"] if random else []
    vecs = None
    if vectors and res.vectors is not None:
        vecs = [_layout(op, v) for v in res.vectors]
    return EigenSummary(kind, "lanczos", values, vecs, P, op.n_matvecs, notes)


def _layout(op: CurvatureOperator, v: Tensor) -> dict[str, Tensor]:
    v = v / v.norm()
    return {
        k: t.to(op.objective.dtype).cpu().contiguous() for k, t in op.space.unflatten(v).items()
    }
