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


def _top_split(head, base, rate=0.9, cov=0.8):
    s = {"n": 10, "models": 5, "head": {"mean": head, "median": head}, "coverage_80": cov,
         "best_baseline": "plugin_seq", "gain_over_best": 1 - head / base, "hvps_equal_time": 1,
         "head_over_backward": {"median": 5.0, "max": 6.0}}  # fmt: skip
    for b in ("plugin_seq", "plugin", "mc_equal_time", "hutch_lanczos_equal_time"):
        s[b] = {"mean": base, "median": base, "head_win_rate": rate,
                "head_gain_mean": 1 - head / base}  # fmt: skip
    return s


def test_v2_top_section_states_per_split_verdicts_from_the_numbers():
    from gmcurv.gradmetanet.card import v2_top_section

    top = {
        "correction": {"penalty": 1.0, "shrink": 0.8, "cv_error": 0.6, "cv_error_plugin": 0.7,
                       "trained_on": {"sets": 40, "groups": ["a", "b"], "tasks": ["copy"]}},
        "equal_cost": "timed",
        "summary": {"all-test": _top_split(0.4, 0.6), "test-hf:gpt2": _top_split(0.5, 0.55, 0.4)},
    }  # fmt: skip
    text = v2_top_section(top)
    assert "| all held-out transformers | 10 | 0.400 / 0.400 |" in text
    assert "+33 % (plugin_seq) | 80 % (— / —) | yes | yes | met |" in text
    assert "no (plugin_seq, plugin, mc_equal_time, hutch_lanczos_equal_time) | missed" in text
    assert "on: all held-out transformers; it does not on: transformers GPT2LMHeadModel" in text
    assert "Interval: 10 / 90 % quantiles" in text  # no selection recorded: no rule claimed


def test_v2_top_section_states_the_interval_rule_and_the_coverage_verdict():
    from gmcurv.gradmetanet.card import v2_top_section

    nested = {
        "task_out": {"error": 0.6, "coverage": 0.79, "width": 1.9},
        "arch_out": {"error": 0.58, "coverage": 0.74, "width": 1.9},
    }
    s = {
        **_top_split(0.4, 0.6),
        "coverage_80": 0.93,
        "truth_below_interval": 0.0,
        "truth_above_interval": 0.07,
    }
    top = {
        "correction": {"penalty": 1.0, "shrink": 0.8, "cv_error": 0.6, "cv_error_plugin": 0.7,
                       "trained_on": {}, "calibration": "global", "interval": [-1.1, 0.8]},
        "summary": {"all-test": s},
        "selection": {"rules": ["rule one", "rule two"], "chosen": {"calibration": "global",
                      "clip": False}, "nested_on_training_groups": {"global": nested},
                      "heldout_of_every_candidate": {"global": {"all-test": {"error": 0.4,
                                                                            "coverage": 0.93}}}},
    }  # fmt: skip
    text = v2_top_section(top)
    assert "| 93 % (0 % / 7 %) | no |" in text
    assert "rule one. rule two." in text and "Chosen: **global**" in text
    assert "covers 79 % of the sets of a task it never saw" in text
    assert "conservative there and the 75-85 % target is **missed**" in text


