"""1-D / 2-D loss slices around the weights: ``L(θ0 + α d1 + β d2)`` on a grid.

Directions (each a ``{name: tensor}`` over the objective's parameters):

- ``random``: Gaussian directions, filter-normalised (Li et al., 2018, "Visualizing the Loss
  Landscape of Neural Nets"): every filter of a weight tensor (row of a Linear weight =
  output neuron, output channel of a Conv weight, dimension 0 in general) is rescaled to the
  norm of the same filter of the weights. Biases and other 1-D parameters (norm scales and
  shifts) are zeroed, or — with ``include_bias`` — rescaled as a whole to the parameter's norm.
- ``eigen``: the top Hessian eigenvectors (unit norm, no normalisation), from
  `gmcurv.hessian.top_eigen`. Along a unit eigenvector ``v`` with eigenvalue ``λ`` the slice is
  ``L(a) ≈ L0 + (g·v) a + ½ λ a²``, so the fitted curvature ``2 c2`` approximates ``λ``.
- ``checkpoint``: ``d_i = θ_i - θ0`` for other checkpoints of the same architecture, so
  ``α = 1`` (or ``β = 1``) *is* that checkpoint: linear interpolation (1-D) or the plane
  through three checkpoints (2-D).

Evaluation reuses one functional model: the points of a chunk are stacked into parameter
tensors ``[C, *shape]`` and run through ``torch.func.vmap(functional_call)`` in one pass per
data batch (the chunk size comes from a memory budget); the model is never copied and its
own parameters are never modified. The loss is the mean of `gmcurv.losses` per-example
losses over the data (the objective every other command uses); the accuracy is reported
for classification losses.

Sharpness along a direction: the curvature at the centre, ``2 c2`` of a least-squares
parabola ``c0 + c1 t + c2 t²`` through the five points ``t ∈ {-2h, -h, 0, h, 2h}`` with
``h = FIT_STEP · (high - low)`` (half a percent of the grid's range: local, yet far above
float32 round-off), with its standard error from the fit residual. On a ReLU network the
kinks the slice crosses add to the fitted curvature, so it sits somewhat above the Hessian
eigenvalue; on a smooth loss the two agree as ``h -> 0``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.func import vmap

from gmcurv.batch import Batch, batch_size_of
from gmcurv.data import DataSample
from gmcurv.errors import CheckpointError, ConfigError, GmcurvError
from gmcurv.estimate import Estimate
from gmcurv.losses import CrossEntropy
from gmcurv.memory import default_budget
from gmcurv.objective import Objective

if TYPE_CHECKING:
    from gmcurv.io.checkpoint import LoadedModel

ProgressFn = Callable[[float], None]
Direction = dict[str, Tensor]

NORMALISATIONS = ("filter", "eigen", "none")
FIT_POINTS = (-2, -1, 0, 1, 2)  # stencil of the quadratic fit, in units of FIT_STEP · range
FIT_STEP = 0.005  # stencil spacing as a fraction of the grid's range (±1% of it in all)
DEFAULT_BUDGET = 512 * 2**20  # bytes for one chunk of grid points (parameters + activations)
MAX_CHUNK = 256
CHUNK_ROWS = 4096  # examples x points per forward (activations stay in cache on CPU)
DEFAULT_CACHE_BYTES = 256 * 2**20  # keep the data sample in memory up to this size


# ------------------------------------------------------------------------------------ the grid
def parse_range(text: str) -> tuple[float, float]:
    """``"-1:1"`` -> ``(-1.0, 1.0)``; the low end must be below the high end."""
    m = re.fullmatch(r"\s*([^:]+?)\s*:\s*([^:]+?)\s*", str(text))
    lo = hi = None
    if m:
        try:
            lo, hi = float(m[1]), float(m[2])
        except ValueError:
            lo = hi = None
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        raise ConfigError(
            f"--range {text!r}: expected LOW:HIGH with two numbers",
            hint="e.g. --range -1:1 (or --range=-1:1)",
        )
    if not (math.isfinite(hi - lo) and max(abs(lo), abs(hi)) <= 1e6):
        raise ConfigError(
            f"--range {text!r}: coordinates are multiples of the direction norms; "
            "beyond ±1e6 the perturbation swamps the weights",
            hint="e.g. --range -1:1 (or --range -10:10 for a wide view)",
        )
    if not lo < hi:
        raise ConfigError(
            f"--range {text!r}: the low end {lo:g} must be below the high end {hi:g}",
            hint=f"write --range {min(lo, hi):g}:{max(lo, hi):g}"
            if lo != hi
            else "give an interval, e.g. --range -1:1",
        )
    return lo, hi


def grid_axis(lo: float, hi: float, steps: int) -> Tensor:
    """``steps`` evenly spaced coordinates from `lo` to `hi` (float64)."""
    if steps < 3:
        raise ConfigError(
            f"--steps {steps}: a landscape needs at least 3 points per axis",
            hint="e.g. --steps 41 (odd counts put a grid point on the centre)",
        )
    axis = torch.linspace(lo, hi, steps, dtype=torch.float64)
    axis[axis.abs() <= 1e-12 * (hi - lo)] = 0.0  # the centre exactly, not 1e-17 beside it
    return axis


# ---------------------------------------------------------------------------------- directions
def is_filter_param(t: Tensor) -> bool:
    """Weight tensors with filters (ndim >= 2); 1-D tensors are biases / norm parameters."""
    return t.ndim >= 2


def filter_normalize(
    direction: Mapping[str, Tensor], weights: Mapping[str, Tensor], include_bias: bool = False
) -> Direction:
    """Li et al. filter normalisation of `direction` against `weights`.

    Filter ``i`` (index along dimension 0) of every tensor with ``ndim >= 2`` gets the norm of
    filter ``i`` of the weight; 1-D tensors are zeroed, or with `include_bias` rescaled to the
    weight's norm as a whole.
    """
    out: Direction = {}
    for name, d in direction.items():
        w = weights[name].to(d.dtype)
        if is_filter_param(w):
            dn = d.reshape(d.shape[0], -1).norm(dim=1)
            wn = w.reshape(w.shape[0], -1).norm(dim=1)
            out[name] = d * _ratio(wn, dn).reshape(-1, *([1] * (d.ndim - 1)))
        elif include_bias:
            out[name] = d * _ratio(w.norm(), d.norm())
        else:
            out[name] = torch.zeros_like(d)
    return out


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, 0 where ``den`` is 0 (a zero filter of the direction stays zero)."""
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0)


