"""`pem-external` and the data-source ablation (papers/002 Tables 5–6): one forget PEM trained on external
data vs one trained on the self-generated forget set, each negated at the weight that reaches the same
validation forget score, compared on the test split."""

from __future__ import annotations

import json
from typing import Callable

from rr.errors import RRError
from rr.release.ledger import Pem, WeightedPem
from rr.release.loop import evaluation_dict
from rr.release.weight_search import (Stopped, describe, executor_scorer, scored_from_json, search_weight,
                                      stopped_candidates)
from rr.release.weights import CandidateResult, WeightChoice
from rr.tasks.base import Example, StopEarly


def external_examples(job) -> list[Example]:
    path = job.config.release.external_forget_data
    if path is not None:
        if not path.is_file():
            raise RRError(f"release.external_forget_data: {path} does not exist; give a JSONL of {{prompt, response}}")
        examples = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                examples.append(Example(str(row["prompt"]), str(row["response"])))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise RRError(f"{path}:{number}: each line must be a JSON object with prompt and response ({exc})") from exc
        return examples
    if hasattr(job.task, "external_forget_examples"):
        return job.task.external_forget_examples()
    raise RRError(f"task {job.config.task.name!r} ships no external forget data; set release.external_forget_data")


def matched_negation(job, pem: Pem, target_forget_score: float, progress: Callable[[str], None],
                     known: dict[float, tuple] | None = None,
                     known_test: dict[float, dict] | None = None, checkpoint: str | None = None) -> dict:
    """The smallest weight magnitude (the release grid, widened once) whose validation forget score reaches the
    target, else the one closest to it; scored through the job's executor on the base model (Φ0 − m·ΔF).

    `known` maps magnitudes already scored for this PEM on the base model (validation forget and utility
    scores) so they are not evaluated again; `known_test` likewise maps magnitudes to test-split evaluations
    already made (Release step 1 scored base − μ0·F0 on the test split). With `checkpoint` (a path in the job
    directory) every new score is kept there as it is made, so a killed search resumes with the next candidate."""
    cache = {float(m): tuple(scores) for m, scores in (known or {}).items()}
    if checkpoint is not None:  # rows [magnitude, forget, utility(, perplexity, general check)] or [magnitude, stopped]
        cache.update({float(row[0]): scored_from_json(row[1] if isinstance(row[1], dict) else row[1:])
                      for row in (job.read_json(checkpoint) or [])})

    def choose(candidates: list[CandidateResult]) -> WeightChoice:
        reaching = [c for c in candidates if c.forget_score <= target_forget_score]
        if reaching:
            return WeightChoice(reaching[0].weight, "reached_target", True,
                                f"forget score {reaching[0].forget_score:.4f} ≤ {target_forget_score:.4f}", candidates)
        closest = min(candidates, key=lambda c: (c.forget_score, c.weight))
        return WeightChoice(closest.weight, "closest", False, f"no weight reaches forget score ≤ "
                            f"{target_forget_score:.4f}; the lowest is {closest.forget_score:.4f}", candidates)

    def after_each(signed_weight: float, evaluation) -> None:
        if checkpoint is not None:
            job.write_json(checkpoint, [[m, scores.as_json()] if isinstance(scores, Stopped) else [m, *scores]
                                        for m, scores in sorted(cache.items())])
        progress(f"  {pem.name} {describe(signed_weight, evaluation)}")

    # the deciding branch reaches the target: a candidate above it may stop early (release.stop_early)
    limits = StopEarly(forget_above=target_forget_score) if job.config.release.stop_early else None
    score = executor_scorer(job.executor, job.task, (), pem, -1.0, after_each, limits)

    try:
        choice = search_weight(sorted(set(job.config.release.forget_weights)), choose, lambda c: c.passed, score,
                               cache, job.config.release.widen_factor)
        chosen = -choice.weight
        if known_test and choice.weight in known_test:
            test = known_test[choice.weight]
        else:
            test = evaluation_dict(job.executor.evaluate(job.task, "test", [WeightedPem(pem, chosen)]))
    finally:
        job.executor.detach()
    tried = sorted([{"weight": -c.weight, "forget_score": c.forget_score, "utility_score": c.utility_score}
                    for c in choice.evaluated] + [{**c, "weight": -c["weight"]} for c in stopped_candidates(
                        list(cache), cache)], key=lambda c: abs(c["weight"]))
    return {"pem": pem.name, "merge_weight": chosen, "reached_target": choice.passed, "candidates": tried,
            "test": test}


def run_ablation(job, progress: Callable[[str], None] = print) -> dict:
    """Needs a finished release (its first forget PEM and weight are the internal side)."""
    cached = job.read_json("release/ablation.json")
    if cached is not None:
        return cached
    state = job.read_json("release/state.json")
    if not state or len(state["steps"]) < 2:
        raise RRError(f"{job.dir}: no finished release step; run `rr release` (or `rr run`) first")
    first = state["steps"][1]
    target = first["validation"]["forget_score"]
    first_pem = Pem.load(job.dir / "release" / "pems" / first["pem"])
    # base − μ0·F0 on the test split: Release scored it when release.test_each_step was on (or step 1 was final)
    internal_test = first["test"] or evaluation_dict(job.executor.evaluate(
        job.task, "test", [WeightedPem(first_pem, first["merge_weight"])]))
    out_dir = job.dir / "release" / "pems" / "external-forget"
    if Pem.is_saved(out_dir):  # its marker, not its weights: a kill mid-save retrains
        external_pem = Pem.load(out_dir)
    else:
        examples = external_examples(job)
        progress(f"pem-external: training a LoRA on {len(examples)} external forget examples")
        external_pem = job.executor.train_pem((), examples, job.config.release.lora, "external-forget", "forget",
                                              out_dir, seed=job.config.seed)
    external = matched_negation(job, external_pem, target, progress)
    result = {
        "target_forget_score": target,
        "internal": {"pem": first["pem"], "merge_weight": first["merge_weight"], "test": internal_test},
        "external": external,
        "internal_keeps_more_utility": internal_test["utility_score"] > external["test"]["utility_score"],
    }
    job.write_json("release/ablation.json", result)
    return result