def test_v2_trace_section_shows_equal_time_losses():
    from gmcurv.gradmetanet.card import v2_trace_section

    v = {"sets": 6, "hutchinson_probes_median": 5, "control_variate": {"mean": 0.2, "median": 0.1},
         "hutchinson_equal_time": {"mean": 0.1, "median": 0.05}, "cv_win_rate": 0.25,
         "cv_gain_mean": -1.0}  # fmt: skip
    tcv = {"summary": {
        "sets_pinned": 6, "plugin_rel_error_pinned": {"mean": 0.27}, "feature_over_hvp_median": 2.6,
        "var_R_over_var_H": {"median": 0.5}, "var_H_minus_M_over_var_H": {"median": 1.1},
        "cost_R_probe_over_H_probe_median": 2.4, "cost_times_var_ratio_below_1": 0.4,
        "equal_time_pinned": {"ggn_cv_1": v, "token_cv_9": {**v, "sets": 2}},
    }}  # fmt: skip
    text = v2_trace_section(tcv, {"shrink": 0.3, "head": {"mean": 0.25},
                                  "plugin": {"mean": 0.26}, "sets": 9})  # fmt: skip
    assert "| ggn control variate, k = 1 | 6 | 0.200 / 0.100 | 0.100 / 0.050 (5) | -100 % |" in text
    assert "token control variate, k = 9" not in text  # too few sets to show
    assert "gives 0.250 vs 0.260 on 9 sets" in text and "exits 2" in text


def test_targets_table_states_the_shipped_correction_per_split():
    from gmcurv.gradmetanet.card import top_targets

    ok = {**_top_split(0.4, 0.6), "coverage_80": 0.8}
    wide = {**_top_split(0.5, 0.55, 0.4), "coverage_80": 0.95}
    (gain, cov) = top_targets({"summary": {"all-test": ok, "test-hf:gpt2": wide}})
    assert not gain[1] and "all held-out transformers +33 % vs plugin_seq (met)" in gain[2]
    assert "transformers GPT2LMHeadModel" in gain[2] and "beaten by" in gain[2]
    assert (
        not cov[1]
        and "GPT2LMHeadModel 95 % of 10" in cov[2]
        and "transformers 80 % of 10" in cov[2]
    )


