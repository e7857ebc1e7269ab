"""The μ/λ weight rules on synthetic candidate curves, and a replay of papers/002 Tables 7–9 through them."""

from statistics import mean

import pytest

from rr.errors import RRError
from rr.release.loop import nothing_left_to_forget, targets_met
from rr.release.weights import (
    RULE_BEST_WITHIN_BOUNCE, RULE_FORGET_TARGET, RULE_NONE, RULE_RECOVER_TARGET, RULE_RELATIVE_DROP,
    CandidateResult, candidate_grid, choose_forget_weight, choose_retain_weight, general_check_floor, perplexity_limit,
    relative_drop, utility_floor,
)


# --- forget weight (μ) ----------------------------------------------------------------------------------

def test_forget_rule_1_takes_the_smallest_weight_reaching_the_target():
    # Forget score falls with |μ|; 2 and 3 both reach ≤ 0.1·0.6 = 0.06, 2 is the smallest.
    candidates = [CandidateResult(w, s, u) for w, s, u in
                  [(3, 0.01, 0.30), (1, 0.20, 0.45), (2, 0.05, 0.40), (0.5, 0.40, 0.50)]]
    choice = choose_forget_weight(candidates, forget_ref=0.6, utility_ref=0.5)
    assert (choice.weight, choice.rule, choice.passed) == (2, RULE_FORGET_TARGET, True)
    assert "0.0500 ≤ 0.1 × 0.6000 = 0.0600" in choice.reason
    assert [c.weight for c in choice.evaluated] == [0.5, 1, 2, 3]


def test_forget_rule_2_takes_the_lowest_forget_score_among_relative_drop_passers():
    # Nothing reaches 0.06. Weight 4 has the lowest s but loses utility faster than it forgets
    # (forget drop 0.80, utility drop 0.90); among 1 and 2, weight 2 has the lower s.
    candidates = [CandidateResult(w, s, u) for w, s, u in
                  [(1, 0.40, 0.45), (2, 0.20, 0.30), (4, 0.12, 0.05)]]
    choice = choose_forget_weight(candidates, forget_ref=0.6, utility_ref=0.5)
    assert (choice.weight, choice.rule, choice.passed) == (2, RULE_RELATIVE_DROP, True)
    assert "relative forget drop 0.6667 exceeds the relative utility drop 0.4000" in choice.reason


def test_forget_rule_reports_when_no_candidate_passes():
    # Every weight destroys utility relatively more than it removes the target.
    candidates = [CandidateResult(w, s, u) for w, s, u in [(1, 0.55, 0.20), (2, 0.50, 0.05)]]
    choice = choose_forget_weight(candidates, forget_ref=0.6, utility_ref=0.5)
    assert (choice.weight, choice.rule, choice.passed) == (None, RULE_NONE, False)
    assert "lowest forget score was 0.5000 at weight 2" in choice.reason


def test_forget_rule_with_no_utility_left_compares_forget_scores_only():
    choice = choose_forget_weight([CandidateResult(1, 0.3, 0.0)], forget_ref=0.6, utility_ref=0.0)
    assert (choice.weight, choice.rule) == (1, RULE_RELATIVE_DROP)
    assert relative_drop(0.0, 0.3) == 0.0


