"""Result records and the JSON report schema: the one source of truth for output.

Every number gmcurv reports is an `Estimate` (`gmcurv.estimate`): ``value`` with ``stderr``
(null when the value is exact on the sample), ``n_samples`` (examples, probes or iterations
it rests on), ``method`` and ``converged``. Optional fields say more: ``data_stderr`` is the
standard error of a sample quantity as an estimate of the population one (over examples),
``n_matvecs`` counts Hessian/GGN-vector products, ``residual`` is an eigenpair's residual.
A learned estimate (the GradMetaNet head) has no standard error (``stderr`` null) but a
calibrated ``interval`` ``[lo, hi]`` whose nominal coverage is ``interval_level`` (e.g. 0.8:
the 10-90 % quantiles of the head's held-out errors); such a value is not exact.

A `Report` wraps results with provenance (config, seed, device, dtype, model and data
identity, timings). `report_schema()` is the JSON Schema every report validates against;
it is published as ``gmcurv/schema/report.schema.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from gmcurv import __version__

SCHEMA_VERSION = "1.0"


@dataclass(frozen=True)
class ModelInfo:
    path: str
    sha256: str
    n_params: int
    arch: str
    arch_source: str
    loss: str


@dataclass(frozen=True)
class DataInfo:
    path: str
    n: int


@dataclass(frozen=True)
class Report:
    """A command's full, self-describing output."""

    command: str
    config: dict[str, Any]
    seed: int | None
    device: str
    dtype: str
    model: ModelInfo | None
    data: DataInfo | None
    results: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    schema_version: str = SCHEMA_VERSION
    gmcurv_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, tensors, numpy values and paths -> plain JSON values (NaN/Inf -> null)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):  # torch / numpy
        return to_jsonable(obj.tolist())
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "__fspath__"):
        return str(obj)
    return str(obj)


# -------------------------------------------------------------------------------- the schema
def report_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a report."""
    number = {"type": ["number", "null"]}
    estimate = {
        "type": "object",
        "required": ["value", "stderr", "n_samples", "method", "converged"],
        "properties": {
            "value": number,
            "stderr": {**number, "minimum": 0},
            "n_samples": {"type": "integer", "minimum": 0},
            "method": {"type": "string"},
            "converged": {"type": "boolean"},
            "data_stderr": {**number, "minimum": 0},
            "n_matvecs": {"type": ["integer", "null"], "minimum": 0},
            "residual": number,
            "interval": {
                "type": ["array", "null"],
                "items": number,
                "minItems": 2,
                "maxItems": 2,
            },
            "interval_level": {**number, "minimum": 0, "maximum": 1},
        },
        "additionalProperties": False,
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://gmcurv.invalid/schema/report.schema.json",
        "title": "gmcurv report",
        "type": "object",
        "required": [
            "schema_version", "gmcurv_version", "command", "config", "seed", "device",
            "dtype", "model", "data", "timings", "results", "warnings",
        ],
        "properties": {
            "schema_version": {"const": SCHEMA_VERSION},
            "gmcurv_version": {"type": "string"},
            "command": {"type": "string"},
            "config": {"type": "object"},
            "seed": {"type": ["integer", "null"]},
            "device": {"type": "string"},
            "dtype": {"type": "string"},
            "model": {
                "oneOf": [
                    {"type": "null"},
                    {
                        "type": "object",
                        "required": ["path", "sha256", "n_params", "arch", "arch_source", "loss"],
                        "properties": {
                            "path": {"type": "string"},
                            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                            "n_params": {"type": "integer", "minimum": 0},
                            "arch": {"type": "string"},
                            "arch_source": {"type": "string"},
                            "loss": {"type": "string"},
                        },
                    },
                ]
            },
            "data": {
                "oneOf": [
                    {"type": "null"},
                    {
                        "type": "object",
                        "required": ["path", "n"],
                        "properties": {
                            "path": {"type": "string"},
                            "n": {"type": "integer", "minimum": 1},
                        },
                    },
                ]
            },
            "timings": {"type": "object", "additionalProperties": {"type": "number"}},
            "results": {
                "type": "object",
                "properties": {"series": {"$ref": "#/$defs/series"}},
            },
            "warnings": {"type": "array", "items": {"type": "string"}},
        },
        "$defs": {"estimate": estimate, "series": _series_schema()},
    }  # fmt: skip


def _series_schema() -> dict[str, Any]:
    """``results.series`` of ``gmcurv trace CKPT... DATA``: one row per checkpoint, in order."""
    model = {
        "type": "object",
        "required": ["path", "sha256", "n_params", "arch", "arch_source", "loss"],
        "properties": {
            "path": {"type": "string"},
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "n_params": {"type": "integer", "minimum": 0},
        },
    }
    row = {
        "type": "object",
        "required": ["index", "step", "model", "results"],
        "properties": {
            "index": {"type": "integer", "minimum": 0},
            "step": {"type": ["integer", "null"], "minimum": 0},
            "model": model,
            "seconds": {"type": "number", "minimum": 0},
            "results": {"type": "object"},
        },
    }
    return {
        "type": "object",
        "required": ["x", "order", "checkpoints"],
        "properties": {
            "x": {"enum": ["step", "index"]},
            "order": {"type": "string"},
            "checkpoints": {"type": "array", "minItems": 1, "items": row},
        },
    }


def estimate_schema() -> dict[str, Any]:
    """The schema of one `Estimate` (for validating leaves of ``results``)."""
    return report_schema()["$defs"]["estimate"]


def is_estimate(node: Any) -> bool:
    """Whether a JSON node is a serialised `Estimate`."""
    return isinstance(node, dict) and {"value", "stderr", "n_samples", "method"} <= node.keys()


def iter_estimates(node: Any, path: str = ""):
    """Yield ``(dotted path, estimate dict)`` for every estimate inside a results tree."""
    if is_estimate(node):
        yield path, node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from iter_estimates(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from iter_estimates(v, f"{path}[{i}]")


if __name__ == "__main__":  # python -m gmcurv.results > gmcurv/schema/report.schema.json
    print(json.dumps(report_schema(), indent=2))
