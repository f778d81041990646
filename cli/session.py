"""What every analysis command does around its computation.

Resolve options (device, dtype, defaults to the bundled sample), load the model and data
through the engine, build the objective, time stages, show progress on stderr, assemble
the `Report`, print it (rich or JSON), write ``-o``, and apply ``--fail-if`` / ``--strict``.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from gmcurv.cli import startup
from gmcurv.cli.consoles import note, stderr, stdout
from gmcurv.cli.outputs import OUTPUT_OPTIONS, check_output_paths, publish
from gmcurv.cli.progress import Advance, progress_bar
from gmcurv.cli.provenance import record_choices, record_user_code
from gmcurv.errors import ConfigError, GmcurvWarning
from gmcurv.io.samples import sample_data, sample_model
from gmcurv.memory import human, keep_freed_memory
from gmcurv.results import DataInfo, ModelInfo, Report
from gmcurv.rules import parse_rules

if TYPE_CHECKING:  # torch and the engine load on first use: --help stays instant
    import torch

    from gmcurv import distributed
    from gmcurv.data import DataSample
    from gmcurv.io.checkpoint import LoadedModel
    from gmcurv.objective import Objective

__all__ = ["OUTPUT_OPTIONS", "Advance", "Session", "stderr", "stdout"]


def check_rules(texts: list[str] | None) -> None:
    """Parse every ``--fail-if`` rule now; an error names the option and the rule."""
    for text in texts or []:
        try:
            parse_rules(text)
        except ConfigError as e:
            raise ConfigError(f"--fail-if {text!r}: {e.message}", hint=e.hint) from None


def sidecar_inputs(loaded: LoadedModel) -> list[Path]:
    """Files read beside the weights (config.json, ...): inputs that outputs may not replace."""
    from gmcurv.io.masks import masks_path

    near = [
        loaded.path.parent / "config.json",
        masks_path(loaded.path),  # pruning masks
        *getattr(loaded, "sidecars", []),
    ]
    if loaded.path.name.endswith(".index.json"):  # a sharded checkpoint: every shard
        from gmcurv.io.tensors import index_shards

        near += list(set(index_shards(loaded.path).values()))
    return [Path(p) for p in near if Path(p).is_file()]


# Warnings raised during a command: printed at once on stderr and copied into the report.
collected_warnings: list[str] = []


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> cuda if available, else mps, else cpu; others are checked."""
    import torch

    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(
            f"unknown --device {spec!r}", hint="use auto, cpu, cuda[:i] or mps"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda requested but CUDA is not available", hint="use --device cpu (or auto)"
        )
    if device.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ConfigError(
            "--device mps requested but MPS is not available", hint="use --device cpu (or auto)"
        )
    return device


def resolve_dtype(name: str) -> torch.dtype:
    import torch

    return {"float32": torch.float32, "float64": torch.float64}[name]


def warm_up_autograd() -> None:
    """Pay torch's lazy imports of the first backward (``torch.autograd.grad`` with
    ``grad_outputs`` imports sympy through ``torch.fx``) once, as start-up, so that
    compute timings measure compute; and set malloc to reuse freed memory, large blocks
    included (`gmcurv.memory.keep_freed_memory`)."""
    import torch.fx.experimental.symbolic_shapes  # noqa: F401

    keep_freed_memory(large=True)


def _family_code(model: Path, arch: str | None) -> str:
    """What a Hugging Face checkpoint's load will import (``transformers``' model code, tens
    of seconds on a busy machine), so that start-up can pay it: '' for other models."""
    if arch and not arch.startswith("hf"):
        return ""
    folder = model if model.is_dir() else model.parent
    return "importing transformers" if (folder / "config.json").is_file() else ""


def _import_transformers() -> None:
    """Import the model code every ``transformers`` class loads (missing: the load says so)."""
    with contextlib.suppress(ImportError):
        import transformers.modeling_utils  # noqa: F401


_SOURCE_NAMES = {
    "COMMANDLINE": "command line",
    "ENVIRONMENT": "environment",
    "DEFAULT_MAP": "config file",
    "DEFAULT": "default",
    "PROMPT": "prompt",
}