def test_forget_utility_floor_refuses_a_weight_that_meets_rule_1_by_wrecking_utility():
    # The quickstart's step 3 (validation): μ = 1 removes every passing item but leaves utility 0.05 of a
    # base 0.35. The paper's rule takes it; with a floor of 0.5 × base = 0.175 the next weight that keeps
    # utility wins (here by rule 2), and the reason says how many were left out.
    candidates = [CandidateResult(w, s, u) for w, s, u in [(0.5, 0.05, 0.30), (1, 0.0, 0.05), (2, 0.0, 0.01)]]
    paper = choose_forget_weight(candidates, forget_ref=0.1, utility_ref=0.425)
    assert (paper.weight, paper.rule) == (1, RULE_FORGET_TARGET)
    floored = choose_forget_weight(candidates, forget_ref=0.1, utility_ref=0.425, utility_floor=0.5 * 0.35)
    assert (floored.weight, floored.rule, floored.passed) == (0.5, RULE_RELATIVE_DROP, True)
    assert "2 of 3 candidates left out for utility below the floor 0.1750" in floored.reason
    assert [c.weight for c in floored.evaluated] == [0.5, 1, 2]  # the report still shows every candidate
    nothing = choose_forget_weight(candidates[1:], forget_ref=0.1, utility_ref=0.425, utility_floor=0.175)
    assert (nothing.weight, nothing.rule) == (None, RULE_NONE) and "left out" in nothing.reason
    assert utility_floor(None, 0.35) is None and utility_floor(0.5, 0.35) == pytest.approx(0.175)
    with pytest.raises(ValueError, match="utility_floor"):
        choose_forget_weight(candidates, forget_ref=0.1, utility_ref=0.4, utility_floor=float("nan"))


def test_rules_refuse_non_finite_scores():
    with pytest.raises(ValueError, match="weight 2 has a non-finite utility_score"):
        choose_forget_weight([CandidateResult(2, 0.1, float("nan"))], forget_ref=0.6, utility_ref=0.5)
    with pytest.raises(ValueError, match="forget_ref"):
        choose_forget_weight([], forget_ref=-1, utility_ref=0.5)


# --- retain weight (λ) ----------------------------------------------------------------------------------

RETAIN_CURVE = [CandidateResult(w, s, u) for w, s, u in
                # utility recovers with λ, and the forgotten target creeps back with it
                [(0.1, 0.05, 0.50), (0.3, 0.10, 0.66), (0.5, 0.20, 0.72), (1.0, 0.45, 0.80)]]


def test_retain_rule_takes_the_smallest_weight_reaching_the_recover_target():
    # target 0.95 × 0.74 = 0.703: 0.5 and 1.0 reach it; 1.0 also breaks the bounce (0.45 > 0.03 + 0.3).
    choice = choose_retain_weight(RETAIN_CURVE, forget_ref=0.03, utility_base=0.74)
    assert (choice.weight, choice.rule, choice.passed) == (0.5, RULE_RECOVER_TARGET, True)


def test_retain_rule_bounce_excludes_weights_that_restore_the_target():
    # With a 0.1 bounce only 0.1 and 0.3 stay within s ≤ 0.13; neither reaches 0.703: best utility wins, flagged.
    choice = choose_retain_weight(RETAIN_CURVE, forget_ref=0.03, utility_base=0.74, forget_bounce=0.1)
    assert (choice.weight, choice.rule, choice.passed) == (0.3, RULE_BEST_WITHIN_BOUNCE, False)
    assert "no retain weight reaches utility ≥ 0.7030" in choice.reason


# The same curve with the validation perplexity of each λ (base 10.0): 0.5 brings utility back but leaves the
# general text at 12.0; 1.0 brings it to 10.8.
RETAIN_CURVE_WITH_TEXT = [CandidateResult(c.weight, c.forget_score, c.utility_score, perplexity)
                          for c, perplexity in zip(RETAIN_CURVE, [14.0, 13.0, 12.0, 10.8])]


