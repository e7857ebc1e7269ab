"""`pem-negation`: one forget PEM trained on the base model and negated once, Φ0 − μ·ΔF, with μ chosen on the
validation split by the paper's μ rule (the release config's grid, widened once if nothing qualifies)."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from rr.errors import RRError
from rr.methods import Method, MethodRun, ReleaseData


def run_method(job, method: Method, data: ReleaseData, out_dir: Path, progress: Callable[[str], None]) -> MethodRun:
    from rr.compare import base_scores
    from rr.release.ledger import ComposedModel, Pem
    from rr.release.loop import evaluation_dict
    from rr.release.pem import train_pem
    from rr.release.weights import RULE_FORGET_TARGET, CandidateResult, candidate_grid, choose_forget_weight

    config = job.config.release
    started = time.perf_counter()
    pem_dir = out_dir / "pem"
    if (pem_dir / "adapter_model.safetensors").exists():
        pem = Pem.load(pem_dir)
    else:
        progress(f"pem-negation: training a forget LoRA on {len(data.forget)} {data.source} examples")
        pem = train_pem(job.model, job.tokenizer, data.forget, config.lora, "pem-negation-forget", "forget", pem_dir,
                        seed=job.config.seed + 1)  # the seed of the release stage's first forget PEM
    base = base_scores(job, "validation")
    composed = ComposedModel(job.model)
    composed.append(pem, 0.0)
    results: list[CandidateResult] = []
    try:
        for grid in (config.forget_weights, candidate_grid(config.forget_weights, config.widen_factor)):
            for magnitude in sorted(set(grid) - {r.weight for r in results}):
                composed.set_weight(-1, -magnitude)
                evaluation = job.task.evaluate(job.generator, "validation")
                results.append(CandidateResult(magnitude, evaluation.forget_score, evaluation.utility_score))
                progress(f"  pem-negation −{magnitude:g}: forget {evaluation.forget_score:.3f}, "
                         f"utility {evaluation.utility_score:.3f}")
                choice = choose_forget_weight(sorted(results, key=lambda r: r.weight), base["forget_score"],
                                              base["utility_score"], config.forget_fraction)
                if choice.rule == RULE_FORGET_TARGET:
                    break  # the rule takes the smallest qualifying weight: larger ones cannot change it
            if choice.rule == RULE_FORGET_TARGET:
                break
        if choice.weight is None:
            raise RRError(f"pem-negation: no weight in {sorted(r.weight for r in results)} lowers the validation "
                          f"forget score enough ({choice.reason}); widen release.forget_weights")
        composed.set_weight(-1, -choice.weight)
        wall_time = time.perf_counter() - started
        test = evaluation_dict(job.task.evaluate(job.generator, "test"))
    finally:
        composed.detach()
    return MethodRun(method.name, test, wall_time,
                     {"merge_weight": -choice.weight, "rule": choice.rule, "reason": choice.reason,
                      "candidates": [asdict(r) for r in choice.evaluated], "pem_dir": str(pem_dir)})

