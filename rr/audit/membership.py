"""Membership-inference scores of one answer, and the AUC that tells members from non-members.

Pure functions of rr.core.tokens.TokenStats. Every score is oriented the same way: **higher means "more
likely a member"** (seen in training), so the AUC of members against non-members is 0.5 when the attack
cannot tell them apart, above 0.5 when members look more familiar, below when they look less familiar
(what unlearning by negation tends to cause). The audit reports |AUC − 0.5|: 0 is ideal after unlearning.

- LOSS (Yeom et al. 2018): the mean token log-probability, −NLL.
- ZLib (Carlini et al. 2021): −NLL divided by the zlib-compressed length of the text in bytes, so text that
  is likely only because it is repetitive or generic counts less.
- MinK (Shi et al. 2024): the mean of the k·100% lowest token log-probabilities.
- MinK++ (Zhang et al. 2024): each token's log-probability standardised by the vocabulary's log-prob mean
  and standard deviation at its position, (log p(x_t) − μ_t)/σ_t, then the mean of the k·100% lowest.
"""

from __future__ import annotations

import math
import zlib
from typing import Callable, Sequence

from rr.core.tokens import TokenStats

MIN_STD = 1e-6  # σ_t below this (a near one-hot distribution) is treated as this, so z stays finite


def _lowest_mean(values: Sequence[float], k: float) -> float:
    if not values:
        raise ValueError("a membership score needs at least one answer token")
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    count = max(1, int(len(values) * k))
    return sum(sorted(values)[:count]) / count


def loss_score(stats: TokenStats) -> float:
    if not stats.logprobs:
        raise ValueError("a membership score needs at least one answer token")
    return sum(stats.logprobs) / len(stats.logprobs)


def zlib_score(stats: TokenStats) -> float:
    return loss_score(stats) / max(1, len(zlib.compress(stats.text.encode("utf-8"))))


def mink_score(stats: TokenStats, k: float = 0.2) -> float:
    return _lowest_mean(stats.logprobs, k)


def minkpp_score(stats: TokenStats, k: float = 0.2) -> float:
    z = [(lp - mu) / max(math.sqrt(var), MIN_STD) for lp, mu, var in zip(stats.logprobs, stats.means, stats.variances)]
    return _lowest_mean(z, k)


ATTACKS: dict[str, Callable[[TokenStats], float]] = {
    "loss": loss_score, "zlib": zlib_score, "mink": mink_score, "minkpp": minkpp_score}


def auc(members: Sequence[float], non_members: Sequence[float]) -> float:
    """P(a member's score > a non-member's), ties counted half (the Mann–Whitney U / (n·m))."""
    if not members or not non_members:
        raise ValueError(f"an AUC needs members and non-members, got {len(members)} and {len(non_members)}")
    wins = 0.0
    for m in members:
        for n in non_members:
            wins += 1.0 if m > n else 0.5 if m == n else 0.0
    return wins / (len(members) * len(non_members))


def roc_curve(members: Sequence[float], non_members: Sequence[float]) -> list[tuple[float, float]]:
    """(false-positive rate, true-positive rate) points, thresholds from high to low, from (0, 0) to (1, 1)."""
    points = [(0.0, 0.0)]
    for threshold in sorted(set(members) | set(non_members), reverse=True):
        points.append((sum(n >= threshold for n in non_members) / len(non_members),
                       sum(m >= threshold for m in members) / len(members)))
    return points
