"""Eval and train mode: which modules make them differ, and what each mode means here.

Curvature is taken of ``L(θ) = (1/N) Σ_n L_n(θ)`` with per-example losses ``L_n`` that
depend on example ``n`` alone. Two kinds of module change their answer with the mode:

- **BatchNorm** (``nn.BatchNorm1d/2d/3d``, ``SyncBatchNorm``). In eval mode it applies its
  running statistics: ``y = γ (x - μ_run) / sqrt(σ²_run + ε) + β``, a fixed per-channel
  affine map, so examples stay independent. In train mode ``μ`` and ``σ²`` are the batch's
  own, so every example's output depends on every other example in the batch: ``L_n`` is
  not a function of example ``n``, per-example gradients (and the Fisher built from them)
  are not defined, and the "curvature" would change with ``--batch-size``. Train mode with
  BatchNorm is therefore refused, as is a BatchNorm without running statistics
  (``track_running_stats=False``), which normalises with batch statistics in both modes.
- **Dropout** (any ``nn.Dropout*`` with ``p > 0``). In eval mode it is the identity. In
  train mode the masks are random; gmcurv draws them from ``--seed`` at every forward pass
  (`Objective.outputs` resets the generator), so every pass over a batch — the captured
  gradients, each Hessian-vector product, each loss evaluation — sees the *same* masks:
  the answer is the curvature of one thinned network ``f_M``, deterministic and
  reproducible, and iterative methods converge. It is one draw: it changes with ``--seed``
  and, since row ``i`` of every batch gets the same mask, with ``--batch-size``; average
  over seeds for ``E_M``.

Eval mode is the default; a warning names the modules whenever train mode would give a
different answer.
"""

from __future__ import annotations

import warnings

from torch import nn

from gmcurv.errors import ConfigError, GmcurvWarning

MODES = ("eval", "train")
_SHOWN = 6  # module names listed in a message before "..."


def batchnorm_modules(model: nn.Module) -> list[str]:
    """Module paths of the BatchNorm layers of `model`."""
    return [
        path or type(m).__name__
        for path, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


def dropout_modules(model: nn.Module) -> list[str]:
    """Module paths of the Dropout layers that drop something (``p > 0``)."""
    return [
        path or type(m).__name__
        for path, m in model.named_modules()
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0
    ]


def _names(paths: list[str]) -> str:
    shown = ", ".join(repr(p) for p in paths[:_SHOWN])
    return shown + (f" ... ({len(paths)} in all)" if len(paths) > _SHOWN else "")


def apply_mode(model: nn.Module, mode: str) -> None:
    """Put `model` in `mode`; refuse what has no per-example meaning, warn where the other
    mode would give a different answer (see the module docstring)."""
    if mode not in MODES:
        raise ConfigError(f"--mode must be eval or train, got {mode!r}", hint="use eval or train")
    bn = batchnorm_modules(model)
    no_stats = [
        path or type(m).__name__
        for path, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None
    ]
    if no_stats:
        raise ConfigError(
            f"BatchNorm without running statistics ({_names(no_stats)}): it normalises every "
            "example with the mean and variance of the whole batch, even in eval mode, so "
            "per-example gradients are not defined (each example's loss depends on the others)",
            hint="build the model with track_running_stats=True and load trained running "
            "statistics, or replace those layers by GroupNorm/LayerNorm",
        )
    if mode == "train" and bn:
        raise ConfigError(
            f"--mode train with BatchNorm ({_names(bn)}): in train mode BatchNorm normalises "
            "each example with the mean and variance of the whole batch, so every example's "
            "output depends on the other examples; per-example gradients, and the Fisher and "
            "curvature built from them, are not defined (they would change with --batch-size)",
            hint="use --mode eval (the default): BatchNorm then applies its running "
            "statistics, a fixed per-channel affine map",
        )
    model.train(mode == "train")
    dropout = dropout_modules(model)
    if mode == "train" and dropout:
        warnings.warn(
            f"--mode train with Dropout ({_names(dropout)}): the masks are drawn from --seed "
            "and reused by every pass over a batch, so the results are the curvature of one "
            "thinned network: they change with --seed and --batch-size (average over seeds "
            "for the expectation over masks)",
            GmcurvWarning,
            stacklevel=3,
        )
    elif mode == "eval" and (bn or dropout):
        parts = []
        if bn:
            parts.append(f"BatchNorm {_names(bn)} uses its running statistics")
        if dropout:
            parts.append(f"Dropout {_names(dropout)} is off")
        warnings.warn(
            "eval mode: "
            + " and ".join(parts)
            + "; --mode train would give a different answer ("
            + ", ".join(
                k for k, on in (("batch statistics", bn), ("random dropout masks", dropout)) if on
            )
            + "). This is the deterministic model used at inference",
            GmcurvWarning,
            stacklevel=3,
        )