def random_directions(
    weights: Mapping[str, Tensor], n: int, seed: int = 0, include_bias: bool = False
) -> list[Direction]:
    """`n` filter-normalised Gaussian directions (drawn in float64 from a local generator, in
    parameter order, so they do not depend on the compute dtype or device)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        raw = {
            k: torch.randn(w.shape, generator=gen, dtype=torch.float64) for k, w in weights.items()
        }
        w64 = {k: w.detach().to("cpu", torch.float64) for k, w in weights.items()}
        d = filter_normalize(raw, w64, include_bias)
        out.append({k: v.to(weights[k].device, weights[k].dtype) for k, v in d.items()})
    if all(float(sum(v.norm() ** 2 for v in d.values())) == 0.0 for d in out):
        raise ConfigError(
            "the random directions are zero: every selected parameter is a bias or 1-D "
            "(normalisation) parameter, which filter normalisation leaves out",
            hint="add --include-bias, or select weight matrices with --layers",
        )
    return out


def checkpoint_directions(
    center: Mapping[str, Tensor], others: Sequence[Mapping[str, Tensor]], names: Sequence[str]
) -> list[Direction]:
    """``θ_i - θ0`` for each other checkpoint (`names` label them in errors)."""
    out = []
    for other, label in zip(others, names, strict=True):
        missing = [k for k in center if k not in other]
        if missing:
            raise CheckpointError(
                f"--to {label}: no parameter {missing[0]} (the centre model has it)",
                hint="--to needs checkpoints of the same architecture as MODEL",
            )
        bad = [
            f"{k}: {tuple(other[k].shape)} vs {tuple(c.shape)}"
            for k, c in center.items()
            if tuple(other[k].shape) != tuple(c.shape)
        ]
        if bad:
            raise CheckpointError(
                f"--to {label}: parameter shapes differ from MODEL's ({'; '.join(bad[:3])})",
                hint="--to needs checkpoints of the same architecture as MODEL",
            )
        d = {k: other[k].detach().to(c.device, c.dtype) - c.detach() for k, c in center.items()}
        if float(sum(v.norm() ** 2 for v in d.values())) == 0.0:
            raise ConfigError(
                f"--to {label}: the checkpoint equals MODEL, so the direction is zero",
                hint="interpolate towards a different checkpoint",
            )
        out.append(d)
    if len(out) == 2:
        a, b = (torch.cat([v.reshape(-1).double() for v in d.values()]) for d in out)
        cos = float(a @ b / (a.norm() * b.norm()))
        if abs(cos) > 1 - 1e-9:
            raise ConfigError(
                f"--to {names[0]} and --to {names[1]}: the three checkpoints lie on one "
                "line, so they span no plane",
                hint="use a single --to for a 1-D interpolation",
            )
    return out


def eigen_directions(
    objective: Objective,
    data: DataSample,
    n: int,
    *,
    batch_size: int = 256,
    seed: int = 0,
    tol: float = 1e-3,
    budget_bytes: int | None = None,
    progress: ProgressFn | None = None,
) -> tuple[list[Direction], list[Estimate], str, list[str]]:
    """The top-`n` Hessian eigenvectors (unit norm) with their eigenvalues and method."""
    from gmcurv.hessian import top_eigen

    s = top_eigen(
        objective,
        data,
        "hessian",
        n,
        method="auto",
        tol=tol,
        seed=seed,
        vectors=True,
        batch_size=batch_size,
        budget_bytes=budget_bytes,
        progress=progress,
    )
    assert s.vectors is not None
    device, dtype = objective.device, objective.dtype
    dirs = [{k: v.to(device, dtype) for k, v in vec.items()} for vec in s.vectors]
    return dirs, s.values, s.method, s.notes


def direction_norm(d: Mapping[str, Tensor]) -> float:
    return math.sqrt(sum(float(v.double().norm() ** 2) for v in d.values()))


# ---------------------------------------------------------------------------------- evaluation
def _activation_elems(objective: Objective, batch: Batch) -> int:
    """Output elements of every module for one example (a bound on live activations)."""
    total = 0

    def hook(_m, _inp, out):
        nonlocal total
        if isinstance(out, Tensor):
            total += out.numel()

    one = Batch(_slice(batch.inputs, 1), None, 0)
    handles = [m.register_forward_hook(hook) for m in objective.model.modules()]
    try:
        with torch.no_grad():
            objective.outputs(one.inputs)
    finally:
        for h in handles:
            h.remove()
    return max(total, 1)


def _slice(inputs, k):
    return {n: v[:k] for n, v in inputs.items()} if isinstance(inputs, dict) else inputs[:k]


def chunk_size(
    objective: Objective, probe: Batch, batch_size: int, budget_bytes: int | None = None
) -> int:
    """Grid points per vmapped forward: about `CHUNK_ROWS` rows (points x examples), bigger
    chunks being memory-bound on CPU, and parameters plus activations within budget."""
    budget = budget_bytes if budget_bytes is not None else min(DEFAULT_BUDGET, default_budget())
    elt = torch.empty((), dtype=objective.dtype).element_size()
    per_point = elt * (objective.space.size + 2 * batch_size * _activation_elems(objective, probe))
    return int(max(1, min(MAX_CHUNK, CHUNK_ROWS // batch_size, budget // per_point)))


@dataclass
class PointValues:
    """Mean loss (and accuracy) at each evaluated point, float64."""

    loss: Tensor
    accuracy: Tensor | None
    n: int
    chunk: int
    vmapped: bool
    mode: str = "vmap"  # 'stacked' (baddbmm), 'vmap' or 'loop' (one point at a time)


class _NotStackableError(Exception):
    """A Linear layer saw an input without the leading chunk dimension."""


def _agree(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape:
        return False
    tol = 1e-3 if a.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
    return bool(torch.allclose(a, b, rtol=tol, atol=tol * float(b.abs().max().clamp_min(1e-30))))


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


def _own_params(objective: Objective, mname: str) -> tuple[str, str | None] | None:
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


def input_linears(objective: Objective, inputs) -> dict[str, tuple[str, str | None]]:
    """``nn.Linear`` modules applied once, directly, to the model's input tensor, whose
    weight (and bias, if any) are selected and not tied: ``{module: (weight, bias)}``.

    Their output is affine in the grid coordinates, ``x (W0 + Σ c_k D_k)^T + b0 + Σ c_k db_k
    = base + Σ c_k proj_k``, so a batch's ``base`` and ``proj_k`` are computed once and each
    grid point costs one ``[1, K+1] x [K+1, B·out]`` product instead of a ``[B, in] x [in,
    out]`` matmul.
    """
    if not isinstance(inputs, Tensor):
        return {}
    calls, direct = _probe_linears(objective, inputs)
    out = {}
    for mname in sorted(direct):
        own = _own_params(objective, mname) if calls.get(mname) == 1 else None
        if own is not None:
            out[mname] = own
    return out


def stackable_linears(objective: Objective, inputs) -> dict[str, tuple[str, str | None]]:
    """All ``nn.Linear`` modules holding selected parameters, when those are *all* the
    selected parameters (untied, each module called once): such models can run a chunk of
    grid points as stacked weights ``[C, out, in]`` through ``baddbmm`` without ``vmap``
    (checked against ``vmap`` on the first chunk before it is trusted). Else ``{}``."""
    if not isinstance(inputs, Tensor):
        return {}
    calls, _ = _probe_linears(objective, inputs)
    out: dict[str, tuple[str, str | None]] = {}
    for mname, count in calls.items():
        own = _own_params(objective, mname)
        if own is None or count != 1:
            continue
        out[mname] = own
    covered = {n for names in out.values() for n in names if n is not None}
    return out if covered == set(objective.params) else {}


def evaluate_points(
    objective: Objective,
    data: DataSample,
    directions: Sequence[Mapping[str, Tensor]],
    coords: Tensor,
    *,
    batch_size: int = 256,
    budget_bytes: int | None = None,
    chunk: int | None = None,
    progress: ProgressFn | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    affine_inputs: bool = True,
    stacked: bool = True,
) -> PointValues:
    """``L(θ0 + Σ_k coords[m, k] d_k)`` for every row `m` of `coords` ``[M, K]``.

    Chunks of points go through one functional model (``vmap`` over stacked parameters),
    falling back to one point at a time for models ``vmap`` cannot batch; each chunk sees
    every batch (kept in memory after the first pass when the sample is small). With
    `affine_inputs`, Linear layers fed by the raw input use the affine form of
    `input_linears`; with `stacked`, models whose selected parameters all sit in Linear
    layers (`stackable_linears`) run without ``vmap``, as stacked ``baddbmm`` products (the
    Linear modules' ``forward`` is swapped for the duration of the call and restored after).
    Under torchrun the sums are all-reduced over ranks.
    """
    from gmcurv.distributed import current

    if coords.ndim != 2 or coords.shape[1] != len(directions):
        raise ValueError("coords must be [M, number of directions]")
    device, dtype = objective.device, objective.dtype
    center = {k: p.detach() for k, p in objective.params.items()}
    dirs = [{k: d[k].to(device, dtype) for k in center} for d in directions]
    M = coords.shape[0]
    cs = coords.to(device, dtype)
    sums = torch.zeros(M, dtype=torch.float64, device=device)
    correct = torch.zeros(M, dtype=torch.float64, device=device)
    scored = 0
    n_seen = 0
    n_batches = max(1, math.ceil(data.n / batch_size))
    use_vmap = True
    loss = objective.loss
    probe = data.first(min(2, data.n), device, dtype)
    size = chunk or chunk_size(objective, probe, min(batch_size, data.n), budget_bytes)
    affine = input_linears(objective, probe.inputs) if affine_inputs else {}
    skip = {n for names in affine.values() for n in names if n is not None}
    stack = stackable_linears(objective, probe.inputs) if stacked else {}
    linears = {**stack, **affine}  # modules whose forward is swapped
    mode = "stacked" if stack else "vmap"
    trusted = False  # stacked outputs agreed with vmap on the first chunk
    state: dict = {"mode": "vmap", "coords": None, "params": None}
    current_terms: dict[str, Tensor] = {}  # module -> [K+1, B, out] terms of the batch
    terms_cache: dict[int, dict[str, Tensor]] = {}

    def point_params(c: Tensor) -> dict[str, Tensor]:
        """``θ0 + Σ_k c[:, k] d_k`` stacked over the chunk: ``[C, *shape]`` per parameter;
        for an affine input layer its weight slot carries the coordinates ``[C, K]``."""
        out = {}
        for name, t in center.items():
            if name in skip:
                continue
            view = (-1, *([1] * t.ndim))
            acc = torch.addcmul(t, c[:, 0].reshape(view), dirs[0][name])  # [C, *shape]
            for k in range(1, len(dirs)):
                acc.addcmul_(c[:, k].reshape(view), dirs[k][name])
            out[name] = acc
        for w, _ in affine.values():
            out[w] = c
        return out

    def affine_terms(x: Tensor) -> dict[str, Tensor]:
        """Per affine layer ``[K+1, B, out]``: ``x W0^T + b0`` then ``x D_k^T + db_k``."""
        terms = {}
        for mname, (w, b) in affine.items():
            rows = [
                torch.nn.functional.linear(x, src[w], src[b] if b else None)
                for src in (center, *dirs)
            ]
            terms[mname] = torch.stack(rows)
        return terms

    def patched(mname: str, module: torch.nn.Module):
        names = linears[mname]

        def forward(x: Tensor) -> Tensor:
            if state["mode"] == "stacked":
                c: Tensor = state["coords"]  # [C, K]
                if mname in affine:
                    terms = current_terms[mname]  # [K+1, B.., out]
                    ones = torch.ones_like(c[:, :1])
                    flat = terms.reshape(terms.shape[0], -1)
                    buf = _buffer(mname, (c.shape[0], flat.shape[1]), flat)
                    out = torch.mm(torch.cat([ones, c], 1), flat, out=buf)
                    return out.reshape(c.shape[0], *terms.shape[1:])  # [C, B.., out]
                if x.shape[0] != c.shape[0]:
                    raise _NotStackableError
                W = state["params"][names[0]]  # [C, out, in]
                x3 = x.reshape(x.shape[0], -1, x.shape[-1])
                buf = _buffer(mname, (x3.shape[0], x3.shape[1], W.shape[1]), x3)
                if names[1] is None:
                    out = torch.bmm(x3, W.transpose(1, 2), out=buf)
                else:
                    b = state["params"][names[1]].unsqueeze(1)
                    out = torch.baddbmm(b, x3, W.transpose(1, 2), out=buf)
                return out.reshape(*x.shape[:-1], W.shape[1])
            if mname in affine:
                cv = module.weight  # the point's coordinates [K] (swapped in by functional_call)
                ones = torch.ones_like(cv[:1])
                return torch.tensordot(torch.cat([ones, cv]), current_terms[mname], dims=1)
            return type(module).forward(module, x)

        return forward

    buffers: dict[tuple, Tensor] = {}

    def _buffer(mname: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A reused output tensor per layer and shape: large temporaries are not returned
        to the OS and re-faulted on every chunk (the outputs of a chunk are consumed before
        the next chunk runs)."""
        key = (mname, shape)
        if key not in buffers:
            buffers[key] = like.new_empty(shape)
        return buffers[key]

    def stacked_outputs(c: Tensor, params: dict[str, Tensor], inputs) -> Tensor | None:
        state.update(mode="stacked", coords=c, params=params)
        try:
            out = objective.outputs(inputs)
        except (_NotStackableError, RuntimeError, ValueError, IndexError):
            return None
        finally:
            state.update(mode="vmap", coords=None, params=None)
        return out if isinstance(out, Tensor) and out.shape[0] == c.shape[0] else None

    def batched_outputs(params: dict[str, Tensor], inputs) -> Tensor:
        return vmap(lambda p: objective.outputs(inputs, p))(params)

    # batches: kept in memory after the first pass when small, else re-read per chunk
    kept: list[Batch] | None = None

    def batches():
        nonlocal kept
        if kept is not None:
            yield from kept
            return
        store: list[Batch] | None = []
        held = 0
        for batch in data.batches(batch_size, device, dtype):
            if store is not None:
                held += _nbytes(batch)
                if held <= cache_bytes:
                    store.append(batch)
                else:
                    store = None
            yield batch
        kept = store

    accuracy_ok = True
    first_pass = True
    modules = {m: objective.model.get_submodule(m) for m in linears}
    own_forwards = {
        m: mod.__dict__["forward"] for m, mod in modules.items() if "forward" in mod.__dict__
    }
    for mname, module in modules.items():
        module.forward = patched(mname, module)  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            for s in range(0, M, size):
                c = cs[s : s + size]
                params = point_params(c)
                for index, batch in enumerate(batches()):
                    if affine:
                        terms = terms_cache.get(index) if kept is not None else None
                        if terms is None:
                            terms = affine_terms(batch.inputs)  # type: ignore[arg-type]
                            if kept is not None or first_pass:
                                terms_cache[index] = terms
                        current_terms.update(terms)
                    outs: Tensor | list[Tensor] | None = None
                    if mode == "stacked":
                        got = stacked_outputs(c, params, batch.inputs)
                        if trusted:
                            outs = got
                        else:  # the first chunk: run vmap too, and compare
                            try:
                                outs = batched_outputs(params, batch.inputs)
                            except (RuntimeError, NotImplementedError, ValueError):
                                use_vmap = False
                            trusted = got is not None and outs is not None and _agree(got, outs)
                        if not trusted or got is None:
                            mode = "vmap"
                    if outs is None and use_vmap:
                        try:
                            outs = batched_outputs(params, batch.inputs)
                        except (RuntimeError, NotImplementedError, ValueError):
                            use_vmap = False  # e.g. data-dependent control flow: loop instead
                    if outs is None:
                        mode = "loop"
                        outs = [
                            objective.outputs(batch.inputs, {k: v[j] for k, v in params.items()})
                            for j in range(c.shape[0])
                        ]
                    out_all = outs if isinstance(outs, Tensor) else torch.stack(outs)
                    targets = objective.targets(batch, out_all[0])
                    if first_pass:
                        n_seen += len(batch)
                        if accuracy_ok:
                            counts = loss.accuracy_counts(out_all[0], targets)
                            accuracy_ok = counts is not None
                            scored += counts[1] if counts is not None else 0
                    sums[s : s + len(c)] += _point_losses(objective, out_all, targets)
                    if accuracy_ok:
                        correct[s : s + len(c)] += _per_point(
                            lambda o, t=targets: loss.accuracy_counts(o, t)[0].double(), out_all
                        )
                    if progress is not None:
                        progress(c.shape[0] / n_batches)
                if kept is None:
                    terms_cache.clear()
                first_pass = False
    finally:
        for mname, module in modules.items():
            del module.forward
            if mname in own_forwards:  # an instance-level forward the user had set
                module.forward = own_forwards[mname]  # type: ignore[method-assign]
    comm = current()
    n_total = n_seen
    if comm.active:
        sums = comm.all_reduce(sums)
        correct = comm.all_reduce(correct)
        totals = comm.all_reduce(torch.tensor([float(n_seen), float(scored)], device=device))
        n_total, scored = int(totals[0]), int(totals[1])
    mean = (sums / max(n_total, 1)).cpu()
    acc = (correct / scored).cpu() if accuracy_ok and scored > 0 else None
    return PointValues(mean, acc, n_total, int(size or 1), use_vmap, mode)


def _nbytes(batch: Batch) -> int:
    parts = list(batch.inputs.values()) if isinstance(batch.inputs, dict) else [batch.inputs]
    if batch.targets is not None:
        parts.append(batch.targets)
    return sum(t.numel() * t.element_size() for t in parts)


def _point_losses(objective: Objective, outs: Tensor, targets: Tensor) -> Tensor:
    """``Σ_n L_n`` per point from outputs ``[C, B, ...]``: one loss call on the flattened
    ``[C·B, ...]`` outputs (``L_n`` is per example, so this is exact).

    Classification with one prediction per example (logits ``[B, classes]``, labels ``[B]``,
    none ignored) takes ``L_n = logsumexp(f_n) - f_n[y_n]`` directly: the same number as
    `gmcurv.losses.CrossEntropy`, without materialising the log-softmax (5x cheaper)."""
    C, B = outs.shape[0], outs.shape[1]
    loss = objective.loss
    if (
        isinstance(loss, CrossEntropy)
        and not loss.shift
        and outs.ndim == 3
        and targets.ndim == 1
        and bool((targets >= 0).all())
    ):
        picked = outs.gather(2, targets.reshape(1, B, 1).expand(C, B, 1)).squeeze(2)
        return (torch.logsumexp(outs, dim=2) - picked).double().sum(1)
    flat_t = targets.unsqueeze(0).expand(C, *targets.shape).reshape(C * B, *targets.shape[1:])
    per = objective.loss.per_example(outs.reshape(C * B, *outs.shape[2:]), flat_t)
    return per.double().reshape(C, B).sum(1)


def _per_point(fn: Callable[[Tensor], Tensor], outs: Tensor) -> Tensor:
    """``fn`` on each point's outputs ``outs[c]``: one vmapped call, else a loop."""
    try:
        return vmap(fn)(outs)
    except (RuntimeError, NotImplementedError, ValueError):
        return torch.stack([fn(o) for o in outs])


# ------------------------------------------------------------------------------ quadratic fit
@dataclass(frozen=True)
class QuadraticFit:
    """``c0 + c1 t + c2 t²`` by least squares; ``curvature = 2 c2`` with its standard error."""

    c0: float
    c1: float
    c2: float
    curvature: float
    stderr: float | None
    halfwidth: float


def quadratic_fit(t: Tensor, y: Tensor) -> QuadraticFit:
    t, y = t.double(), y.double()
    A = torch.stack([torch.ones_like(t), t, t * t], dim=1)
    sol = torch.linalg.lstsq(A, y.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    dof = len(t) - 3
    stderr = None
    if dof > 0:
        resid = y - A @ sol
        sigma2 = float(resid @ resid) / dof
        cov = sigma2 * torch.linalg.inv(A.T @ A)
        stderr = 2 * math.sqrt(max(float(cov[2, 2]), 0.0))
    c0, c1, c2 = (float(v) for v in sol)
    return QuadraticFit(c0, c1, c2, 2 * c2, stderr, float(t.abs().max()))


# --------------------------------------------------------------------------------- the result
@dataclass
class Landscape:
    """A 1-D or 2-D slice and what is read off it."""

    alphas: Tensor  # [S1]
    betas: Tensor | None  # [S2] (None for 1-D)
    loss: Tensor  # [S1] or [S1, S2]: loss[i, j] = L(θ0 + alphas[i] d1 + betas[j] d2)
    accuracy: Tensor | None
    center_loss: float
    center_accuracy: float | None
    fits: list[QuadraticFit]
    n: int
    n_points: int
    chunk: int
    vmapped: bool
    fit_coords: Tensor = field(repr=False)  # [K, 5] stencil per direction
    fit_loss: Tensor = field(repr=False)  # [K, 5]
    extra_loss: Tensor | None = None  # at the `extra` coordinates, if any
    mode: str = "vmap"  # how points were batched: 'stacked', 'vmap' or 'loop'


def landscape(
    objective: Objective,
    data: DataSample,
    directions: Sequence[Mapping[str, Tensor]],
    alphas: Tensor,
    betas: Tensor | None = None,
    *,
    batch_size: int = 256,
    budget_bytes: int | None = None,
    chunk: int | None = None,
    progress: ProgressFn | None = None,
    extra: Tensor | None = None,
) -> Landscape:
    """Evaluate the grid (1-D with one direction, 2-D with two), the centre, the
    five-point stencil of each direction's quadratic fit and any `extra` points ``[E, K]``
    (e.g. the ``--to`` checkpoints themselves) in one pass."""
    K = len(directions)
    if K not in (1, 2) or (K == 2) != (betas is not None):
        raise ValueError("one direction with alphas, or two with alphas and betas")
    alphas = alphas.double()
    if K == 1:
        grid = alphas.unsqueeze(1)
    else:
        assert betas is not None
        betas = betas.double()
        grid = torch.cartesian_prod(alphas, betas)
    axes = [alphas] if K == 1 else [alphas, betas]
    hs = [FIT_STEP * float(ax[-1] - ax[0]) for ax in axes]  # type: ignore[index]
    stencil = torch.tensor(FIT_POINTS, dtype=torch.float64)
    fit_rows, fit_coords = [], []
    for k in range(K):
        t = stencil * hs[k]
        rows = torch.zeros(len(t), K, dtype=torch.float64)
        rows[:, k] = t
        fit_rows.append(rows)
        fit_coords.append(t)
    center = torch.zeros(1, K, dtype=torch.float64)
    extras = [extra.double().reshape(-1, K)] if extra is not None else []
    coords = torch.cat([grid, center, *fit_rows, *extras])
    values = evaluate_points(
        objective,
        data,
        directions,
        coords,
        batch_size=batch_size,
        budget_bytes=budget_bytes,
        chunk=chunk,
        progress=progress,
    )
    G = grid.shape[0]
    shape = (len(alphas),) if K == 1 else (len(alphas), len(betas))  # type: ignore[arg-type]
    loss = values.loss[:G].reshape(shape)
    acc = values.accuracy[:G].reshape(shape) if values.accuracy is not None else None
    center_loss = float(values.loss[G])
    center_acc = float(values.accuracy[G]) if values.accuracy is not None else None
    F = G + 1 + K * len(stencil)
    fit_loss = values.loss[G + 1 : F].reshape(K, len(stencil))
    fits = [quadratic_fit(fit_coords[k], fit_loss[k]) for k in range(K)]
    return Landscape(
        alphas=alphas,
        betas=betas if K == 2 else None,
        loss=loss,
        accuracy=acc,
        center_loss=center_loss,
        center_accuracy=center_acc,
        fits=fits,
        n=values.n,
        n_points=coords.shape[0],
        chunk=values.chunk,
        vmapped=values.vmapped,
        fit_coords=torch.stack(fit_coords),
        fit_loss=fit_loss,
        extra_loss=values.loss[F:] if extra is not None else None,
        mode=values.mode,
    )


def mean_loss(objective: Objective, data: DataSample, batch_size: int = 256) -> float:
    """The plain mean loss at the model's own weights (reference for the centre)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in data.batches(batch_size, objective.device, objective.dtype):
            total += float(objective.per_example_loss(batch).double().sum())
            n += batch_size_of(batch.inputs)
    return total / n


def load_endpoints(
    paths: Sequence[str | Path],
    center: LoadedModel,
    params: Mapping[str, Tensor],
    *,
    arch: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> list[dict[str, Tensor]]:
    """The selected parameters of each ``--to`` checkpoint, checked against the centre model
    (same architecture, same parameter names and shapes)."""
    from gmcurv.io.checkpoint import load_model

    out = []
    for path in paths:
        try:
            other = load_model(path, arch=arch, loss=center.loss, dtype=dtype, device=device)
        except GmcurvError as e:
            raise type(e)(f"--to {path}: {e.message}", e.hint) from None
        if other.arch != center.arch:
            raise CheckpointError(
                f"--to {path}: architecture {other.arch} differs from MODEL's {center.arch}",
                hint="--to needs checkpoints of the same architecture as MODEL",
            )
        named = dict(other.model.named_parameters())
        bad = [
            f"{k}: {tuple(named[k].shape)} vs {tuple(p.shape)}"
            for k, p in params.items()
            if k in named and tuple(named[k].shape) != tuple(p.shape)
        ]
        missing = [k for k in params if k not in named]
        if missing or bad:
            what = f"no parameter {missing[0]}" if missing else "; ".join(bad[:3])
            raise CheckpointError(
                f"--to {path}: parameters do not match MODEL's ({what})",
                hint="--to needs checkpoints of the same architecture and shapes as MODEL",
            )
        out.append({k: named[k].detach() for k in params})
    return out