def test_retain_rule_with_a_perplexity_limit_refuses_a_weight_that_leaves_general_text_damaged():
    limit = perplexity_limit(0.1, 10.0)
    assert limit == pytest.approx(11.0)
    choice = choose_retain_weight(RETAIN_CURVE_WITH_TEXT, forget_ref=0.2, utility_base=0.74, max_perplexity=limit)
    assert (choice.weight, choice.rule, choice.passed) == (1.0, RULE_RECOVER_TARGET, True)
    assert "perplexity 10.800 ≤ 11.000" in choice.reason
    # Without the limit the paper's rule takes 0.5, whose perplexity is 20% over the base model's.
    assert choose_retain_weight(RETAIN_CURVE_WITH_TEXT, forget_ref=0.2, utility_base=0.74).weight == 0.5
    # When no λ keeps the text, the recover target is missed (passed=False, so the search widens the grid).
    missed = choose_retain_weight(RETAIN_CURVE_WITH_TEXT[:3], forget_ref=0.2, utility_base=0.74, max_perplexity=limit)
    assert (missed.rule, missed.passed) == (RULE_BEST_WITHIN_BOUNCE, False)
    assert "and perplexity ≤ 11.000" in missed.reason
    # Missed, the fallback takes the highest utility among the weights that keep the text, when any does:
    # 0.5 has more utility than 0.3 but leaves perplexity at 20.
    flipped = [CandidateResult(0.3, 0.1, 0.60, 13.0), CandidateResult(0.5, 0.1, 0.66, 20.0)]
    assert choose_retain_weight(flipped, forget_ref=0.2, utility_base=0.74, max_perplexity=13.5).weight == 0.3
    # A non-finite perplexity (a broken model) never keeps the text, and without a limit it is not read at all.
    broken = [CandidateResult(0.5, 0.1, 0.72, float("nan")), CandidateResult(1.0, 0.1, 0.72, 10.5)]
    assert choose_retain_weight(broken, forget_ref=0.2, utility_base=0.74, max_perplexity=limit).weight == 1.0
    assert choose_retain_weight(broken, forget_ref=0.2, utility_base=0.74).weight == 0.5
    assert perplexity_limit(None, 10.0) is None
    with pytest.raises(ValueError, match="no perplexity"):
        choose_retain_weight(RETAIN_CURVE, forget_ref=0.2, utility_base=0.74, max_perplexity=limit)
    with pytest.raises(RRError, match="base model's validation perplexity"):
        perplexity_limit(0.1, None)


# The same curve with each λ's validation general check (base 0.625): 0.5 brings utility back with the everyday
# instructions at 0.525 (84%), 1.0 brings them to 0.65. The case that made the quickstart miss its target.
RETAIN_CURVE_WITH_CHECK = [CandidateResult(c.weight, c.forget_score, c.utility_score, general_check=check)
                           for c, check in zip(RETAIN_CURVE, [0.25, 0.45, 0.525, 0.65])]


def test_retain_rule_with_a_general_check_floor_refuses_a_weight_that_leaves_the_instructions_damaged():
    floor = general_check_floor(0.95, 0.625)
    assert floor == pytest.approx(0.59375)
    choice = choose_retain_weight(RETAIN_CURVE_WITH_CHECK, forget_ref=0.2, utility_base=0.74, min_general_check=floor)
    assert (choice.weight, choice.rule, choice.passed) == (1.0, RULE_RECOVER_TARGET, True)
    assert "general check 0.650 ≥ 0.594" in choice.reason
    assert choose_retain_weight(RETAIN_CURVE_WITH_CHECK, forget_ref=0.2, utility_base=0.74).weight == 0.5
    missed = choose_retain_weight(RETAIN_CURVE_WITH_CHECK[:3], forget_ref=0.2, utility_base=0.74,
                                  min_general_check=floor)
    assert (missed.rule, missed.passed) == (RULE_BEST_WITHIN_BOUNCE, False)
    assert "and general check ≥ 0.594" in missed.reason and "general check 0.525)" in missed.reason
    # Both limits at once: a λ must keep the text and the instructions.
    both = [CandidateResult(0.5, 0.1, 0.72, 12.0, 0.7), CandidateResult(1.0, 0.1, 0.72, 10.5, 0.5),
            CandidateResult(2.0, 0.1, 0.72, 10.5, 0.7)]
    assert choose_retain_weight(both, forget_ref=0.2, utility_base=0.74, max_perplexity=11.0,
                                min_general_check=0.6).weight == 2.0
    # Missed with both limits set and none keeping both: the fallback prefers the text, then the check.
    neither = [CandidateResult(0.5, 0.1, 0.65, 10.5, 0.4), CandidateResult(1.0, 0.1, 0.69, 12.0, 0.4),
               CandidateResult(2.0, 0.1, 0.68, 12.0, 0.7)]
    fallback = choose_retain_weight(neither, forget_ref=0.2, utility_base=0.74, max_perplexity=11.0,
                                    min_general_check=0.6)
    assert (fallback.weight, fallback.passed) == (0.5, False)
    assert choose_retain_weight(neither[1:], forget_ref=0.2, utility_base=0.74, max_perplexity=11.0,
                                min_general_check=0.6).weight == 2.0
    # A non-finite check never keeps the instructions; a missing one is an error only when the floor is set.
    broken = [CandidateResult(0.5, 0.1, 0.72, general_check=float("nan")), CandidateResult(1.0, 0.1, 0.72,
                                                                                         general_check=0.6)]
    assert choose_retain_weight(broken, forget_ref=0.2, utility_base=0.74, min_general_check=floor).weight == 1.0
    assert general_check_floor(None, 0.6) is None
    with pytest.raises(ValueError, match="no general check"):
        choose_retain_weight(RETAIN_CURVE, forget_ref=0.2, utility_base=0.74, min_general_check=floor)
    with pytest.raises(RRError, match="task.n_general_check_validation"):
        general_check_floor(0.95, None)


