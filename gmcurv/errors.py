"""Typed errors and warnings of the engine.

Every error carries a message that names the offending thing (a file, a layer, an option)
and a `hint` that says how to fix it. Only the front end turns them into text and exit codes.
"""

from __future__ import annotations


class GmcurvError(Exception):
    """Base class: bad input or a request the engine cannot honour (CLI exit code 2)."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class CheckpointError(GmcurvError):
    """A checkpoint cannot be read, or does not fit the architecture."""


class ArchitectureError(GmcurvError):
    """The architecture cannot be resolved or built."""


class DataError(GmcurvError):
    """A data sample cannot be read or fails validation."""


class ConfigError(GmcurvError):
    """An option or configuration value is invalid."""


class MemoryBudgetError(GmcurvError):
    """A planned allocation exceeds the memory budget (preflight)."""


class UnsupportedError(GmcurvError):
    """The request is valid but not supported for this model (e.g. a loss or layer type)."""


class ConvergenceError(GmcurvError):
    """An iterative estimate did not converge and strict mode was requested (CLI exit 3)."""

    exit_code = 3


class GmcurvWarning(UserWarning):
    """Warnings the front end shows on stderr (train-mode BatchNorm, dense fallbacks, ...)."""
