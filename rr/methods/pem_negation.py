"""`pem-negation`: one forget PEM trained on the base model and negated once, Φ0 − μ·ΔF, with μ chosen on the
validation split by the paper's μ rule (the release config's grid, widened once if nothing qualifies).

Training, the weight search and scoring go through the job's executor, as the release stage's do."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from rr.errors import RRError
from rr.methods import Method, MethodRun, ReleaseData


def run_method(job, method: Method, data: ReleaseData, out_dir: Path, progress: Callable[[str], None]) -> MethodRun:
    from rr.compare import base_scores
    from rr.core.files import atomic_write_text
    from rr.release.ledger import Pem, WeightedPem
    from rr.release.loop import evaluation_dict
    from rr.release.weight_search import executor_scorer, scores_of, search_weight
    from rr.release.weights import (RULE_FORGET_TARGET, CandidateResult, WeightChoice, choose_forget_weight,
                                    utility_floor)

    config, executor = job.config.release, job.executor
    started = time.perf_counter()
    pem_dir = out_dir / "pem"
    if Pem.is_saved(pem_dir):  # its marker, not its weights: a kill mid-save retrains
        pem = Pem.load(pem_dir)
    else:
        progress(f"pem-negation: training a forget LoRA on {len(data.forget)} {data.source} examples")
        pem = executor.train_pem((), data.forget, config.lora, "pem-negation-forget", "forget", pem_dir,
                                 seed=job.config.seed + 1)  # the seed of the release stage's first forget PEM
    base = base_scores(job, "validation")
    # Scores kept as they are made, so a killed compare resumes the search (compare clears the folder when
    # the data or settings change).
    scored_path = out_dir / "candidates.json"
    cache = {r["weight"]: scores_of(r) for r in (json.loads(scored_path.read_text()) if scored_path.exists() else [])}

    def choose(candidates: list[CandidateResult]) -> WeightChoice:
        return choose_forget_weight(candidates, base["forget_score"], base["utility_score"], config.forget_fraction,
                                    utility_floor(config.forget_utility_floor, base["utility_score"]))

    def checkpoint(signed_weight: float, evaluation) -> None:
        atomic_write_text(scored_path, json.dumps([asdict(CandidateResult(m, *scores))
                                                   for m, scores in sorted(cache.items())]))
        progress(f"  pem-negation {signed_weight:+g}: forget {evaluation.forget_score:.3f}, "
                 f"utility {evaluation.utility_score:.3f}")

    score = executor_scorer(executor, job.task, (), pem, -1.0, checkpoint)

    try:
        choice = search_weight(config.forget_weights, choose, lambda c: c.rule == RULE_FORGET_TARGET, score, cache,
                               config.widen_factor)
        if choice.weight is None:
            raise RRError(f"pem-negation: no weight in {sorted(cache)} lowers the validation forget score "
                          f"enough ({choice.reason}); widen release.forget_weights")
        wall_time = time.perf_counter() - started
        test = evaluation_dict(executor.evaluate(job.task, "test", [WeightedPem(pem, -choice.weight)]))
    finally:
        executor.detach()
    return MethodRun(method.name, test, wall_time,
                     {"merge_weight": -choice.weight, "rule": choice.rule, "reason": choice.reason,
                      "candidates": [asdict(r) for r in choice.evaluated], "pem_dir": str(pem_dir)})