def test_targets_met_holds_the_general_check_floor_too():
    base = {"forget_score": 0.5, "utility_score": 0.4}
    kept = {"forget_score": 0.0, "utility_score": 0.4, "metrics": {"general_check_instructions": 0.6}}
    assert targets_met(kept, base, 0.025, 0.95, min_general_check=0.59).endswith("general check 0.600 ≥ 0.590")
    assert targets_met(kept, base, 0.025, 0.95, min_general_check=0.61) is None
    assert targets_met({**kept, "metrics": {}}, base, 0.025, 0.95, min_general_check=0.1) is None
    assert targets_met(kept, base, 0.025, 0.95) is not None


def test_retain_rule_reports_when_every_weight_breaks_the_bounce():
    choice = choose_retain_weight(RETAIN_CURVE[1:], forget_ref=0.03, utility_base=0.74, forget_bounce=0.05)
    assert (choice.weight, choice.rule, choice.passed) == (None, RULE_NONE, False)
    assert "0.0300 + 0.05 = 0.0800" in choice.reason


def test_candidate_grid_widens_both_ways_and_keeps_signs():
    assert candidate_grid([0.3, 1.0], widen_factor=2) == [0.15, 0.3, 0.5, 0.6, 1.0, 2.0]
    assert candidate_grid([-1.0, 4.0], widen_factor=2) == [-0.5, -1.0, -2.0, 2.0, 4.0, 8.0]
    with pytest.raises(ValueError, match="widen_factor"):
        candidate_grid([1.0], widen_factor=1.0)


# --- replay of papers/002 Tables 7–9 --------------------------------------------------------------------
#
# Each row is one step as the paper applied it: the single weight it reports, evaluated as a one-candidate
# search. s_ref and u_ref are the previous row's scores; u_base is step 0. Scores:
#   Table 7 (toxicity, Llama-3-8B): s = challenge expected max toxicity, u = 1/PPL (WikiText-2)
#   Table 8 (NER):                  s = Person F1, u = mean F1 of Org, Concept, Location, Date
#   Table 9 (code):                 s = MBPP pass@1, u = GSM8K accuracy
# Defaults: forget_fraction 0.9, recover_fraction 0.95, forget_bounce 0.3 (absolute).
#
# What the replay finds (recorded in EXPECTED below, not forced):
#   - Only three μ steps reach rule 1 (s ≤ 0.1·s_ref): Table 8 step 5 (0.3184 → 0.0306) and Table 9
#     steps 1 and 3 (0.659 → 0.053, 0.106 → 0.003). The other μ steps pass by rule 2 alone, by wide
#     margins (forget drops 0.35–0.63 against utility drops 0.04–0.40).
#   - Two λ steps miss the 0.95·u_base recover target and are only "best within the bounce":
#     Table 8 step 4 (mean F1 0.4037 < 0.4404) and Table 9 step 2 (GSM8K 0.6823 < 0.7065).
#   - The largest forget-score bounce the paper accepts is +0.2904 (Table 8 step 6, Person F1
#     0.0306 → 0.3210); any forget_bounce below that would reject that step.

