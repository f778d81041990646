"""Calibrated intervals for the head's scalar predictions, and their measured coverage.

For a scalar target ``t`` (Fisher trace, Hessian trace, top Hessian eigenvalue) the head's
held-out log-ratios ``r = ln(pred / true)`` on a calibration split give, per model-size bin
(number of parameters), the quantiles ``q_lo``, ``q_hi`` at ``(1 - level)/2`` and
``(1 + level)/2``. A new prediction ``p`` then gets the interval

    [p · exp(-q_hi), p · exp(-q_lo)]

which holds the truth exactly when ``q_lo <= r <= q_hi``: on the calibration split it covers
``level`` of the draws by construction; `coverage` measures the share on *other* splits
(unseen datasets and architectures) — the number the model card reports.

Bins: edges at the quantiles of ``log n_params`` of the calibration models (equal-count
bins); a bin with fewer than `MIN_PER_BIN` draws uses the pooled quantiles of all bins.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

LEVEL = 0.8
N_BINS = 3
MIN_PER_BIN = 20


@dataclass(frozen=True)
class Sample:
    """One held-out draw of one target: the model's size and ``ln(pred / true)``."""

    target: str
    n_params: int
    logratio: float


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty sequence."""
    v = sorted(values)
    if not v:
        return math.nan
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


@dataclass(frozen=True)
class Calibration:
    """Per target, per size bin: the log-ratio quantiles ``(q_lo, q_hi)`` and draw counts.

    ``edges`` are ``n_params`` bin boundaries (bin ``k`` holds ``edges[k-1] <= P <
    edges[k]``); ``pooled`` are the all-bin quantiles used where a bin is too small.
    """

    level: float
    edges: tuple[float, ...]
    quantiles: dict[str, list[tuple[float, float] | None]]
    counts: dict[str, list[int]]
    pooled: dict[str, tuple[float, float]]
    source: str = ""
    coverage: dict[str, Any] = field(default_factory=dict)

    def bin_of(self, n_params: int) -> int:
        return sum(n_params >= e for e in self.edges)

    def bounds(self, target: str, n_params: int) -> tuple[float, float] | None:
        """``(q_lo, q_hi)`` for a model of `n_params` (None: target not calibrated)."""
        if target not in self.quantiles:
            return None
        q = self.quantiles[target][self.bin_of(n_params)]
        return q if q is not None else self.pooled.get(target)

    def interval(self, target: str, value: float, n_params: int) -> tuple[float, float] | None:
        """The calibrated interval of a positive prediction `value` (see module doc)."""
        q = self.bounds(target, n_params)
        if q is None or not (math.isfinite(value) and value > 0):
            return None
        return value * math.exp(-q[1]), value * math.exp(-q[0])

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "edges": list(self.edges),
            "quantiles": {
                k: [None if q is None else list(q) for q in v] for k, v in self.quantiles.items()
            },
            "counts": self.counts,
            "pooled": {k: list(v) for k, v in self.pooled.items()},
            "source": self.source,
            "coverage": self.coverage,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        return cls(
            level=float(d["level"]),
            edges=tuple(float(e) for e in d["edges"]),
            quantiles={
                k: [None if q is None else (float(q[0]), float(q[1])) for q in v]
                for k, v in d["quantiles"].items()
            },
            counts={k: [int(c) for c in v] for k, v in d["counts"].items()},
            pooled={k: (float(v[0]), float(v[1])) for k, v in d["pooled"].items()},
            source=str(d.get("source", "")),
            coverage=dict(d.get("coverage", {})),
        )


def fit(
    samples: Iterable[Sample],
    level: float = LEVEL,
    n_bins: int = N_BINS,
    source: str = "",
    sizes: Sequence[int] | None = None,
) -> Calibration:
    """Quantiles of the log-ratios per target and size bin (see module doc).

    `sizes`: the calibration models' parameter counts (one per model) for the bin edges;
    default: those of the samples.
    """
    data = [s for s in samples if math.isfinite(s.logratio)]
    logs = sorted(math.log(p) for p in (sizes or [s.n_params for s in data]))
    edges = tuple(sorted({round(math.exp(quantile(logs, k / n_bins))) for k in range(1, n_bins)}))
    lo_q, hi_q = (1 - level) / 2, (1 + level) / 2
    quantiles: dict[str, list[tuple[float, float] | None]] = {}
    counts: dict[str, list[int]] = {}
    pooled: dict[str, tuple[float, float]] = {}
    probe = Calibration(level, edges, {}, {}, {})
    for target in sorted({s.target for s in data}):
        mine = [s for s in data if s.target == target]
        r_all = [s.logratio for s in mine]
        pooled[target] = (quantile(r_all, lo_q), quantile(r_all, hi_q))
        by_bin: list[list[float]] = [[] for _ in range(len(edges) + 1)]
        for s in mine:
            by_bin[probe.bin_of(s.n_params)].append(s.logratio)
        quantiles[target] = [
            (quantile(r, lo_q), quantile(r, hi_q)) if len(r) >= MIN_PER_BIN else None
            for r in by_bin
        ]
        counts[target] = [len(r) for r in by_bin]
    return Calibration(level, edges, quantiles, counts, pooled, source)


def coverage(cal: Calibration, samples: Iterable[Sample]) -> dict[str, dict[str, Any]]:
    """Share of `samples` whose truth falls in the calibrated interval, per target (and
    per size bin): ``q_lo <= ln(pred / true) <= q_hi``."""
    hits: dict[str, list[list[bool]]] = {}
    for s in samples:
        q = cal.bounds(s.target, s.n_params)
        if q is None or not math.isfinite(s.logratio):
            continue
        per_bin = hits.setdefault(s.target, [[] for _ in range(len(cal.edges) + 1)])
        per_bin[cal.bin_of(s.n_params)].append(q[0] <= s.logratio <= q[1])
    out = {}
    for target, per_bin in hits.items():
        flat = [h for b in per_bin for h in b]
        out[target] = {
            "coverage": sum(flat) / len(flat) if flat else math.nan,
            "n": len(flat),
            "by_bin": [sum(b) / len(b) if b else None for b in per_bin],
            "n_by_bin": [len(b) for b in per_bin],
        }
    return out
