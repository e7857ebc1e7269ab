"""The one weight search: candidate magnitudes scored on the validation split, a rule that decides, the grid
widened once when nothing decides, and a cache that lets a killed search resume.

The release loop's μ and λ steps, pem-negation, the single-negation baseline, the data-source ablation and
Ext-Sub's α all choose their weight here; they differ only in the rule (`choose`), in what counts as decided
(`decisive`) and in how a candidate is scored (`score`: the executor's search_weights, or a model the caller
edits). Rules prefer the smallest qualifying magnitude, so candidates are scored smallest first and the search
stops as soon as the scored prefix decides: larger magnitudes cannot change the choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, MutableMapping, Sequence, Union

from rr.errors import RRError
from rr.release.weights import RULE_NONE, CandidateResult, WeightChoice, candidate_grid
from rr.tasks.base import StopEarly

# (forget score, utility score[, perplexity[, general check]]) of one candidate on the validation split; the
# perplexity where the task reports one (release.max_perplexity_rise decides on it) and the general check's
# instructions where the task asks them (release.min_general_check_ratio), None or absent elsewhere
Scores = tuple[float, ...]
# What release.min_general_check_ratio reads: the everyday instructions' pass rate, which means the same on both
# splits (the test split's general check also asks arithmetic in new wordings; the validation split's does not).
GENERAL_CHECK_METRIC = "general_check_instructions"


@dataclass(frozen=True)
class Stopped:
    """A candidate whose scoring stopped early (rr.tasks.base.StopEarly): the deciding branch of the rule cannot
    pick it, so a search that decides never needs its scores; one that does not decide scores it in full first."""

    reason: str
    scored: dict  # part → [items scored, items]

    def as_json(self) -> dict:
        return {"stopped_early": {"reason": self.reason, "scored": self.scored}}


Scored = Union[Scores, Stopped]
# score(magnitudes, on_result, stop, in_full=False): score each magnitude, smallest first (an executor may run
# several at once), calling on_result(magnitude, scores) for each; return early once stop() is true. A scorer
# built with StopEarly limits may answer Stopped for a candidate, unless in_full.
Scorer = Callable[..., None]


def validation_scores(evaluation) -> Scored:
    """What a weight rule reads of a candidate's validation evaluation, in Scores order (Stopped: stopped early)."""
    if evaluation.stopped_early:
        return Stopped(evaluation.stopped_early["reason"], evaluation.stopped_early["scored"])
    return (evaluation.forget_score, evaluation.utility_score, evaluation.metrics.get("perplexity"),
            evaluation.metrics.get(GENERAL_CHECK_METRIC))


def scored_from_json(value) -> Scored:
    """A candidate's scores as a checkpoint keeps them: a list in Scores order, or Stopped.as_json()."""
    if isinstance(value, dict):
        return Stopped(value["stopped_early"]["reason"], value["stopped_early"]["scored"])
    return tuple(value)


def scored_to_json(scored: Scored):
    return scored.as_json() if isinstance(scored, Stopped) else list(scored)


def describe(signed_weight: float, evaluation) -> str:
    """A progress line for one scored candidate."""
    if evaluation.stopped_early:
        parts = ", ".join(f"{done} of {total} {part} items" for part, (done, total)
                          in evaluation.stopped_early["scored"].items())
        return f"{signed_weight:+g}: stopped early after {parts} ({evaluation.stopped_early['reason']})"
    return f"{signed_weight:+g}: forget {evaluation.forget_score:.3f}, utility {evaluation.utility_score:.3f}"


def scores_of(candidate: dict) -> tuple:
    """A candidate as a weight search's records keep it (asdict(CandidateResult)) back in Scores order."""
    return (candidate["forget_score"], candidate["utility_score"], candidate.get("perplexity"),
            candidate.get("general_check"))


def executor_scorer(executor, task, composition, pem, sign: float,
                    after_each: Callable[[float, object], None] = lambda weight, evaluation: None,
                    stop_early: StopEarly | None = None) -> Scorer:
    """A Scorer that applies `pem` at sign × magnitude on top of `composition` and scores the validation split
    through the job's executor (in-process, or Tune trials on Ray); after_each(signed weight, evaluation) runs
    once each score is in the search's cache (checkpoint it, report it). With `stop_early` (the limits of the
    rule's deciding branch), a candidate's scoring may stop once it provably crosses them (Stopped)."""
    def score(todo: list[float], on_result: Callable[[float, Scored], None], stop: Callable[[], bool],
              in_full: bool = False) -> None:
        def on_evaluation(weight: float, evaluation) -> None:
            on_result(abs(weight), validation_scores(evaluation))
            after_each(weight, evaluation)

        executor.search_weights(task, "validation", composition, pem, [sign * m for m in todo], on_evaluation, stop,
                                None if in_full else stop_early)

    return score


