"""The one weight search (rr/release/weight_search.py) with injected scoring: smallest first, stops once the
scored prefix decides, widens once, resumes from its cache, and says so when a scorer leaves it undecided."""

import pytest

from rr.errors import RRError
from rr.release.weight_search import search_weight
from rr.release.weights import RULE_FORGET_TARGET, RULE_NONE, RULE_RELATIVE_DROP, choose_forget_weight, utility_floor

# The quickstart's step 3 on validation (μ = 1: forget 0, utility 0.05) and made-up neighbours: forget falls
# with μ, utility falls faster.
CURVE = {0.5: (0.05, 0.30), 1.0: (0.0, 0.05), 1.5: (0.0, 0.03), 2.0: (0.0, 0.02), 3.0: (0.0, 0.01),
         4.0: (0.0, 0.0), 6.0: (0.0, 0.0), 8.0: (0.0, 0.0)}
FORGET_REF, UTILITY_REF, UTILITY_BASE = 0.1, 0.425, 0.35


class Scorer:
    """Scores from CURVE, smallest first, stopping when told; records what it scored; can die at the Nth."""

    def __init__(self, die_at: int | None = None):
        self.scored: list[float] = []
        self.die_at = die_at

    def __call__(self, todo, on_result, stop):
        assert todo == sorted(todo, key=abs), "candidates come smallest first"
        for magnitude in todo:
            if stop():
                return
            if len(self.scored) + 1 == self.die_at:
                raise KeyboardInterrupt
            self.scored.append(magnitude)
            on_result(magnitude, CURVE[magnitude])


def mu_rule(floor=None):
    return lambda results: choose_forget_weight(results, FORGET_REF, UTILITY_REF, 0.9, floor)


def rule_1(choice):
    return choice.rule == RULE_FORGET_TARGET


def test_the_search_scores_smallest_first_and_stops_once_the_prefix_decides():
    scorer, cache = Scorer(), {}
    choice = search_weight([4.0, 1.0, 3.0, 2.0], mu_rule(), rule_1, scorer, cache, widen_factor=2.0)
    assert (choice.weight, choice.rule) == (1.0, RULE_FORGET_TARGET)  # the paper's rule keeps the wrecking weight
    assert scorer.scored == [1.0] and list(cache) == [1.0]
    assert [c.weight for c in choice.evaluated] == [1.0]


def test_with_a_utility_floor_nothing_in_the_grid_qualifies_and_the_widened_grid_decides():
    scorer, widened = Scorer(), []
    choice = search_weight([1.0, 2.0, 3.0, 4.0], mu_rule(utility_floor(0.5, UTILITY_BASE)), rule_1, scorer, {},
                           widen_factor=2.0, on_widen=lambda choice, wider: widened.append(wider))
    assert widened == [[0.5, 1.5, 6.0, 8.0]]
    assert scorer.scored == [1.0, 2.0, 3.0, 4.0, 0.5, 1.5, 6.0, 8.0]  # the grid, then only what is new
    # 0.5 keeps utility 0.30 ≥ 0.175 and drops the forget score relatively more than the utility: rule 2.
    assert (choice.weight, choice.rule, choice.passed) == (0.5, RULE_RELATIVE_DROP, True)
    assert [c.weight for c in choice.evaluated] == [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0]


def test_without_widening_an_undecided_grid_returns_the_rules_answer():
    choice = search_weight([1.0, 2.0], mu_rule(utility_floor(0.5, UTILITY_BASE)), rule_1, Scorer(), {})
    assert (choice.weight, choice.rule) == (None, RULE_NONE)


def test_a_search_killed_mid_way_resumes_from_its_cache_to_the_same_choice():
    unkilled = search_weight([1.0, 2.0, 3.0, 4.0], mu_rule(0.175), rule_1, Scorer(), {}, widen_factor=2.0)
    for die_at in range(1, 9):
        cache = {}
        with pytest.raises(KeyboardInterrupt):
            search_weight([1.0, 2.0, 3.0, 4.0], mu_rule(0.175), rule_1, Scorer(die_at), cache, widen_factor=2.0)
        assert len(cache) == die_at - 1  # every score made before the kill is kept
        rerun = Scorer()
        choice = search_weight([1.0, 2.0, 3.0, 4.0], mu_rule(0.175), rule_1, rerun, cache, widen_factor=2.0)
        assert (choice.weight, choice.rule, choice.reason) == (unkilled.weight, unkilled.rule, unkilled.reason)
        assert len(rerun.scored) == 8 - (die_at - 1), "nothing scored twice"


def test_a_scorer_that_stops_before_deciding_is_named():
    def gives_up(todo, on_result, stop):
        on_result(todo[0], CURVE[todo[0]])

    with pytest.raises(RRError, match=r"candidates \[2.0\] unscored and nothing decided.*rerun"):
        search_weight([1.0, 2.0], mu_rule(0.175), rule_1, gives_up, {})
    with pytest.raises(ValueError, match="at least one candidate"):
        search_weight([], mu_rule(), rule_1, Scorer(), {})


def test_the_ray_search_runs_as_many_trials_at_once_as_the_replicas_serve_unless_told():
    from rr.execution.base import concurrent_trials

    # The quickstart on Ray: one HF replica, four candidates. All four at once made the one replica score −3 and
    # −4, which the decided search never needs; one at a time scores smallest first, as in-process.
    assert concurrent_trials(None, candidates=4, replicas=1, per_replica=1) == 1
    assert concurrent_trials(None, candidates=5, replicas=2, per_replica=1) == 2
    assert concurrent_trials(None, candidates=8, replicas=1, per_replica=8) == 8  # vLLM: max_loras share a batch
    assert concurrent_trials(None, candidates=3, replicas=4, per_replica=1) == 3  # never more than the candidates
    assert concurrent_trials(None, candidates=3, replicas=0, per_replica=1) == 1  # no replica yet: one
    assert concurrent_trials(6, candidates=4, replicas=1, per_replica=1) == 4  # compute.parallel_candidates wins
    assert concurrent_trials(2, candidates=4, replicas=8, per_replica=1) == 2
