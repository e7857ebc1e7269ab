"""The rules that pick a forget weight μ or a retain weight λ for one Release step from evaluated candidates.

Orientation (ARCHITECTURE.md): the forget score s is higher when more of the target remains; the utility
score u is higher when more utility remains. For a perplexity-based utility pass u = 1/PPL, so that a
perplexity rise is a utility drop and relative drops compare like with like.

Names: μ (forget weight, applied with a negative sign) and λ (retain weight) are `weight`; s is
`forget_score`; u is `utility_score`; s_ref/u_ref are the scores just before the step; u_base is the
base model's utility.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from rr.errors import RRError
from rr.tasks.base import StopEarly

# Default for choose_retain_weight's forget_bounce: the largest absolute rise of the forget score that a
# retain step may cause. 0.3 admits every λ step of papers/002 Tables 7–9; the largest there is Table 8
# step 6 (Person F1 0.0306 → 0.3210, +0.29), which the next μ step then removed again.
DEFAULT_FORGET_BOUNCE = 0.3

RULE_FORGET_TARGET = "forget_target"      # μ rule 1: s ≤ (1 − forget_fraction)·s_ref
RULE_RELATIVE_DROP = "relative_drop"      # μ rule 2: relative forget drop > relative utility drop
RULE_RECOVER_TARGET = "recover_target"    # λ rule: u ≥ recover_fraction·u_base within the bounce
RULE_BEST_WITHIN_BOUNCE = "best_within_bounce"  # λ fallback: highest u within the bounce, target missed
RULE_NONE = "none"


@dataclass(frozen=True)
class CandidateResult:
    """One candidate weight and the validation scores of the model with it applied."""

    weight: float
    forget_score: float
    utility_score: float
    perplexity: float | None = None  # the task's validation perplexity, where it reports one
    general_check: float | None = None  # the validation general check's pass rate, where the task asks one


@dataclass
class WeightChoice:
    """The outcome of a rule: the chosen weight (None if no candidate qualifies) and why."""

    weight: float | None
    rule: str
    passed: bool
    reason: str
    evaluated: list[CandidateResult] = field(default_factory=list)


def relative_drop(reference: float, score: float) -> float:
    """(reference − score)/reference; 0 when the reference is 0, where no relative change is defined."""
    return (reference - score) / reference if reference > 0 else 0.0


def _check_scores(candidates: Sequence[CandidateResult], **references: float) -> list[CandidateResult]:
    for name, value in references.items():
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite score ≥ 0; got {value}")
    for candidate in candidates:  # perplexity is checked where a rule reads it (choose_retain_weight's limit)
        for name in ("weight", "forget_score", "utility_score"):
            value = getattr(candidate, name)
            if not math.isfinite(value):
                raise ValueError(f"candidate with weight {candidate.weight} has a non-finite {name} ({value}); "
                                 "re-run its evaluation")
    # Sorted by magnitude so "smallest weight" and the report read in the same order.
    return sorted(candidates, key=lambda c: (abs(c.weight), c.weight))


def choose_forget_weight(candidates: Sequence[CandidateResult], forget_ref: float, utility_ref: float,
                         forget_fraction: float = 0.9, utility_floor: float | None = None) -> WeightChoice:
    """The μ rule: the smallest |μ| with s ≤ (1 − forget_fraction)·s_ref (rule 1); if none, among the
    candidates whose relative forget drop exceeds their relative utility drop,
    (s_ref − s)/s_ref > (u_ref − u)/u_ref (rule 2), the one with the lowest s; if none, no weight.

    A reference of 0 counts as no relative change (see relative_drop). Rule 2 is taken literally: a
    candidate that raises s but raises u relatively more also satisfies it.

    utility_floor (an absolute utility score; None: the paper's rule) removes every candidate with
    u < utility_floor before either rule looks: the paper's rule 1 never looks at utility, so the last
    forget step of a job, with no retain step after it, could otherwise keep a weight that wrecks it.
    """
    if not 0 < forget_fraction <= 1:
        raise ValueError(f"forget_fraction must be in (0, 1]; got {forget_fraction}")
    if utility_floor is not None and (not math.isfinite(utility_floor) or utility_floor < 0):
        raise ValueError(f"utility_floor must be a finite utility score ≥ 0 or None; got {utility_floor}")
    evaluated = _check_scores(candidates, forget_ref=forget_ref, utility_ref=utility_ref)
    threshold = forget_target(forget_ref, forget_fraction)
    eligible = [c for c in evaluated if utility_floor is None or c.utility_score >= utility_floor]
    floor_note = "" if len(eligible) == len(evaluated) else (
        f"; {len(evaluated) - len(eligible)} of {len(evaluated)} candidates left out for utility below the floor "
        f"{utility_floor:.4f}")

    meeting_target = [c for c in eligible if c.forget_score <= threshold]
    if meeting_target:
        chosen = meeting_target[0]
        return WeightChoice(chosen.weight, RULE_FORGET_TARGET, True,
                            f"forget weight {chosen.weight:g} meets the forget target: forget score "
                            f"{chosen.forget_score:.4f} ≤ {1 - forget_fraction:g} × {forget_ref:.4f} = {threshold:.4f} "
                            f"(smallest of {len(meeting_target)} qualifying weights){floor_note}", evaluated)

    def drops(c: CandidateResult) -> tuple[float, float]:
        return relative_drop(forget_ref, c.forget_score), relative_drop(utility_ref, c.utility_score)

    meeting_drop = [c for c in eligible if drops(c)[0] > drops(c)[1]]
    if meeting_drop:
        chosen = min(meeting_drop, key=lambda c: (c.forget_score, abs(c.weight)))
        forget_drop, utility_drop = drops(chosen)
        return WeightChoice(chosen.weight, RULE_RELATIVE_DROP, True,
                            f"no weight reaches forget score ≤ {threshold:.4f}; forget weight {chosen.weight:g} has "
                            f"the lowest forget score ({chosen.forget_score:.4f}) among {len(meeting_drop)} whose "
                            f"relative forget drop {forget_drop:.4f} exceeds the relative utility drop "
                            f"{utility_drop:.4f}{floor_note}", evaluated)

    best = min(evaluated, key=lambda c: c.forget_score, default=None)
    detail = (f"; the lowest forget score was {best.forget_score:.4f} at weight {best.weight:g}" if best
              else "; no candidate was evaluated")
    return WeightChoice(None, RULE_NONE, False,
                        f"no forget weight reaches forget score ≤ {threshold:.4f} or drops the forget score "
                        f"relatively more than the utility score (reference forget {forget_ref:.4f}, utility "
                        f"{utility_ref:.4f}){detail}{floor_note}", evaluated)


def forget_target(forget_ref: float, forget_fraction: float) -> float:
    """μ rule 1's threshold: a forget weight meets it with s ≤ (1 − forget_fraction)·s_ref."""
    return (1 - forget_fraction) * forget_ref


def recover_targets(forget_ref: float, utility_base: float, recover_fraction: float,
                    forget_bounce: float) -> tuple[float, float]:
    """The λ rule's (utility target, forget limit): u ≥ recover_fraction·u_base with s ≤ s_ref + forget_bounce."""
    return recover_fraction * utility_base, forget_ref + forget_bounce


def forget_rule_limits(forget_ref: float, forget_fraction: float, utility_floor: float | None) -> StopEarly:
    """Where a candidate is out of the μ rule's deciding branch (rule 1): above its threshold, or below the floor."""
    return StopEarly(forget_above=forget_target(forget_ref, forget_fraction), utility_below=utility_floor)


def retain_rule_limits(forget_ref: float, utility_base: float, recover_fraction: float,
                       forget_bounce: float) -> StopEarly:
    """Where a candidate is out of the λ rule's deciding branch (recover target): short of the utility target, or
    above the forget limit (the perplexity and general check limits are read in full)."""
    target, forget_limit = recover_targets(forget_ref, utility_base, recover_fraction, forget_bounce)
    return StopEarly(forget_above=forget_limit, utility_below=target)


def utility_floor(fraction_of_base: float | None, utility_base: float) -> float | None:
    """release.forget_utility_floor as the absolute utility score choose_forget_weight takes (None: no floor)."""
    return None if fraction_of_base is None else fraction_of_base * utility_base


def perplexity_limit(max_rise: float | None, base_perplexity: float | None) -> float | None:
    """release.max_perplexity_rise as the highest validation perplexity a retain weight may leave (None: no limit)."""
    if max_rise is None:
        return None
    if base_perplexity is None or not math.isfinite(base_perplexity) or base_perplexity <= 0:
        raise RRError(f"release.max_perplexity_rise needs the base model's validation perplexity (release step 0); "
                      f"got {base_perplexity}: this task reports none, or the base model's text scored non-finite")
    return (1 + max_rise) * base_perplexity


def general_check_floor(min_ratio: float | None, base_general_check: float | None) -> float | None:
    """release.min_general_check_ratio over the base model's validation general check (None: no floor)."""
    if min_ratio is None:
        return None
    if base_general_check is None or not math.isfinite(base_general_check) or base_general_check < 0:
        raise RRError(f"release.min_general_check_ratio needs the base model's validation general check (release "
                      f"step 0); got {base_general_check}: set task.n_general_check_validation above 0 (code task) or "
                      "remove release.min_general_check_ratio; a job whose step 0 was scored without it needs its "
                      "release/ deleted to score it again")
    return min_ratio * base_general_check


def choose_retain_weight(candidates: Sequence[CandidateResult], forget_ref: float, utility_base: float,
                         recover_fraction: float = 0.95,
                         forget_bounce: float = DEFAULT_FORGET_BOUNCE,
                         max_perplexity: float | None = None,
                         min_general_check: float | None = None) -> WeightChoice:
    """The λ rule: the smallest λ with u ≥ recover_fraction·u_base and s ≤ s_ref + forget_bounce; if none,
    the λ with the highest u among those within the bounce (passed=False: the recover target is
    missed); if no candidate stays within the bounce, no weight.

    forget_bounce is an absolute rise of the forget score (same units as s) that a retain step may
    cause; retain PEMs partly restore the target too (papers/002 Table 8 step 6).

    max_perplexity (None: the paper's rule) adds to the recover target: the candidate's perplexity is at most
    this too, so a λ that brings the task's utility back while general text stays damaged does not pass.
    min_general_check (None: the paper's rule) does the same for the validation general check: the candidate's
    pass rate on everyday instructions no retain PEM trained on is at least this.
    """
    if not 0 < recover_fraction <= 1:
        raise ValueError(f"recover_fraction must be in (0, 1]; got {recover_fraction}")
    if not math.isfinite(forget_bounce) or forget_bounce < 0:
        raise ValueError(f"forget_bounce must be a finite absolute score rise ≥ 0; got {forget_bounce}")
    evaluated = _check_scores(candidates, forget_ref=forget_ref, utility_base=utility_base)
    if max_perplexity is not None:
        if not math.isfinite(max_perplexity) or max_perplexity <= 0:
            raise ValueError(f"max_perplexity must be a finite perplexity > 0 or None; got {max_perplexity}")
        unmeasured = [c.weight for c in evaluated if c.perplexity is None]
        if unmeasured:
            raise ValueError(f"candidates {unmeasured} have no perplexity, which max_perplexity asks for")
    if min_general_check is not None:
        if not math.isfinite(min_general_check) or min_general_check < 0:
            raise ValueError(f"min_general_check must be a finite pass rate ≥ 0 or None; got {min_general_check}")
        unmeasured = [c.weight for c in evaluated if c.general_check is None]
        if unmeasured:
            raise ValueError(f"candidates {unmeasured} have no general check, which min_general_check asks for "
                             "(their validation evaluation reported none: the task asks no validation general check)")
    target, forget_limit = recover_targets(forget_ref, utility_base, recover_fraction, forget_bounce)

    def keeps_text(c: CandidateResult) -> bool:  # a non-finite score (a broken model) never keeps it
        return max_perplexity is None or (math.isfinite(c.perplexity) and c.perplexity <= max_perplexity)

    def keeps_check(c: CandidateResult) -> bool:
        return min_general_check is None or (math.isfinite(c.general_check) and c.general_check >= min_general_check)

    def keeps_general(c: CandidateResult) -> bool:
        return keeps_text(c) and keeps_check(c)

    within_bounce = [c for c in evaluated if c.forget_score <= forget_limit]
    recovering = [c for c in within_bounce if c.utility_score >= target and keeps_general(c)]
    text = (("" if max_perplexity is None else f" and perplexity ≤ {max_perplexity:.3f}")
            + ("" if min_general_check is None else f" and general check ≥ {min_general_check:.3f}"))
    if recovering:
        chosen = recovering[0]
        chosen_text = _kept(chosen, max_perplexity, min_general_check, limits=True)
        return WeightChoice(chosen.weight, RULE_RECOVER_TARGET, True,
                            f"retain weight {chosen.weight:g} recovers utility {chosen.utility_score:.4f} ≥ "
                            f"{recover_fraction:g} × base {utility_base:.4f} = {target:.4f}{chosen_text} with forget "
                            f"score {chosen.forget_score:.4f} ≤ {forget_ref:.4f} + {forget_bounce:g} "
                            f"(smallest of {len(recovering)} qualifying weights)", evaluated)

    if within_bounce:  # the highest utility among the weights that keep both, else the text, else the check
        pools = ([c for c in within_bounce if keep(c)] for keep in (keeps_general, keeps_text, keeps_check))
        chosen = max(next((pool for pool in pools if pool), within_bounce),
                     key=lambda c: (c.utility_score, -abs(c.weight)))
        chosen_text = _kept(chosen, max_perplexity, min_general_check, limits=False)
        return WeightChoice(chosen.weight, RULE_BEST_WITHIN_BOUNCE, False,
                            f"no retain weight reaches utility ≥ {target:.4f} ({recover_fraction:g} × base "
                            f"{utility_base:.4f}){text} within forget score ≤ {forget_limit:.4f}; retain weight "
                            f"{chosen.weight:g} gives the highest utility within the bounce, "
                            f"{chosen.utility_score:.4f} (forget score {chosen.forget_score:.4f}{chosen_text})",
                            evaluated)

    lowest = min(evaluated, key=lambda c: c.forget_score, default=None)
    detail = (f"; the lowest forget score was {lowest.forget_score:.4f} at weight {lowest.weight:g}" if lowest
              else "; no candidate was evaluated")
    return WeightChoice(None, RULE_NONE, False,
                        f"every retain weight raises the forget score above {forget_ref:.4f} + "
                        f"{forget_bounce:g} = {forget_limit:.4f}{detail}", evaluated)


def _kept(c: CandidateResult, max_perplexity: float | None, min_general_check: float | None, limits: bool) -> str:
    """The perplexity and general check a retain rule held `c` to, for its reason ("" when it held it to none)."""
    parts = []
    if max_perplexity is not None:
        parts.append(f"perplexity {c.perplexity:.3f}" + (f" ≤ {max_perplexity:.3f}" if limits else ""))
    if min_general_check is not None:
        parts.append(f"general check {c.general_check:.3f}" + (f" ≥ {min_general_check:.3f}" if limits else ""))
    if not parts:
        return ""
    return ", " + ", ".join(parts) + ("," if limits else "")


def candidate_grid(base: Sequence[float], widen_factor: float) -> list[float]:
    """The grid widened when nothing passes: base ∪ each weight × widen_factor ∪ each weight ÷ widen_factor,
    signs kept, duplicates removed, ordered by magnitude (callers skip weights already evaluated)."""
    if not math.isfinite(widen_factor) or widen_factor <= 1:
        raise ValueError(f"widen_factor must be a finite number > 1; got {widen_factor}")
    widened = {float(w) for w in base}
    widened |= {float(w) * widen_factor for w in base} | {float(w) / widen_factor for w in base}
    # Rounding keeps 0.3·2/2 and 0.3 from surviving as two near-identical grid points.
    unique = {round(w, 12) + 0.0 for w in widened}
    return sorted(unique, key=lambda w: (abs(w), w))