def scored_prefix(grid: Sequence[float], cache: MutableMapping[float, Scored],
                  choose: Callable[[list[CandidateResult]], WeightChoice],
                  decisive: Callable[[WeightChoice], bool]) -> tuple[list[CandidateResult], bool]:
    """The cached candidates of `grid`, smallest first, up to the first unscored one or the first prefix whose
    choice is decisive; and whether the search is over (decided, or every candidate scored). A Stopped candidate
    counts as scored and is left out of the rule: its deciding branch cannot pick it, so a prefix with it decides
    as the prefix without it does (and not deciding, it is scored in full before the rule's other branches read it)."""
    results = []
    for magnitude in sorted(set(grid), key=lambda m: (abs(m), m)):
        if magnitude not in cache:
            return results, False
        if isinstance(cache[magnitude], Stopped):
            continue
        results.append(CandidateResult(magnitude, *cache[magnitude]))
        if decisive(choose(results)):
            return results, True
    return results, True


def stopped_candidates(grid: Sequence[float], cache: MutableMapping[float, Scored]) -> list[dict]:
    """The candidates of `grid` whose scoring stopped early, as a step's record lists them."""
    return [{"weight": m, **cache[m].as_json()} for m in sorted(set(grid), key=lambda m: (abs(m), m))
            if isinstance(cache.get(m), Stopped)]


def search_weight(grid: Sequence[float], choose: Callable[[list[CandidateResult]], WeightChoice],
                  decisive: Callable[[WeightChoice], bool], score: Scorer, cache: MutableMapping[float, Scored],
                  widen_factor: float | None = None,
                  on_widen: Callable[[WeightChoice, list[float]], None] = lambda choice, wider: None) -> WeightChoice:
    """Score `grid` (magnitudes) until `choose` on the scored prefix is `decisive`; if it never is and a
    widen_factor is given, once more on the grid widened by it (rr.release.weights.candidate_grid). Scores go
    into `cache` as they are made (the caller persists it in on_result's wake, see `score`), and cached
    candidates are never scored again, so a rerun after a kill resumes where it stopped. Returns the choice on
    the scored prefix (every candidate up to the one that decided); its `weight` is None when none qualifies.

    Candidates a StopEarly scorer stopped early (Stopped) are left out of the rule; when the search ends without a
    decision (after widening, if it widens) they are scored in full first, so every branch of the rule reads
    exactly the scores full scoring gives and chooses as it would."""
    if not grid:
        raise ValueError("a weight search needs at least one candidate magnitude")

    def on_result(magnitude: float, scores: Scored) -> None:
        cache[magnitude] = scores if isinstance(scores, Stopped) else \
            tuple(None if score is None else float(score) for score in scores)

    def run(candidates: Sequence[float], last: bool) -> WeightChoice:
        results, over = scored_prefix(candidates, cache, choose, decisive)
        if not over:
            todo = [m for m in sorted(set(candidates), key=abs) if m not in cache]
            score(todo, on_result, lambda: scored_prefix(candidates, cache, choose, decisive)[1])
            results, over = scored_prefix(candidates, cache, choose, decisive)
            if not over:
                missing = [m for m in candidates if m not in cache]
                raise RRError(f"the weight search stopped with candidates {missing} unscored and nothing decided "
                              "(a lost worker or a stopped search): rerun the same command to resume it")
        stopped = [m for m in sorted(set(candidates), key=abs) if isinstance(cache.get(m), Stopped)]
        if last and stopped and not (results and decisive(choose(results))):
            # Nothing decided, and no wider grid left to try: the rule's other branches read every candidate.
            score(stopped, on_result, lambda: False, in_full=True)
            if any(isinstance(cache.get(m), Stopped) or m not in cache for m in stopped):
                raise RRError(f"the weight search could not score candidates {stopped} in full (a lost worker): "
                              "rerun the same command to resume it")
            results, _ = scored_prefix(candidates, cache, choose, decisive)
        return choose(results) if results else WeightChoice(None, RULE_NONE, False, "no candidate was scored")

    choice = run(grid, last=widen_factor is None)
    if decisive(choice) or widen_factor is None:
        return choice
    wider = [m for m in candidate_grid(grid, widen_factor) if m not in set(grid)]
    on_widen(choice, wider)
    return run(list(grid) + wider, last=True)
