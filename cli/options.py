"""Options shared by the commands, and where their defaults come from.

Precedence: command line > ``GMCURV_*`` environment variable > config file > built-in
default. The config file is ``gmcurv.toml`` or the ``[tool.gmcurv]`` table of
``pyproject.toml`` in the working directory; top-level keys apply to every command and a
``[tool.gmcurv.<command>]`` (or ``[<command>]`` in gmcurv.toml) table to one command.
"""

from __future__ import annotations

import math
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from gmcurv.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class Curvature(str, Enum):
    fisher = "fisher"
    ggn = "ggn"
    hessian = "hessian"
    all = "all"


class FisherType(str, Enum):
    empirical = "empirical"
    mc = "mc"
    exact = "exact"


class Method(str, Enum):
    auto = "auto"
    exact = "exact"
    hutchinson = "hutchinson"
    hutchpp = "hutchpp"
    lanczos = "lanczos"
    gram = "gram"
    learned = "learned"
    both = "both"


class Mode(str, Enum):
    eval = "eval"
    train = "train"


class DType(str, Enum):
    float32 = "float32"
    float64 = "float64"


def _env(name: str) -> str:
    return f"GMCURV_{name}"


MODEL_HELP = "Checkpoint (.safetensors file or a directory with model.safetensors + config.json)."
DATA_HELP = "Data sample: a file or a directory of shards (.safetensors/.npz/.npy/.csv)."

ModelArg = Annotated[
    Path | None,
    typer.Argument(help=MODEL_HELP + " Default: the bundled sample.", show_default=False),
]
DataArg = Annotated[
    Path | None, typer.Argument(help=DATA_HELP + " Default: the sample's data.", show_default=False)
]
CurvatureOpt = Annotated[
    Curvature, typer.Option("--curvature", envvar=_env("CURVATURE"), help="Which curvature matrix.")
]
FisherOpt = Annotated[
    FisherType,
    typer.Option(
        "--fisher",
        envvar=_env("FISHER"),
        help="Fisher type: observed labels, labels sampled from the model, "
        "or the exact expectation.",
    ),
]
MethodOpt = Annotated[
    Method,
    typer.Option(
        "--method",
        envvar=_env("METHOD"),
        help="Estimator (auto picks exact closed forms where they exist).",
    ),
]
SamplesOpt = Annotated[
    int | None,
    typer.Option(
        "--samples",
        "-n",
        envvar=_env("SAMPLES"),
        min=1,
        help="Use the first N examples of DATA (default: all).",
        show_default=False,
    ),
]
BatchSizeOpt = Annotated[
    int,
    typer.Option(
        "--batch-size",
        "-b",
        envvar=_env("BATCH_SIZE"),
        min=1,
        help="Examples per batch (memory vs speed).",
    ),
]
ProbesOpt = Annotated[
    int,
    typer.Option(
        "--probes",
        envvar=_env("PROBES"),
        min=1,
        help="Random probes / matrix-vector products for stochastic estimators.",
    ),
]
KOpt = Annotated[
    int, typer.Option("--k", "-k", envvar=_env("K"), min=1, help="How many top eigenvalues.")
]
PerLayerOpt = Annotated[
    bool,
    typer.Option(
        "--per-layer/--no-per-layer", envvar=_env("PER_LAYER"), help="Also report each layer."
    ),
]
LayersOpt = Annotated[
    str | None,
    typer.Option(
        "--layers",
        envvar=_env("LAYERS"),
        help="Glob(s) on parameter or module names, comma-separated "
        "(e.g. 'net.0,net.2' or '*.weight').",
        show_default=False,
    ),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", envvar=_env("DEVICE"), help="auto | cpu | cuda[:i] | mps.")
]
DTypeOpt = Annotated[DType, typer.Option("--dtype", envvar=_env("DTYPE"), help="Compute dtype.")]
SeedOpt = Annotated[int, typer.Option("--seed", envvar=_env("SEED"), help="Random seed.")]
ModeOpt = Annotated[
    Mode,
    typer.Option(
        "--mode",
        envvar=_env("MODE"),
        help="Model mode: eval (deterministic) or train (BatchNorm/Dropout active).",
    ),
]
ArchOpt = Annotated[
    str | None,
    typer.Option(
        "--arch",
        envvar=_env("ARCH"),
        metavar="<mlp:ACT|hf:Class|file.py:factory|module:factory>",
        help="mlp:relu|tanh|gelu|... (an MLP built from the weights; the activation is "
        "required unless the checkpoint's metadata names it), hf:Class (a transformers class, "
        "e.g. hf:LlamaForCausalLM, built from the config.json beside the weights), or "
        "path/to/model.py:factory / "
        "package.module:factory, a no-argument function returning an nn.Module whose forward "
        "returns a tensor, a tuple (first element used), a dict or a Hugging Face ModelOutput "
        "(its 'logits'). Overrides metadata/config.json.",
        show_default=False,
    ),
]
LossOpt = Annotated[
    str | None,
    typer.Option(
        "--loss",
        envvar=_env("LOSS"),
        metavar="<cross_entropy|mse|next_token|file.py:fn>",
        help="Loss (default: from the checkpoint, else cross_entropy); or your own "
        "fn(outputs, targets) -> per-example losses [N] as path/to/file.py:fn or module:fn.",
        show_default=False,
    ),
]
McSamplesOpt = Annotated[
    int,
    typer.Option(
        "--mc-samples",
        envvar=_env("MC_SAMPLES"),
        min=1,
        help="Sampled labels per example for --fisher mc.",
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", envvar=_env("JSON"), help="Print only the JSON report on stdout.")
]
OutputOpt = Annotated[
    Path | None,
    typer.Option("--output", "-o", help="Write the JSON report to this file.", show_default=False),
]
PlotOpt = Annotated[
    Path | None,
    typer.Option("--plot", help="Write a plot (.png, .svg or .pdf).", show_default=False),
]
QuietOpt = Annotated[
    bool,
    typer.Option(
        "--quiet",
        "-q",
        envvar=_env("QUIET"),
        help="No progress bars or notes (errors still print).",
    ),
]
FailIfOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--fail-if",
        help="Exit 1 if this rule holds, e.g. 'fisher.trace > 100' (repeatable).",
        show_default=False,
    ),
]
StrictOpt = Annotated[
    bool,
    typer.Option(
        "--strict", envvar=_env("STRICT"), help="Exit 3 if an iterative estimate did not converge."
    ),
]