def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "bench" / "gradmetanet" / "bench_head_v2_top.py"
    spec = importlib.util.spec_from_file_location("bench_head_v2_top", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_v2_1_rule_decides_from_the_numbers_and_the_card_states_it():
    """The session-17 rule: coverage bands (all held-out, fresh) and no split worse than
    the shipped v2; the card says which head ships, with each condition."""
    from gmcurv.gradmetanet.card import v2_top_section

    bench = _bench()
    ref = {"all-test": {**_top_split(0.40, 0.6), "coverage_80": 0.80},
           "fresh:all-test": {**_top_split(0.45, 0.6), "coverage_80": 0.74},
           "test-hf:gpt2": {**_top_split(0.50, 0.6), "coverage_80": 0.8}}  # fmt: skip
    prev = {"all-test": {**_top_split(0.41, 0.6), "coverage_80": 0.88},
            "fresh:all-test": {**_top_split(0.46, 0.6), "coverage_80": 0.9},
            "test-hf:gpt2": {**_top_split(0.498, 0.6), "coverage_80": 0.7}}  # fmt: skip
    d = bench.ship_decision(ref, prev)
    ok = {c["what"].split(":")[0]: c["ok"] for c in d["conditions"]}
    assert ok["coverage, all held-out sets, in 75-85 %"]
    assert ok["coverage, fresh held-out sets, in 70-90 %"]  # 74 %: inside the wider band
    assert ok["test-hf"]  # 0.500 vs 0.498: within the 0.5 % tie
    assert d["ship"]
    prev["test-hf:gpt2"]["head"]["mean"] = 0.45
    assert not bench.ship_decision(ref, prev)["ship"]
    top = {
        "correction": {"penalty": 1.0, "shrink": 0.8, "cv_error": 0.6, "cv_error_plugin": 0.7,
                       "trained_on": {}, "calibration": "loss-bins", "robust": True},
        "summary": ref,
        "v2_1": {"rule": ["rule one"], "rule_file": "R.md", "chosen": {"name": "huber"},
                 "nested_on_training_groups": {"ridge": {"task_out": {"error": 0.6},
                                                         "arch_out": {"error": 0.5}}},
                 "decision": bench.ship_decision(ref, prev), "refit": {"summary": ref},
                 "previous": {"summary": prev},
                 "heldout_groups": {"seen": ["a"], "fresh": ["b", "c"]}},
    }  # fmt: skip
    text = v2_top_section(top)
    assert "a Huber-loss ridge correction" in text and "within the tertile" in text
    assert "**the refit is not shipped**" in text and "0.500 vs 0.450 (fails)" in text
    assert "1 seen last session, 2 fresh (b, c)" in text
    assert "| fresh held-out groups (never seen) | 10 | 0.450 / 0.450 |" in text
    assert "| fresh: all held-out transformers | 10 | 0.450 / 74 % | 0.460 / 90 % |" in text


def test_v2_2_rule_block_states_family_calibration_groups_and_exclusions():
    """Session 18's block: three nested schemes, the family calibration, fresh groups not
    built in time and snapshots left out for an unpinned truth are all stated."""
    from gmcurv.gradmetanet.card import v2_top_section

    bench = _bench()
    ref = {"all-test": {**_top_split(0.40, 0.6), "coverage_80": 0.80},
           "fresh:all-test": {**_top_split(0.45, 0.6), "coverage_80": 0.78}}  # fmt: skip
    prev = {"all-test": {**_top_split(0.42, 0.6), "coverage_80": 0.82},
            "fresh:all-test": {**_top_split(0.46, 0.6), "coverage_80": 0.7}}  # fmt: skip
    dec = bench.ship_decision(ref, prev)
    assert dec["ship"]
    nested = {"task-out": {"error": 0.6}, "arch-out": {"error": 0.5},
              "famgroup-out": {"error": 0.7}}  # fmt: skip
    top = {
        "correction": {"penalty": 1.0, "shrink": 0.8, "cv_error": 0.6, "cv_error_plugin": 0.7,
                       "trained_on": {}, "calibration": "family-bins",
                       "families": ["tiny", "gpt2", "llama"]},
        "summary": ref,
        "v2_2": {"session": 18, "rule": ["rule one"], "rule_file": "b/HEAD_V2_2_RULE.md",
                 "chosen": {"name": "ridge+family"},
                 "nested_on_training_groups": {"ridge": nested, "ridge+family": nested},
                 "decision": dec, "refit": {"summary": ref}, "previous": {"summary": prev},
                 "heldout_groups": {"seen": ["a"], "fresh": ["b"], "fresh_missing": ["c"]},
                 "unpinned_truth_excluded": [["g", 800, 0.0017, 0.063]]},
    }  # fmt: skip
    text = v2_top_section(top)
    assert "with a per-family offset (tiny / gpt2 / llama)" in text
    assert "within the set's model family" in text and "Session 18 refit" in text
    assert "ridge+family: 0.600 / 0.500 / 0.700" in text and "**the refit ships**" in text
    assert "1 seen before, 1 fresh (b); not built in time: c" in text
    assert "Left out (λ_max truth not pinned" in text and "g step 800" in text


def test_top_use_table_says_per_family_where_to_use_the_exact_engine():
    from gmcurv.gradmetanet.card import top_use_table

    good, bad = _top_split(0.3, 0.6), _top_split(0.7, 0.6)
    summ = {"test-task": {**good, "coverage_80": 0.8},
            "fresh:test-task": {**good, "coverage_80": 0.9},
            "test-hf:gpt2": {**good, "coverage_80": 0.7},
            "fresh:test-hf:gpt2": {**bad, "coverage_80": 0.6}}  # fmt: skip
    text = "\n".join(top_use_table(summ))
    task = next(x for x in text.splitlines() if x.startswith("| TinyLM (gmcurv's own)"))
    gpt2 = next(x for x in text.splitlines() if x.startswith("| GPT-2"))
    assert "wins: +50 %" in task and "the head for a one-capture estimate" in task
    assert "80 % (90 %)" in task
    assert "Lanczos): the head does not beat" in gpt2 and "on the fresh groups" in gpt2
    assert "Llama" not in text.split("| any other")[0]  # no Llama sets: no row
    assert "flags the family as out of range" in text
