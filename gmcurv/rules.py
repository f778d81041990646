"""Gate rules for CI: ``"fisher.trace > 100"``, ``"hessian.eigenvalues[0] <= 50"``.

Grammar: ``RULE := PATH OP NUMBER``, ``OP ∈ {<, <=, >, >=, ==, !=}``; several rules may be
joined with ``and`` or ``,``. ``PATH`` is looked up in the report's ``results`` (then in the
whole report): dot-separated keys, matched greedily so that layer names containing dots
work (``fisher.per_layer.net.0.trace``), ``["quoted keys"]`` and ``[index]`` for lists. A path
ending at an estimate means its ``value``; ``.stderr`` etc. pick another field.

A rule is *breached* when its comparison is true: ``--fail-if "fisher.trace > 100"`` fails
the run when the trace exceeds 100.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gmcurv.errors import ConfigError
from gmcurv.results import is_estimate

_OPS = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
}
_RULE = re.compile(
    r"""^\s*(?P<path>(?:[^<>=!"'\s]|"[^"]*"|'[^']*')+)\s*(?P<op><=|>=|==|!=|<|>)"""
    r"""\s*(?P<num>[-+0-9.eEinfINFna]+)\s*$"""
)


@dataclass(frozen=True)
class Rule:
    path: str
    op: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.path} {self.op} {self.threshold:g}"


@dataclass(frozen=True)
class Verdict:
    rule: Rule
    actual: float
    breached: bool


def parse_rules(text: str) -> list[Rule]:
    """Parse one or more rules (joined by ``and`` or ``,``)."""
    parts = [p for p in re.split(r"\s+and\s+|,(?![^\[]*\])", text) if p.strip()]
    if not parts:
        raise ConfigError(f"empty rule {text!r}", hint='write e.g. "fisher.trace > 100"')
    rules = []
    for part in parts:
        m = _RULE.match(part)
        if not m:
            raise ConfigError(
                f"cannot parse rule {part.strip()!r}",
                hint='write PATH OP NUMBER, e.g. "fisher.trace > 100" or '
                '"hessian.eigenvalues[0] <= 50"',
            )
        try:
            threshold = float(m["num"])
        except ValueError:
            raise ConfigError(
                f"rule {part.strip()!r}: {m['num']!r} is not a number",
                hint='write PATH OP NUMBER, e.g. "fisher.trace > 100"',
            ) from None
        rules.append(Rule(m["path"].strip(), m["op"], threshold))
    return rules


_TOKEN = re.compile(r"""\[\s*(?:"([^"]*)"|'([^']*)'|(-?\d+))\s*\]|([^.\[\]]+)|\.""")


def _tokens(path: str) -> list[str | int]:
    out: list[str | int] = []
    pos = 0
    while pos < len(path):
        m = _TOKEN.match(path, pos)
        if not m or m.end() == pos:
            raise ConfigError(
                f"cannot parse path {path!r}",
                hint='write dotted keys and [index], e.g. "fisher.eigenvalues[0]"',
            )
        quoted = m[1] if m[1] is not None else m[2]
        if quoted is not None:
            out.append(quoted)
        elif m[3] is not None:
            out.append(int(m[3]))
        elif m[4] is not None:
            out.append(m[4])
        pos = m.end()
    return out


def _walk(node: Any, tokens: list[str | int]) -> Any:
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if isinstance(tok, int):
            if not isinstance(node, list) or not -len(node) <= tok < len(node):
                raise KeyError(tok)
            node, i = node[tok], i + 1
            continue
        if not isinstance(node, Mapping):
            raise KeyError(tok)
        # greedy: the longest run of dot-joined tokens that is a key ("net.0")
        for j in range(len(tokens), i, -1):
            run = tokens[i:j]
            if all(isinstance(t, str) for t in run) and ".".join(run) in node:  # type: ignore[arg-type]
                node, i = node[".".join(run)], j  # type: ignore[arg-type]
                break
        else:
            raise KeyError(tok)
    return node


def lookup(report: Mapping[str, Any], path: str) -> float:
    """The number at `path` in a report dict (see module doc)."""
    tokens = _tokens(path)
    results = report.get("results", {})
    for root in (results if isinstance(results, Mapping) else {}, report):
        try:
            node = _walk(root, tokens)
            break
        except KeyError:
            continue
    else:
        available = sorted(results) if isinstance(results, Mapping) else []
        raise ConfigError(
            f"rule path {path!r} is not in the report",
            hint=f"top-level results: {', '.join(available) or 'none'}; "
            "see the report's JSON for full paths",
        )
    if is_estimate(node):
        node = node["value"]
    if isinstance(node, bool) or (not isinstance(node, int | float) and node is not None):
        raise ConfigError(
            f"rule path {path!r} points at {type(node).__name__}, not a number",
            hint="point the rule at a number or an estimate (its value is used), "
            'e.g. "fisher.trace > 100"',
        )
    return math.nan if node is None else float(node)


def evaluate(report: Mapping[str, Any], rules: list[Rule]) -> list[Verdict]:
    """Evaluate rules. A NaN/null value breaches every rule: a gate fails safe."""
    out = []
    for rule in rules:
        actual = lookup(report, rule.path)
        breached = math.isnan(actual) or bool(_OPS[rule.op](actual, rule.threshold))
        out.append(Verdict(rule, actual, breached))
    return out
