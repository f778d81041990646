"""`Capturer`: decomposed per-example gradients of one batch."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from gmcurv.batch import Batch, batch_size_of, slice_inputs
from gmcurv.capture.dense import dense_blocks
from gmcurv.capture.gradients import Block, DecomposedGradients
from gmcurv.capture.plan import plan_capture
from gmcurv.capture.recording import Recorder, only_selected_require_grad
from gmcurv.capture.selfcheck import CheckReport, check_example, self_check
from gmcurv.capture.sources import block_source
from gmcurv.errors import ConfigError, GmcurvWarning
from gmcurv.losses import FISHER_TYPES
from gmcurv.objective import Objective
from gmcurv.rng import example_noise

CHECK_EXAMPLES = 8  # train mode: the one-off self-check's slice of the first batch


def _head(batch: Batch, m: int) -> Batch:
    """The first `m` examples of a batch (same start index: Monte Carlo noise agrees)."""
    targets = None if batch.targets is None else batch.targets[:m]
    return Batch(slice_inputs(batch.inputs, slice(0, m)), targets, batch.start)


@dataclass(frozen=True)
class CaptureSteps:
    """Progress inside a batch, for a sample captured as one batch (whose count of
    examples would sit at 0 until the end): ``phase(label, total)`` as each step starts —
    the hooked forward (one unit per module call), the backward (one per module output
    and Fisher column), the self-check (no count) — and ``tick(k)`` as units are done.
    Labels start with `prefix`."""

    phase: Callable[[str, int | None], None]
    tick: Callable[[float], None]
    prefix: str = ""

    def start(self, step: str, total: int | None) -> None:
        self.phase(f"{self.prefix}{step}", total)


class Capturer:
    """Captures `DecomposedGradients` batch by batch for one objective and Fisher type.

    The self-check (`check`, `gmcurv.capture.selfcheck`) runs once, on the first batch:
    in eval mode its first example alone against its row of the batch's capture; in train
    mode the first `CHECK_EXAMPLES` examples captured on their own. `check_report` says
    what was compared (None until a checked batch ran, or with ``check=False``).
    `steps`: progress inside each batch (`CaptureSteps`; None: none).
    """

    def __init__(
        self,
        objective: Objective,
        fisher: str = "empirical",
        mc_samples: int = 1,
        seed: int = 0,
        check: bool = True,
        steps: CaptureSteps | None = None,
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
        self._reference: tuple[Batch, Tensor] | None = None  # see `offer_reference`
        self.fallbacks: list[str] = []  # blocks moved to dense by the self-check
        self.check_report: CheckReport | None = None
        self.steps = steps

    def offer_reference(self, example: Batch, outputs: Tensor) -> None:
        """A hook-free forward of one example (outputs with their graph, e.g. the memory
        preflight's, `gmcurv.capture.budget.measure_capture`): kept for the eval-mode
        self-check when it is still to run, which then skips its own forward if the
        example is the first batch's first; dropped (with its graph) otherwise."""
        if self._check_pending and self.objective.mode == "eval" and len(example) == 1:
            self._reference = (example, outputs)

    @property
    def dense_modules(self) -> list[str]:
        """Module paths whose parameters need dense per-example gradients."""
        return [p.name for p in self.plans if p.kind == "dense"]

    def __call__(self, batch: Batch) -> DecomposedGradients:
        if not self._check_pending:
            return self._capture(batch)[0]
        self._check_pending = False
        n = len(batch)
        if self.objective.mode == "eval":
            reference, self._reference = self._reference, None
            dg, out, cols, broadcast = self._capture(batch)
            self._step("self-check: example 0 alone against autograd", None)
            bad, checked = check_example(self.objective, batch, dg, out, cols, broadcast, reference)
            del out, cols, reference
            report = CheckReport(
                1, n, "example 0 alone (hook-free forward and backward) against its "
                "gradient in the first batch's decomposed capture", checked
            )  # fmt: skip
            if not bad:
                self.check_report = report
                return dg
            del dg
        else:
            small = n <= CHECK_EXAMPLES
            part = batch if small else _head(batch, CHECK_EXAMPLES)
            dg, out, cols, broadcast = self._capture(part)
            self._step(f"self-check: {len(part):,} examples against autograd", None)
            bad = self_check(self.objective, part, dg, out, cols, broadcast)
            report = CheckReport(
                len(part), n, "sum over the slice captured on its own against a hook-free "
                "forward and backward of it", sum(b.kind != "dense" for b in dg.blocks)
            )  # fmt: skip
            if small and not bad:
                self.check_report = report
                return dg
            del dg
        if bad:
            self._to_dense(bad)
            report.fallbacks = list(bad)
        self.check_report = report
        return self._capture(batch)[0]

    def _step(self, step: str, total: int | None) -> None:
        if self.steps is not None:
            self.steps.start(step, total)

    def _to_dense(self, names: list[str]) -> None:
        """Capture the blocks `names` densely from now on."""
        self.fallbacks += names
        self.plans = [
            replace(p, kind="dense", modules=()) if p.name in names else p for p in self.plans
        ]

    def _noise(self, batch: Batch, out: Tensor) -> Tensor | None:
        """Monte Carlo draws for this batch, a function of (seed, example index) only."""
        if self.fisher != "mc":
            return None
        shape, kind = self.objective.loss.noise_spec(out.shape, self.mc_samples)
        return example_noise(
            self.seed, batch.start, out.shape[0], shape, kind, out.dtype, out.device
        )

    def _record(self, batch: Batch, recorder: Recorder) -> tuple[Tensor, Tensor, Tensor]:
        """One hooked forward and one backward per Fisher column ``c`` (cotangent
        ``G[c]``): (outputs, per-example losses, columns ``G``)."""
        obj = self.objective
        with only_selected_require_grad(obj.model, obj.params), torch.enable_grad():
            out = obj.outputs(batch.inputs)
            targets = obj.targets(batch, out)
            losses, cols = obj.loss.losses_and_columns(
                out, targets, self.fisher, self.mc_samples, self._noise(batch, out)
            )
            recorder.active = False
            outputs = recorder.outputs()
            C = cols.shape[0]
            columns = f" x {C} columns" if C > 1 else ""
            self._step(f"backward: {len(outputs):,} module outputs{columns}", len(outputs) * C)
            for c in range(C if outputs else 0):
                recorder.column = c
                torch.autograd.grad(
                    out, outputs, grad_outputs=cols[c], retain_graph=c < C - 1, allow_unused=True
                )
        return out, losses, cols

    def _capture(self, batch: Batch):
        """Decomposed gradients of `batch`: (gradients, outputs, columns, modules the
        recorder expanded over the batch)."""
        n = batch_size_of(batch.inputs)
        hooked = [p for p in self.plans if p.kind != "dense"]
        paths = [m for p in hooked for m in p.modules]
        tick = self.steps.tick if self.steps is not None else None
        recorder = Recorder(self.objective.model, paths, n, tick)
        self._step(f"forward of {n:,} examples: {len(paths):,} hooked modules", len(paths))
        try:
            out, losses, cols = self._record(batch, recorder)
        finally:
            recorder.remove()
        if recorder.unmapped:
            self._unmapped_to_dense(recorder.unmapped, n)
            return self._capture(batch)
        C = cols.shape[0]
        obj = self.objective
        blocks = [
            Block(p.name, p.kind, block_source(p, recorder, obj.model, obj.params, n, C))
            for p in hooked
        ]
        dense = [p for p in self.plans if p.kind == "dense"]
        if dense:
            blocks += dense_blocks(obj, dense, batch, cols)
        order = {p.name: i for i, p in enumerate(self.plans)}
        blocks.sort(key=lambda b: order[b.name])
        broadcast = {p.name for p in hooked if set(p.modules) & recorder.broadcast_modules()}
        dg = DecomposedGradients(tuple(blocks), self.fisher, losses.detach())
        return dg, out.detach(), cols, broadcast

    def _unmapped_to_dense(self, unmapped: dict[str, int], n: int) -> None:
        """Move blocks whose module inputs have no example structure to dense (with a note)."""
        self._to_dense([p.name for p in self.plans if set(p.modules) & set(unmapped)])
        shown = ", ".join(f"{m} ({r} rows)" for m, r in sorted(unmapped.items())[:4])
        warnings.warn(
            f"modules {shown} get inputs whose leading dimension is not a multiple of the "
            f"{n} examples of the batch, so rows cannot be mapped to examples; their "
            "per-example gradients are computed densely instead",
            GmcurvWarning,
            stacklevel=4,
        )
