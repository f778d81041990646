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
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from gmcurv.errors import ConfigError, ConvergenceError, GmcurvWarning
from gmcurv.io.fileio import atomic_write_text, check_writable, ensure_not_input
from gmcurv.io.samples import sample_data, sample_model
from gmcurv.memory import human
from gmcurv.results import DataInfo, ModelInfo, Report, iter_estimates
from gmcurv.rules import evaluate, parse_rules

if TYPE_CHECKING:  # torch and the engine load on first use: --help stays instant
    import torch

    from gmcurv import distributed
    from gmcurv.data import DataSample
    from gmcurv.io.checkpoint import LoadedModel
    from gmcurv.objective import Objective

stdout = Console(highlight=False, soft_wrap=False)
stderr = Console(stderr=True, highlight=False)

# output options (parameter name -> option) checked by `Session.check_outputs`
OUTPUT_OPTIONS = {
    "output": "-o/--output",
    "plot": "--plot",
    "report_path": "--report",
    "save_pruned": "--save-pruned",
    "save_grid_to": "--save-grid",
    "save_vectors_to": "--save-vectors",
    "export": "--export",
}


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
    compute timings measure compute."""
    import torch.fx.experimental.symbolic_shapes  # noqa: F401


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
class Advance:
    """What `Session.progress` yields: ``advance(k)`` moves the bar by `k`;
    ``advance.phase(label, total)`` starts the next phase on the same bar."""

    bar: Progress
    task: Any

    def __call__(self, k: int = 1) -> None:
        self.bar.advance(self.task, k)

    def phase(self, label: str, total: int | None) -> None:
        self.bar.reset(self.task, total=total, description=label)


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
        from gmcurv.io.checkpoint import DEFAULT_LOSS_SOURCE, load_model
        from gmcurv.io.data import load_data
        from gmcurv.io.factories import load_loss
        from gmcurv.objective import Objective, labels_are_input_ids

        collected_warnings.clear()
        check_rules(ctx.params.get("fail_if"))  # a typo in a rule fails before any compute
        resolved = resolve_device(device)
        comm = distributed.init_from_env(resolved)  # no-op outside torchrun
        if comm.active and resolved.type == "cuda":
            resolved = comm.device
        s = cls(
            command=ctx.info_name or "gmcurv",
            config=resolved_config(ctx),
            seed=seed,
            device=resolved,
            dtype=resolve_dtype(getattr(dtype, "value", dtype)),
            quiet=quiet or not comm.main,
            json_mode=json_mode,
            comm=comm,
        )
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
        loss_name = getattr(loss, "value", loss)
        s.record_user_code(ctx, arch=arch, loss=loss_name)

        def load() -> None:
            s.loaded = load_model(model, arch=arch, loss=loss_name, dtype=s.dtype, device=s.device)
            s.inputs.append(Path(model))
            s.inputs.extend(sidecar_inputs(s.loaded))
            if need_data:
                s.data = load_data(data, samples).shard(comm.rank, comm.world)
                s.inputs.append(Path(data))

        def validate() -> None:
            assert s.loaded is not None and s.data is not None
            s.objective = Objective.build(
                s.loaded.model,
                load_loss(s.loaded.loss),
                layers,
                getattr(mode, "value", mode),
                seed or 0,
            )
            s.objective.check_data(s.data)  # this rank's share of the files
            if s.loaded.loss_source == DEFAULT_LOSS_SOURCE and labels_are_input_ids(s.data):
                raise ConfigError(
                    f"{data}: the labels equal the input ids (the Hugging Face causal-LM "
                    "convention) but nothing names the loss, and the default cross_entropy "
                    "would score every token against itself",
                    hint="pass --loss next_token (labels shifted by one inside the loss, as "
                    "transformers does), or --loss cross_entropy if the outputs are already "
                    "aligned with the labels",
                )
            if comm.active:
                s.note(f"rank {comm.rank}/{comm.world}: examples {s.data.span}")

        if need_data:
            with s.stage("startup"):
                warm_up_autograd()
        with s.stage("load"):
            distributed.agreed(load, comm)
        s.check_outputs(ctx)  # before any compute or write
        if need_data:
            with s.stage("validate"):
                distributed.agreed(validate, comm)
            s.warn_dense_fallback(ctx)
        s.record_choices()
        return s

    def check_outputs(self, ctx: typer.Context, extra: dict[str, Path | None] | None = None):
        """Every output path of the command (``-o``, ``--plot``, ``--save-pruned``,
        ``--save-grid``, ``--save-vectors``, ``--export``, plus `extra`) is refused before
        any compute when it is an input (or inside one), when two outputs coincide, or when
        its directory is missing or not writable."""
        outputs = {
            option: Path(value)
            for name, option in OUTPUT_OPTIONS.items()
            if isinstance(value := ctx.params.get(name), (str, Path))
        }
        outputs.update({k: Path(v) for k, v in (extra or {}).items() if v is not None})
        seen: dict[Path, str] = {}
        for option, path in outputs.items():
            if option == "--export" and (path.is_dir() or not path.suffix):
                ensure_not_input(path, self.inputs)  # a directory of adapters
                continue
            ensure_not_input(path, self.inputs)
            check_writable(path, option)
            key = path.expanduser().resolve()
            if key in seen:
                raise ConfigError(
                    f"{seen[key]} and {option} both name {path}",
                    hint="give each output its own file name",
                )
            seen[key] = option

    def record_user_code(self, ctx: typer.Context, **specs: str | None) -> None:
        """Say which user code ``--arch``/``--loss`` import and who named it (the command
        line, an environment variable or the working directory's config file): on stderr
        (even with --quiet when a config file named it) and under ``config.code``."""
        from gmcurv.io.factories import is_family_spec

        code = []
        for option, spec in specs.items():
            if not spec or ":" not in spec or is_family_spec(spec):
                continue
            source = self.config.get("sources", {}).get(option, "command line")
            named_in = source
            if source == "config file":
                from gmcurv.cli.options import read_config_file

                named_in = str(read_config_file()[1])
            code.append({"option": f"--{option}", "spec": spec, "named_in": named_in})
            text = f"--{option} imports user code {spec} (named in {named_in})"
            if source == "config file":
                stderr.print(f"[yellow]note:[/yellow] {text}", soft_wrap=True)
            else:
                self.note(text)
        if code:
            self.config["code"] = code

    def record_choices(self) -> None:
        """Record in ``config`` the choices made for the user, with why: the architecture
        and loss (from --arch/--loss, checkpoint metadata, config.json, a family default or
        the built-in default) and whether labels are shifted (next-token prediction)."""
        lm, sources = self.loaded, self.config.setdefault("sources", {})
        if lm is None:
            return
        for key, value, why in (
            ("arch", lm.arch, lm.arch_source),
            ("loss", lm.loss, lm.loss_source),
        ):
            if sources.get(key, "default") == "default":
                self.config[key], sources[key] = value, why
        if self.objective is not None:
            loss = self.objective.loss
            shift = getattr(loss, "shift", None)
            self.config["label_shift"] = shift
            sources["label_shift"] = (
                f"the {loss.name} loss: logits[:, :-1] against targets[:, 1:]"
                if shift
                else f"the {loss.name} loss: targets aligned with the outputs"
                if shift is not None
                else f"the {loss.name} loss decides"
            )

    def warn_dense_fallback(self, ctx: typer.Context) -> None:
        """Warn (into the report too) which modules get dense per-example gradients and
        the memory that takes — for commands that capture gradients (a ``--fisher`` option)."""
        if "fisher" not in ctx.params or self.objective is None or self.data is None:
            return
        if not self.comm.main:
            return  # one warning per job, from rank 0
        from gmcurv.capture.budget import estimate_capture

        fisher = getattr(ctx.params["fisher"], "value", ctx.params["fisher"])
        mc = ctx.params.get("mc_samples") or 1
        example = self.data.first(1, self.objective.device, self.objective.dtype)
        est = estimate_capture(self.objective, example, fisher, mc)
        if not est.dense_modules:
            return
        n = self.data.n
        batch = min(ctx.params.get("batch_size") or n, n)
        names = ", ".join(est.dense_modules[:6]) + (" ..." if len(est.dense_modules) > 6 else "")
        warnings.warn(
            f"parameters of {names} ({est.dense_params:,} in all) have no decomposed form: "
            f"their per-example gradients are computed densely with torch.func, about "
            f"{human(est.dense * batch)} per batch of {batch} ({human(est.dense * n)} for all "
            f"{n} examples when kept); leave them out with --layers if that is too much",
            GmcurvWarning,
            stacklevel=2,
        )

    # ------------------------------------------------------------------------- progress
    def note(self, text: str) -> None:
        if not self.quiet:
            stderr.print(f"[dim]note:[/dim] {text}")

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
        """A rich progress bar on stderr (hidden when quiet or not a terminal)."""
        disabled = self.quiet or not stderr.is_terminal
        bar = Progress(
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=stderr,
            transient=True,
            disable=disabled,
        )
        with bar:
            task = bar.add_task(label, total=total)
            yield Advance(bar, task)

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
        rules = [r for text in (fail_if or []) for r in parse_rules(text)]
        doc = report.to_dict()
        verdicts = evaluate(doc, rules) if rules else []  # bad paths fail before output
        if not self.comm.main:  # under torchrun only rank 0 prints and writes files
            if any(v.breached for v in verdicts):
                raise typer.Exit(1)
            return
        if output is not None:
            ensure_not_input(output, self.inputs)
            atomic_write_text(output, report.to_json() + "\n")
        if self.json_mode:
            typer.echo(report.to_json())
        else:
            render(report, stdout)
            if output is not None:
                self.note(f"report written to {output}")
        breached = [v for v in verdicts if v.breached]
        for v in verdicts:
            mark = "[red]FAIL[/red]" if v.breached else "[green]ok[/green]"
            if not self.quiet or v.breached:
                stderr.print(f"{mark} {v.rule} (actual {v.actual:.6g})")
        if strict:
            stuck = [p for p, e in iter_estimates(doc.get("results", {})) if not e["converged"]]
            if stuck:
                raise ConvergenceError(
                    f"{len(stuck)} estimate(s) did not converge: {', '.join(stuck[:5])}",
                    hint="raise --max-iters / --probes, or loosen --tol",
                )
        if breached:
            raise typer.Exit(1)


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