def resolved_config(ctx: typer.Context) -> dict[str, Any]:
    """The command's options after precedence, with where each value came from."""
    values, sources = {}, {}
    for name, value in ctx.params.items():
        values[name] = (
            value.value
            if hasattr(value, "value")
            else (str(value) if isinstance(value, Path) else value)
        )
        src = ctx.get_parameter_source(name)
        sources[name] = _SOURCE_NAMES.get(src.name if src is not None else "", "default")
    values["sources"] = sources
    return values


@dataclass
class Session:
    """One command run: inputs, objective, timings and output."""

    command: str
    config: dict[str, Any]
    seed: int | None = None
    device: torch.device = None  # type: ignore[assignment]  # cpu (set in __post_init__)
    dtype: torch.dtype = None  # type: ignore[assignment]  # float32
    quiet: bool = False
    json_mode: bool = False
    loaded: LoadedModel | None = None
    data: DataSample | None = None
    objective: Objective | None = None
    timings: dict[str, float] = field(default_factory=dict)
    inputs: list[Path] = field(default_factory=list)
    cache: dict[Any, Any] = field(default_factory=dict)  # shared between phases of a command
    comm: distributed.Comm = None  # type: ignore[assignment]  # the current process group

    def __post_init__(self) -> None:
        import torch

        from gmcurv import distributed

        self.device = torch.device("cpu") if self.device is None else self.device
        self.dtype = torch.float32 if self.dtype is None else self.dtype
        self.comm = distributed.current() if self.comm is None else self.comm
        startup.release()  # collect from here on (after `open`'s start-up, when opened)

    # ------------------------------------------------------------------------- loading
    @classmethod
    def open(
        cls,
        ctx: typer.Context,
        model: Path | None,
        data: Path | None,
        *,
        arch: str | None = None,
        loss: Any = None,
        samples: int | None = None,
        device: str = "auto",
        dtype: Any = "float32",
        mode: Any = "eval",
        layers: str | None = None,
        seed: int | None = None,
        quiet: bool = False,
        json_mode: bool = False,
        need_data: bool = True,
    ) -> Session:
        """Load MODEL (and DATA) — the bundled sample when left out — and build the objective."""
        from gmcurv import distributed

        collected_warnings.clear()
        check_rules(ctx.params.get("fail_if"))  # a typo in a rule fails before any compute
        with startup.pinned():  # the collector stays off through start-up, then on
            s = _start(cls, ctx, device, dtype, seed, quiet, json_mode)
            if startup.BUSY:  # the entry point let idle OpenMP threads sleep
                s.note(
                    f"busy machine ({startup.BUSY}): idle threads sleep (OMP_WAIT_POLICY=PASSIVE)"
                )
            model, data = _default_inputs(s, model, data, need_data)
            loss_name = getattr(loss, "value", loss)
            s.record_user_code(ctx, arch=arch, loss=loss_name)
            if need_data:
                family = _family_code(model, arch)
                label = f"starting up{family and f' ({family})'}"
                with s.stage("startup"), s.progress(label, None):
                    warm_up_autograd()
                    if family:
                        _import_transformers()
        # no count to show: a spinner with the elapsed time (imports of torch's and the
        # model family's code, reading the checkpoint) — loading can take seconds
        with s.stage("load"), s.progress("loading the model and data", None):
            distributed.agreed(
                lambda: _load(s, model, data if need_data else None, arch, loss_name, samples),
                s.comm,
            )
        s.check_outputs(ctx)  # before any compute or write
        if need_data:
            with s.stage("validate"):
                distributed.agreed(lambda: _validate(s, data, layers, mode, seed), s.comm)
            s.warn_dense_fallback(ctx)
        s.record_choices()
        return s

    def check_outputs(self, ctx: typer.Context, extra: dict[str, Path | None] | None = None):
        """Refuse bad output paths before any compute (`gmcurv.cli.outputs`)."""
        check_output_paths(ctx, self.inputs, extra)

    def record_user_code(self, ctx: typer.Context, **specs: str | None) -> None:
        """Note the user code ``--arch``/``--loss`` import (`gmcurv.cli.provenance`)."""
        record_user_code(self.config, self.quiet, **specs)

    def record_choices(self) -> None:
        """Record the architecture, loss and label shift chosen (`gmcurv.cli.provenance`)."""
        record_choices(self.config, self.loaded, self.objective)

    def warn_dense_fallback(self, ctx: typer.Context) -> None:
        """Warn which modules get dense per-example gradients (`warn_dense_fallback`)."""
        if self.objective is not None and self.data is not None and self.comm.main:
            warn_dense_fallback(ctx, self.objective, self.data)

    # ------------------------------------------------------------------------- progress
    def note(self, text: str) -> None:
        note(text, self.quiet)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage into ``timings`` (seconds)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    @contextlib.contextmanager
    def progress(self, label: str, total: int | None) -> Iterator[Callable[[int], None]]:
        """A rich progress bar on stderr; none with --quiet, --json, stderr not a terminal, or
        on ranks other than 0 under torchrun (they share the terminal)."""
        hidden = self.quiet or self.json_mode or not stderr.is_terminal or not self.comm.main
        with progress_bar(label, total, disabled=hidden) as adv:
            yield adv

    # --------------------------------------------------------------------------- output
    def report(self, results: dict[str, Any]) -> Report:
        lm = self.loaded
        return Report(
            command=self.command,
            config=self.config,
            seed=self.seed,
            device=str(self.device),
            dtype=str(self.dtype).replace("torch.", ""),
            model=None
            if lm is None
            else ModelInfo(str(lm.path), lm.sha256, lm.n_params, lm.arch, lm.arch_source, lm.loss),
            data=None if self.data is None else DataInfo(str(self.data.path), self.data.n_total),
            results=results,
            timings={k: round(v, 6) for k, v in self.timings.items()},
            warnings=list(collected_warnings),
        )

    def finish(
        self,
        report: Report,
        render: Callable[[Report, Console], None],
        output: Path | None = None,
        fail_if: list[str] | None = None,
        strict: bool = False,
    ) -> None:
        """Print, write ``-o``, then gate: exit 1 on a breached rule, 3 on non-convergence."""
        publish(
            report, render, output=output, fail_if=fail_if, strict=strict, main=self.comm.main,
            inputs=self.inputs, json_mode=self.json_mode, quiet=self.quiet,
        )  # fmt: skip


