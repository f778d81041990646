"""Head v2's card section: the zoo sentence, pinned-truth rows and the verdict text come
from the numbers alone."""

from __future__ import annotations

from gmcurv.gradmetanet.card import v2_section
from tests.test_gradmetanet_v2 import _summary


def _res(head_tr, head_top, cov=0.8):
    s = {"n": 10, "models": 5, "hvps_equal_time": 2, "trace": _summary(head_tr, 1.0, cov),
         "top": _summary(head_top, 1.0, cov),
         "head_over_backward": {"median": 3.0, "max": 4.0}}  # fmt: skip
    zoo = {
        "groups": 4, "groups_by_split": {"train": 2, "val": 1, "test-task": 1, "test-arch": 0},
        "models": 13, "train_groups": 2, "train_items": 48, "train_tasks": ["copy", "markov"],
        "tasks": ["chars", "copy", "markov"], "blocks": [1, 2], "widths": [32, 64],
        "heads": [1, 4], "steps": [0, 100], "cpu_seconds": 600, "wall_seconds": 1800,
    }  # fmt: skip
    return {"zoo": zoo, "summary": {"all-test": s, "all-test-reliable": s, "test-task": s}}


def test_v2_section_describes_the_zoo_and_pinned_truth_rows():
    text = v2_section(_res(0.9, 0.5))
    assert "Zoo: 4 groups (2 train, 1 val, 1 test-task), 13 models, 48 training sets" in text
    assert "tasks chars, copy, markov (training: copy, markov); 1/2 blocks, widths 32/64" in text
    assert "| held-out, truth pinned (Hutch++ s.e. <= 10 %) | 10 |" in text
    assert "Hessian trace, sets whose truth is pinned" in text


def test_v2_verdict_text_follows_the_numbers():
    lose = v2_section(_res(2.0, 0.5))
    assert "**the head v2 network is not shipped**" in lose
    assert (
        "Hessian trace: the head beats every equal-cost baseline (lower mean error, win rate"
        in lose
    )
    assert "on: none; it does not on: TinyLM, unseen task `chars`" in lose
    win = v2_section(_res(0.5, 0.5), {"head_over_backward_median": 1.0,
                                      "rows": [{"head_total": 1.0, "backward": 1.0}],
                                      "loadavg": [1.0]})  # fmt: skip
    assert "**the head v2 network is shipped**" in win
