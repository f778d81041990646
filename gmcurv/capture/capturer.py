"""`Capturer`: decomposed per-example gradients of one batch."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap
from torch.utils._pytree import tree_map

from gmcurv.attention import twice_differentiable_attention
from gmcurv.batch import Batch, batch_size_of, slice_inputs
from gmcurv.capture.gradients import Block, DecomposedGradients
from gmcurv.capture.plan import BlockPlan, module_kind, plan_capture
from gmcurv.capture.recording import Recorder, only_selected_require_grad
from gmcurv.capture.sources import BUILDERS
from gmcurv.errors import ConfigError, GmcurvWarning, UnsupportedError
from gmcurv.factors import (
    DenseGradients,
    SumOfSources,
)
from gmcurv.losses import FISHER_TYPES
from gmcurv.objective import Objective
from gmcurv.rng import example_noise

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
        recorder = Recorder(model, paths, n)
        try:
            with only_selected_require_grad(model, obj.params), torch.enable_grad():
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

    def _build(self, plan: BlockPlan, recorder: Recorder, n: int, columns: int):
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
            sources.append(BUILDERS[kind](module, calls, local, n, columns))
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
        with only_selected_require_grad(obj.model, obj.params), torch.enable_grad():
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