TABLE_7 = [  # step, weight, PPL, challenge toxicity score
    (0, None, 7.2055, 0.7310), (1, -3, 7.8092, 0.3415), (2, +0.3, 6.8652, 0.4689), (3, -0.2, 7.5513, 0.3047)]
TABLE_8 = [  # step, weight, Person, Org, Concept, Location, Date F1
    (0, None, 0.5370, 0.4501, 0.2123, 0.4747, 0.7173), (1, -5, 0.2474, 0.2564, 0.0883, 0.3024, 0.4738),
    (2, +0.3, 0.4780, 0.4489, 0.1975, 0.4687, 0.6999), (3, -0.4, 0.1788, 0.3380, 0.0921, 0.3233, 0.4894),
    (4, +0.3, 0.3184, 0.4205, 0.1446, 0.4335, 0.6161), (5, -0.3, 0.0306, 0.2044, 0.0693, 0.2439, 0.2958),
    (6, +1.0, 0.3210, 0.5410, 0.2456, 0.5363, 0.7300), (7, -0.1, 0.1430, 0.5242, 0.2299, 0.5157, 0.7005)]
TABLE_9 = [  # step, weight, MBPP, GSM8K
    (0, None, 0.659, 0.7437), (1, -4, 0.053, 0.5959), (2, +1, 0.106, 0.6823), (3, -0.4, 0.003, 0.6505)]


def _steps(table: str):
    """(weight, forget_score, utility_score) per row of a table, with u oriented higher-is-better."""
    if table == "7":
        return [(w, tox, 1 / ppl) for _, w, ppl, tox in TABLE_7]
    if table == "8":
        return [(w, person, mean(kept)) for _, w, person, *kept in TABLE_8]
    return [(w, mbpp, gsm8k) for _, w, mbpp, gsm8k in TABLE_9]


EXPECTED = [  # table, step, rule that passes, passed   — one row per μ/λ step of the paper
    ("7", 1, RULE_RELATIVE_DROP, True),       # −μ0=−3:   tox 0.7310 → 0.3415 (−53%), 1/PPL −7.7%
    ("7", 2, RULE_RECOVER_TARGET, True),      # +λ1=0.3:  PPL 6.87 < base 7.21; tox +0.127 within bounce
    ("7", 3, RULE_RELATIVE_DROP, True),       # −μ1=−0.2: tox 0.4689 → 0.3047 (−35%), 1/PPL −9.1%
    ("8", 1, RULE_RELATIVE_DROP, True),       # −μ0=−5:   Person 0.5370 → 0.2474 (−54%), kept F1 −40%
    ("8", 2, RULE_RECOVER_TARGET, True),      # +λ1=0.3:  kept F1 0.4537 ≥ 0.4404; Person +0.231
    ("8", 3, RULE_RELATIVE_DROP, True),       # −μ1=−0.4: Person 0.4780 → 0.1788 (−63%), kept F1 −32%
    ("8", 4, RULE_BEST_WITHIN_BOUNCE, False),  # +λ2=0.3:  kept F1 0.4037 < 0.4404: target missed
    ("8", 5, RULE_FORGET_TARGET, True),       # −μ2=−0.3: Person 0.3184 → 0.0306 ≤ 0.0318
    ("8", 6, RULE_RECOVER_TARGET, True),      # +λ3=1.0:  kept F1 0.5132; Person +0.2904 (largest bounce)
    ("8", 7, RULE_RELATIVE_DROP, True),       # −μ3=−0.1: Person 0.3210 → 0.1430 (−55%), kept F1 −4%
    ("9", 1, RULE_FORGET_TARGET, True),       # −μ0=−4:   MBPP 0.659 → 0.053 ≤ 0.0659
    ("9", 2, RULE_BEST_WITHIN_BOUNCE, False),  # +λ1=1:    GSM8K 0.6823 < 0.95 × 0.7437 = 0.7065: target missed
    ("9", 3, RULE_FORGET_TARGET, True),       # −μ1=−0.4: MBPP 0.106 → 0.003 ≤ 0.0106
]


