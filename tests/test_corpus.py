"""The bad-input corpus (tests/corpus/cases.py): every case ends in its exit code with a
message naming the culprit and a hint, never a traceback, never touching an input (sha256
before and after), never leaving a partial output or a stray temporary."""

from __future__ import annotations

import os

import pytest
from corpus.cases import all_cases, build_inputs, classify, sha256_tree

CASES = all_cases()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    build_inputs(root)
    yield root, sha256_tree(root)
    (root / "readonly").chmod(0o755)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_corpus_case(corpus, case):
    if case.root_only is False and os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    root, baseline = corpus
    kind, detail = classify(case, root, baseline)
    if case.pending and kind != "clean":
        pytest.xfail(f"{case.pending}: {kind}")
    assert kind == "clean", f"{kind}: {detail}"


def test_corpus_breadth():
    """Every command is covered, and the corpus stays broad."""
    commands = {c.args[0] for c in CASES}
    assert {
        "info",
        "trace",
        "eigen",
        "spectrum",
        "saliency",
        "landscape",
        "lora",
        "check",
    } <= commands
    assert len(CASES) >= 280
