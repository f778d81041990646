"""`Estimate`: one reported number and how far to trust it.

``value`` with ``stderr`` (None when the value is exact on the sample), ``n_samples``
(examples, probes or iterations it rests on), ``method`` and ``converged``; ``data_stderr``
is the standard error of a sample quantity as an estimate of the population one,
``n_matvecs`` counts Hessian/GGN-vector products, ``residual`` is an eigenpair's residual,
and a learned value carries a calibrated ``interval`` at nominal coverage
``interval_level`` instead of a standard error. Reports (`gmcurv.results`) serialise it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Estimate:
    """One reported number and how far to trust it."""

    value: float
    stderr: float | None
    n_samples: int
    method: str
    converged: bool = True
    data_stderr: float | None = None
    n_matvecs: int | None = None
    residual: float | None = None
    interval: tuple[float, float] | None = None
    interval_level: float | None = None

    @property
    def exact(self) -> bool:
        return self.stderr is None and self.interval is None

    @classmethod
    def exact_value(cls, value: float, n_samples: int, method: str, **kw: Any) -> Estimate:
        return cls(float(value), None, int(n_samples), method, True, **kw)