def finite(value: float | None) -> float | None:
    """Parse-time check: a finite number (NaN and infinity are refused)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def _max_memory(value: str | None) -> str | None:
    from gmcurv.memory import check_memory_option

    return check_memory_option(value)


TolOpt = Annotated[
    float,
    typer.Option(
        "--tol",
        envvar=_env("TOL"),
        min=0.0,
        callback=finite,
        help="Relative tolerance of iterative methods.",
    ),
]
MaxItersOpt = Annotated[
    int,
    typer.Option(
        "--max-iters", envvar=_env("MAX_ITERS"), min=1, help="Iteration cap of iterative methods."
    ),
]
MaxMemoryOpt = Annotated[
    str | None,
    typer.Option(
        "--max-memory",
        envvar=_env("MAX_MEMORY"),
        callback=_max_memory,
        help="Memory budget, e.g. '4GB' (default: half of available RAM).",
        show_default=False,
    ),
]


# -------------------------------------------------------------------------- config file
def _normalise(table: dict[str, Any]) -> dict[str, Any]:
    return {k.replace("-", "_"): v for k, v in table.items()}


def read_config_file(cwd: Path | None = None) -> tuple[dict[str, Any], Path | None]:
    """The gmcurv table from ``gmcurv.toml`` or ``pyproject.toml`` in `cwd`, and its path."""
    here = cwd or Path.cwd()
    for name, getter in (
        ("gmcurv.toml", lambda d: d),
        ("pyproject.toml", lambda d: d.get("tool", {}).get("gmcurv", {})),
    ):
        path = here / name
        if not path.is_file():
            continue
        try:
            table = getter(tomllib.loads(path.read_text()))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{path}: cannot parse: {e}", hint="fix the TOML syntax") from None
        if table:
            return table, path
    return {}, None


def default_map(commands: list[str], cwd: Path | None = None) -> dict[str, dict[str, Any]]:
    """click ``default_map``: per command, file defaults (command tables override globals)."""
    if os.environ.get("GMCURV_NO_CONFIG"):
        return {}
    table, _ = read_config_file(cwd)
    globals_ = _normalise({k: v for k, v in table.items() if not isinstance(v, dict)})
    out = {}
    for cmd in commands:
        specific = table.get(cmd, {})
        out[cmd] = {**globals_, **_normalise(specific if isinstance(specific, dict) else {})}
    return out
