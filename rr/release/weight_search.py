"""The one weight search: candidate magnitudes scored on the validation split, a rule that decides, the grid
widened once when nothing decides, and a cache that lets a killed search resume.

The release loop's μ and λ steps, pem-negation, the single-negation baseline, the data-source ablation and
Ext-Sub's α all choose their weight here; they differ only in the rule (`choose`), in what counts as decided
(`decisive`) and in how a candidate is scored (`score`: the executor's search_weights, or a model the caller
edits). Rules prefer the smallest qualifying magnitude, so candidates are scored smallest first and the search
stops as soon as the scored prefix decides: larger magnitudes cannot change the choice.
"""

from __future__ import annotations

from typing import Callable, MutableMapping, Sequence

from rr.errors import RRError
from rr.release.weights import RULE_NONE, CandidateResult, WeightChoice, candidate_grid

# (forget score, utility score[, perplexity[, general check]]) of one candidate on the validation split; the
# perplexity where the task reports one (release.max_perplexity_rise decides on it) and the general check's
# instructions where the task asks them (release.min_general_check_ratio), None or absent elsewhere
Scores = tuple[float, ...]
# What release.min_general_check_ratio reads: the everyday instructions' pass rate, which means the same on both
# splits (the test split's general check also asks arithmetic in new wordings; the validation split's does not).
GENERAL_CHECK_METRIC = "general_check_instructions"
# score(magnitudes, on_result, stop): score each magnitude, smallest first (an executor may run several at
# once), calling on_result(magnitude, scores) for each; return early once stop() is true.
Scorer = Callable[[list[float], Callable[[float, Scores], None], Callable[[], bool]], None]


def validation_scores(evaluation) -> tuple:
    """What a weight rule reads of a candidate's validation evaluation, in Scores order."""
    return (evaluation.forget_score, evaluation.utility_score, evaluation.metrics.get("perplexity"),
            evaluation.metrics.get(GENERAL_CHECK_METRIC))


def scores_of(candidate: dict) -> tuple:
    """A candidate as a weight search's records keep it (asdict(CandidateResult)) back in Scores order."""
    return (candidate["forget_score"], candidate["utility_score"], candidate.get("perplexity"),
            candidate.get("general_check"))


def executor_scorer(executor, task, composition, pem, sign: float,
                    after_each: Callable[[float, object], None] = lambda weight, evaluation: None) -> Scorer:
    """A Scorer that applies `pem` at sign × magnitude on top of `composition` and scores the validation split
    through the job's executor (in-process, or Tune trials on Ray); after_each(signed weight, evaluation) runs
    once each score is in the search's cache (checkpoint it, report it)."""
    def score(todo: list[float], on_result: Callable[[float, Scores], None], stop: Callable[[], bool]) -> None:
        def on_evaluation(weight: float, evaluation) -> None:
            on_result(abs(weight), validation_scores(evaluation))
            after_each(weight, evaluation)

        executor.search_weights(task, "validation", composition, pem, [sign * m for m in todo], on_evaluation, stop)

    return score


def scored_prefix(grid: Sequence[float], cache: MutableMapping[float, Scores],
                  choose: Callable[[list[CandidateResult]], WeightChoice],
                  decisive: Callable[[WeightChoice], bool]) -> tuple[list[CandidateResult], bool]:
    """The cached candidates of `grid`, smallest first, up to the first unscored one or the first prefix whose
    choice is decisive; and whether the search is over (decided, or every candidate scored)."""
    results = []
    for magnitude in sorted(set(grid), key=lambda m: (abs(m), m)):
        if magnitude not in cache:
            return results, False
        results.append(CandidateResult(magnitude, *cache[magnitude]))
        if decisive(choose(results)):
            return results, True
    return results, True


def search_weight(grid: Sequence[float], choose: Callable[[list[CandidateResult]], WeightChoice],
                  decisive: Callable[[WeightChoice], bool], score: Scorer, cache: MutableMapping[float, Scores],
                  widen_factor: float | None = None,
                  on_widen: Callable[[WeightChoice, list[float]], None] = lambda choice, wider: None) -> WeightChoice:
    """Score `grid` (magnitudes) until `choose` on the scored prefix is `decisive`; if it never is and a
    widen_factor is given, once more on the grid widened by it (rr.release.weights.candidate_grid). Scores go
    into `cache` as they are made (the caller persists it in on_result's wake, see `score`), and cached
    candidates are never scored again, so a rerun after a kill resumes where it stopped. Returns the choice on
    the scored prefix (every candidate up to the one that decided); its `weight` is None when none qualifies."""
    if not grid:
        raise ValueError("a weight search needs at least one candidate magnitude")

    def run(candidates: Sequence[float]) -> WeightChoice:
        results, over = scored_prefix(candidates, cache, choose, decisive)
        if not over:
            todo = [m for m in sorted(set(candidates), key=abs) if m not in cache]

            def on_result(magnitude: float, scores: Scores) -> None:
                cache[magnitude] = tuple(None if score is None else float(score) for score in scores)

            score(todo, on_result, lambda: scored_prefix(candidates, cache, choose, decisive)[1])
            results, over = scored_prefix(candidates, cache, choose, decisive)
            if not over:
                missing = [m for m in candidates if m not in cache]
                raise RRError(f"the weight search stopped with candidates {missing} unscored and nothing decided "
                              "(a lost worker or a stopped search): rerun the same command to resume it")
        return choose(results) if results else WeightChoice(None, RULE_NONE, False, "no candidate was scored")

    choice = run(grid)
    if decisive(choice) or widen_factor is None:
        return choice
    wider = [m for m in candidate_grid(grid, widen_factor) if m not in set(grid)]
    on_widen(choice, wider)
    return run(list(grid) + wider)
