"""Report schema, JSON conversion and CI gate rules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jsonschema
import pytest

from gmcurv.errors import ConfigError
from gmcurv.estimate import Estimate
from gmcurv.results import Report, iter_estimates, report_schema
from gmcurv.rules import evaluate, lookup, parse_rules

SCHEMA_FILE = Path(__file__).parents[1] / "gmcurv" / "schema" / "report.schema.json"


def _report(**results) -> dict:
    return Report("trace", {}, 0, "cpu", "float32", None, None, results).to_dict()


def test_published_schema_is_current():
    assert json.loads(SCHEMA_FILE.read_text()) == report_schema(), (
        "regenerate with: python -m gmcurv.results > gmcurv/schema/report.schema.json"
    )


def test_report_validates_and_nan_becomes_null():
    doc = _report(fisher={"trace": Estimate(float("nan"), None, 3, "exact")})
    jsonschema.validate(doc, report_schema())
    assert doc["results"]["fisher"]["trace"]["value"] is None
    assert json.loads(json.dumps(doc)) == doc
    assert [p for p, _ in iter_estimates(doc["results"])] == ["fisher.trace"]


def test_rules_parse_and_evaluate():
    doc = _report(
        fisher={
            "trace": Estimate(120.0, None, 10, "exact"),
            "eigenvalues": [Estimate(9.0, None, 10, "gram"), Estimate(2.0, None, 10, "gram")],
            "per_layer": {"net.0": {"trace": Estimate(5.0, 0.5, 10, "exact")}},
        },
    )
    rules = parse_rules(
        "fisher.trace > 100 and fisher.eigenvalues[1] <= 2, "
        "fisher.per_layer.net.0.trace.stderr < 0.1"
    )
    verdicts = evaluate(doc, rules)
    assert [v.breached for v in verdicts] == [True, True, False]
    assert lookup(doc, 'fisher.per_layer["net.0"].trace') == 5.0


def test_nan_breaches_and_bad_paths_are_errors():
    doc = _report(hessian={"trace": Estimate(math.nan, 1.0, 3, "hutchinson")})
    assert evaluate(doc, parse_rules("hessian.trace > 1e9"))[0].breached
    with pytest.raises(ConfigError, match="not in the report"):
        lookup(doc, "fisher.trace")
    with pytest.raises(ConfigError, match="cannot parse"):
        parse_rules("fisher.trace is big")