@pytest.mark.parametrize("table, step, rule, passed", EXPECTED, ids=[f"table{t}-step{s}" for t, s, *_ in EXPECTED])
def test_paper_tables_replay(table, step, rule, passed):
    steps = _steps(table)
    _, _, utility_base = steps[0]
    _, forget_ref, utility_ref = steps[step - 1]
    weight, forget_score, utility_score = steps[step]
    candidate = CandidateResult(abs(weight), forget_score, utility_score)
    if weight < 0:
        choice = choose_forget_weight([candidate], forget_ref=forget_ref, utility_ref=utility_ref)
    else:
        choice = choose_retain_weight([candidate], forget_ref=forget_ref, utility_base=utility_base)
    assert (choice.rule, choice.passed) == (rule, passed), choice.reason
    assert choice.weight == abs(weight)


def test_replay_covers_every_step_of_the_three_tables():
    assert sorted((t, s) for t, s, *_ in EXPECTED) == sorted(
        [("7", s) for s in range(1, 4)] + [("8", s) for s in range(1, 8)] + [("9", s) for s in range(1, 4)])


def test_a_bounce_below_the_papers_largest_rejects_table_8_step_6():
    steps = _steps("8")
    _, person, kept = steps[6]
    choice = choose_retain_weight([CandidateResult(1.0, person, kept)], forget_ref=steps[5][1],
                                  utility_base=steps[0][2], forget_bounce=0.25)
    assert (choice.weight, choice.rule) == (None, RULE_NONE)


# --- when the loop stops --------------------------------------------------------------------------------

def test_a_later_forget_step_with_nothing_left_to_forget_does_not_run():
    # The quickstart of 2026-11-25: after +1·R the validation pass@1 was 0, rule 1 then "passed" at −0.5
    # and that step cut test arithmetic from 0.292 to 0.108 while forgetting nothing more.
    reason = nothing_left_to_forget(3, "forget", forget_before=0.0, stop_below=None)
    assert reason and "already 0.000" in reason and "step 3" in reason
    assert nothing_left_to_forget(3, "forget", forget_before=0.05, stop_below=None) is None
    assert nothing_left_to_forget(3, "forget", forget_before=0.04, stop_below=0.05) is not None
    assert nothing_left_to_forget(2, "retain", forget_before=0.0, stop_below=None) is None
    assert nothing_left_to_forget(1, "forget", forget_before=0.0, stop_below=None) is None  # the base is the reference


def test_the_loop_stops_once_forget_and_utility_targets_both_hold():
    base = {"forget_score": 0.25, "utility_score": 0.35}
    # After −μ0·F0: forgotten, but utility 0.125 < 0.95 × 0.35: the retain step must still run.
    assert targets_met({"forget_score": 0.0, "utility_score": 0.125}, base, 0.05, 0.95) is None
    # After +λ1·R1: one validation problem still passes (0.05 ≤ 0.05) and utility is back: stop.
    reason = targets_met({"forget_score": 0.05, "utility_score": 0.375}, base, 0.05, 0.95)
    assert reason and "0.050 ≤ 0.05" in reason and "0.375 ≥ 0.95 × base 0.350" in reason
    assert targets_met({"forget_score": 0.10, "utility_score": 0.375}, base, 0.05, 0.95) is None
    assert targets_met({"forget_score": 0.0, "utility_score": 0.375}, base, None, 0.95) is None  # no target set
    # With a perplexity limit, the general text must be back too.
    damaged = {"forget_score": 0.05, "utility_score": 0.375, "metrics": {"perplexity": 12.0}}
    assert targets_met(damaged, base, 0.05, 0.95, max_perplexity=11.0) is None
    kept = {**damaged, "metrics": {"perplexity": 10.9}}
    assert "perplexity 10.900 ≤ 11.000" in targets_met(kept, base, 0.05, 0.95, max_perplexity=11.0)
