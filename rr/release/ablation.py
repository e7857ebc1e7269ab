"""`pem-external` and the data-source ablation (papers/002 Tables 5–6): one forget PEM trained on external
data vs one trained on the self-generated forget set, each negated at the weight that reaches the same
validation forget score, compared on the test split."""

from __future__ import annotations

import json
from typing import Callable

from rr.errors import RRError
from rr.release.ledger import ComposedModel, Pem
from rr.release.loop import evaluation_dict
from rr.release.pem import train_pem
from rr.release.weights import candidate_grid
from rr.tasks.base import Example


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
                     known: dict[float, tuple[float, float]] | None = None,
                     known_test: dict[float, dict] | None = None, checkpoint: str | None = None) -> dict:
    """Smallest weight magnitude (grid widened once) whose validation forget score reaches the target.

    `known` maps magnitudes already scored for this PEM on the base model (validation forget and
    utility scores) so they are not evaluated again; `known_test` likewise maps magnitudes to test-split
    evaluations already made (Release step 1 scored base − μ0·F0 on the test split). With `checkpoint`
    (a path in the job directory) every new score is kept there as it is made, so a killed search resumes
    with the next candidate."""
    known = dict(known or {})
    if checkpoint is not None:
        known.update({float(m): (f, u) for m, f, u in (job.read_json(checkpoint) or [])})
    composed = ComposedModel(job.model)
    composed.append(pem, 0.0)
    tried, chosen = [], None
    try:
        # The release's own grid first, smallest first; the widened grid only if none of it reaches the target.
        grid = sorted(set(job.config.release.forget_weights))
        wider = [m for m in candidate_grid(grid, job.config.release.widen_factor) if m not in grid]
        for magnitude in grid + wider:
            if magnitude not in known:
                composed.set_weight(-1, -magnitude)
                evaluation = job.task.evaluate(job.generator, "validation")
                known[magnitude] = (evaluation.forget_score, evaluation.utility_score)
                if checkpoint is not None:
                    job.write_json(checkpoint, [[m, f, u] for m, (f, u) in sorted(known.items())])
                progress(f"  {pem.name} −{magnitude:g}: forget {evaluation.forget_score:.3f}, "
                         f"utility {evaluation.utility_score:.3f}")
            forget_score, utility_score = known[magnitude]
            tried.append({"weight": -magnitude, "forget_score": forget_score, "utility_score": utility_score})
            if forget_score <= target_forget_score:
                chosen = -magnitude
                break
        reached = chosen is not None
        if chosen is None:
            chosen = min(tried, key=lambda t: t["forget_score"])["weight"]
        if known_test and abs(chosen) in known_test:
            test = known_test[abs(chosen)]
        else:
            composed.set_weight(-1, chosen)
            test = evaluation_dict(job.task.evaluate(job.generator, "test"))
    finally:
        composed.detach()
    return {"pem": pem.name, "merge_weight": chosen, "reached_target": reached, "candidates": tried, "test": test}


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
    out_dir = job.dir / "release" / "pems" / "external-forget"
    if Pem.is_saved(out_dir):  # its marker, not its weights: a kill mid-save retrains
        external_pem = Pem.load(out_dir)
    else:
        examples = external_examples(job)
        progress(f"pem-external: training a LoRA on {len(examples)} external forget examples")
        external_pem = train_pem(job.model, job.tokenizer, examples, job.config.release.lora, "external-forget",
                                 "forget", out_dir, seed=job.config.seed)
    external = matched_negation(job, external_pem, target, progress)
    result = {
        "target_forget_score": target,
        "internal": {"pem": first["pem"], "merge_weight": first["merge_weight"], "test": first["test"]},
        "external": external,
        "internal_keeps_more_utility": first["test"]["utility_score"] > external["test"]["utility_score"],
    }
    job.write_json("release/ablation.json", result)
    return result