# ----------------------------------------------------------------------- opening, in steps
def _start(
    cls: type[Session], ctx: typer.Context, device: str, dtype: Any, seed, quiet, json_mode
) -> Session:
    """The session on the resolved device (inside a torchrun process group, if any)."""
    from gmcurv import distributed

    resolved = resolve_device(device)
    comm = distributed.init_from_env(resolved)  # no-op outside torchrun
    if comm.active and resolved.type == "cuda":
        resolved = comm.device
    return cls(
        command=ctx.info_name or "gmcurv",
        config=resolved_config(ctx),
        seed=seed,
        device=resolved,
        dtype=resolve_dtype(getattr(dtype, "value", dtype)),
        quiet=quiet or not comm.main,
        json_mode=json_mode,
        comm=comm,
    )


def _default_inputs(
    s: Session, model: Path | None, data: Path | None, need_data: bool
) -> tuple[Path, Path | None]:
    """MODEL and DATA, the bundled sample's when MODEL is left out."""
    if model is None:
        model = sample_model()
        if data is None and need_data:
            data = sample_data()
        s.note(f"no MODEL given: using the bundled sample {model.parent.name}")
    if need_data and data is None:
        raise ConfigError(
            f"{s.command} needs DATA: a data file or directory",
            hint=f"gmcurv {s.command} MODEL DATA (or leave both out for the sample)",
        )
    return model, data


def _load(
    s: Session, model: Path, data: Path | None, arch: str | None, loss: Any, samples: int | None
) -> None:
    """Load the checkpoint (and this rank's share of DATA); record them as inputs."""
    from gmcurv.io.checkpoint import load_model
    from gmcurv.io.data import load_data

    s.loaded = load_model(model, arch=arch, loss=loss, dtype=s.dtype, device=s.device)
    s.inputs.append(Path(model))
    s.inputs.extend(sidecar_inputs(s.loaded))
    if data is not None:
        s.data = load_data(data, samples).shard(s.comm.rank, s.comm.world)
        s.inputs.append(Path(data))


def _validate(s: Session, data: Path | None, layers: str | None, mode: Any, seed) -> None:
    """Build the objective and check this rank's share of DATA against it."""
    from gmcurv.io.checkpoint import DEFAULT_LOSS_SOURCE
    from gmcurv.io.factories import load_loss
    from gmcurv.objective import Objective, refuse_unnamed_label_shift

    assert s.loaded is not None and s.data is not None
    s.objective = Objective.build(
        s.loaded.model, load_loss(s.loaded.loss), layers, getattr(mode, "value", mode), seed or 0
    )
    per_example = s.objective.check_data(s.data)  # this rank's share of the files
    warn_uneven_tokens(s.objective, s.data, per_example)
    named = s.loaded.loss_source != DEFAULT_LOSS_SOURCE
    refuse_unnamed_label_shift(s.data, named, str(data))
    if s.comm.active:
        s.note(f"rank {s.comm.rank}/{s.comm.world}: examples {s.data.span}")


def warn_uneven_tokens(objective: Objective, data: DataSample, per_example: Any) -> None:
    """Warn (into the report too) when examples score different numbers of tokens: gmcurv
    weights examples equally, ``L = (1/N) Σ_n mean_t ℓ[n,t]``, while the library's
    ``outputs.loss`` weights tokens equally, ``Σ_{n,t} ℓ[n,t] / Σ_n T_n``."""
    import torch

    from gmcurv.batch import Batch, batch_size_of

    counts = []
    for _, inputs, targets in data.shard_arrays():
        n = batch_size_of(inputs)
        stub = torch.empty((n, *per_example), device="meta")
        tgt = objective.targets(Batch(inputs, targets, 0), stub)
        got = objective.loss.valid_tokens(tgt)
        if got is None:
            return
        counts.append(got)
    if not counts:
        return
    t = torch.cat(counts)
    lo, hi = int(t.min()), int(t.max())
    if lo == hi:
        return
    warnings.warn(
        f"examples score between {lo} and {hi} tokens (labels != -100 after any shift): "
        f"gmcurv weights every example equally (L = mean over examples of each example's "
        f"mean token loss), so its loss and curvature differ from the library's "
        f"outputs.loss, which weights every token equally; fixed-length windows without "
        f"padding make the two the same",
        GmcurvWarning,
        stacklevel=3,
    )


def warn_dense_fallback(ctx: typer.Context, objective: Objective, data: DataSample) -> None:
    """Warn (into the report too) which modules get dense per-example gradients and the
    memory that takes — for commands that capture gradients (a ``--fisher`` option)."""
    if "fisher" not in ctx.params:
        return
    from gmcurv.capture.budget import estimate_capture
    from gmcurv.capture.plan import plan_capture

    if all(p.kind != "dense" for p in plan_capture(objective.model, objective.params)):
        return  # nothing dense: no forward needed to size it
    fisher = getattr(ctx.params["fisher"], "value", ctx.params["fisher"])
    mc = ctx.params.get("mc_samples") or 1
    example = data.first(1, objective.device, objective.dtype)
    est = estimate_capture(objective, example, fisher, mc)
    if not est.dense_modules:
        return
    n = data.n
    batch = min(ctx.params.get("batch_size") or n, n)
    names = ", ".join(est.dense_modules[:6]) + (" ..." if len(est.dense_modules) > 6 else "")
    warnings.warn(
        f"parameters of {names} ({est.dense_params:,} in all) have no decomposed form: "
        f"their per-example gradients are computed densely with torch.func, about "
        f"{human(est.dense * batch)} per batch of {batch} ({human(est.dense * n)} for all "
        f"{n} examples when kept); leave them out with --layers if that is too much",
        GmcurvWarning,
        stacklevel=3,
    )


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning` replacement: one line on stderr, copied into the report."""
    from gmcurv import distributed

    text = str(message)
    collected_warnings.append(text)
    if distributed.current().main:  # under torchrun, rank 0 speaks for all
        stderr.print(f"[yellow]warning:[/yellow] {text}")


@contextlib.contextmanager
def warnings_to_stderr() -> Iterator[None]:
    """Show gmcurv's own warnings (others only with GMCURV_DEBUG=1)."""
    with warnings.catch_warnings():
        warnings.simplefilter("always" if os.environ.get("GMCURV_DEBUG") else "ignore")
        warnings.simplefilter("always", GmcurvWarning)
        warnings.showwarning = show_warning
        yield
