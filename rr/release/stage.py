"""The Release stage of a job: forget records → Eq. 1 loop → single-negation baseline → step table, plot, summary."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Callable

from rr.core.profile import phase, profiling
from rr.core.prompt import prompt_from_json
from rr.evaluation.analysis import pem_similarity
from rr.evaluation.forms import form_markdown, form_report, is_form_metric
from rr.evaluation.report import plot_steps, write_step_table
from rr.errors import RRError
from rr.release.ablation import matched_negation
from rr.release.general_retain import general_retain_examples, prose_retain_examples
from rr.release.ledger import Pem
from rr.release.weight_search import scores_of
from rr.release.loop import ReleaseLoop, StepRecord
from rr.tasks.base import Example


def load_forget_examples(job) -> list[Example]:
    """The forget PEM imitates the revealed answers to the *plain* contexts (no instruction), so that
    negating it removes the behaviour the way a user would meet it."""
    path = job.dir / "reveal" / "forget_set.jsonl"
    if not path.exists() or not (job.dir / "reveal" / "manifest.json").exists():
        raise RRError(f"{path}: no finished forget set; run `rr reveal` (or `rr run`) with this config first")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [Example(prompt_from_json(r["prompt"]), r["response"]) for r in records]


def job_release_loop(job, forget_examples: list[Example], progress: Callable[[str], None] = print,
                     on_step: Callable[[StepRecord], None] = lambda record: None) -> ReleaseLoop:
    """The job's Eq. 1 loop: its executor, task and release config, checkpointed in job.dir/release. Retain
    PEMs train on the task's retain data plus the general retain data: the base model's answers to everyday
    prompts, made when the first retain PEM is trained (never, if no retain step runs), and the retain prose."""
    config = job.config.release
    task_retain = job.task.retain_examples()
    prose = prose_retain_examples(config.general_retain_paragraphs)

    def retain_examples() -> list[Example]:
        return task_retain + general_retain_examples(job, config.general_retain_prompts, progress) + prose

    return ReleaseLoop(job.executor, job.task, config, job.dir / "release", job.config.seed,
                       job.config.model.name_or_path, forget_examples, retain_examples, progress, on_step)


def single_negation_baseline(job, loop: ReleaseLoop, target_forget_score: float, progress) -> dict:
    """One forget PEM (the first, trained on the base model), one weight: the smallest magnitude whose
    validation forget score reaches the iterative model's. Scored on the test split."""
    cached = job.read_json("release/baseline.json")
    if cached is not None and cached.get("target_forget_score") == target_forget_score:
        return cached  # made for another target (the loop ended elsewhere since): chosen again below
    first = loop.state.steps[1]
    # Step 1 scored this very model (base − w·F0) for some weights already: reuse those scores.
    known = {c["weight"]: scores_of(c) for c in first.candidates if "stopped_early" not in c}
    # Step 1's own weight is this very model too, already scored on the test split (with release.test_each_step,
    # or when step 1 is the final step).
    known_test = {abs(first.merge_weight): first.test} if first.test is not None else {}
    result = matched_negation(job, Pem.load(loop.dir / "pems" / first.pem), target_forget_score, progress, known,
                              known_test, checkpoint="release/baseline_candidates.json")
    result["target_forget_score"] = target_forget_score
    job.write_json("release/baseline.json", result)
    return result


def run_release(job, progress: Callable[[str], None] = print) -> dict:
    """Stage 2. Resumes at the last finished step; returns the summary. Leaves job.model as the base model."""
    started = time.perf_counter()
    already_finished = (job.dir / "release" / "summary.json").exists()
    loop = job_release_loop(job, load_forget_examples(job), progress, on_step=job.tracker.release_step)
    try:
        with profiling(job.dir / "profile.jsonl"), phase("release"):
            return _finish_release(job, loop, loop.run(), progress, started, already_finished)
    finally:
        loop.executor.detach()  # the ledger is on disk; later work in this process starts from the base


def _finish_release(job, loop: ReleaseLoop, state, progress, started: float, already_finished: bool) -> dict:
    steps = [asdict(s) for s in state.steps]
    release_dir = job.dir / "release"
    write_step_table(steps, release_dir)
    plot_steps(steps, release_dir / "steps.png", f"{job.config.task.name} unlearning")
    baseline = None
    if job.config.release.baseline_single_negation and len(steps) > 1:
        progress("single-negation baseline: one forget PEM, one weight, same forget score")
        with phase("single negation"):
            baseline = single_negation_baseline(job, loop, steps[-1]["validation"]["forget_score"], progress)
    summary = summarize(steps, baseline, state.stopped_reason, getattr(job.task, "held_out_forms", ()))
    previous = job.read_json("release/summary.json") if already_finished else None
    with phase("subspace similarity"):
        summary["subspace_similarity"] = previous["subspace_similarity"] if previous and "subspace_similarity" in \
            previous else retain_forget_similarity(loop.dir, steps)  # SVDs: minutes on CPU, computed once
    if not already_finished:
        # Wall time of the release runs that did the work (`rr compare` reports it); a run killed before it
        # finished is not counted.
        elapsed = (job.read_json("release/timing.json") or {}).get("wall_time_s", 0.0) + time.perf_counter() - started
        job.write_json("release/timing.json", {"wall_time_s": elapsed})
    job.write_json("release/summary.json", summary)
    (release_dir / "summary.md").write_text(summary_markdown(summary, job))
    job.tracker.release_finished(summary, steps)
    return summary


def retain_forget_similarity(release_dir, steps: list[dict], k: int = 8) -> list[dict]:
    """Table 1: similarity of every retain PEM with every forget PEM of the job (≈0: orthogonal)."""
    pems = {s["pem"]: Pem.load(release_dir / "pems" / s["pem"]) for s in steps[1:] if s["pem"]}
    retain = [name for name in pems if name.endswith("retain")]
    forget = [name for name in pems if name.endswith("forget")]
    return [pem_similarity(pems[r], pems[f], k) for r in retain for f in forget]


def _relative(new: float, old: float) -> float | None:
    return None if old == 0 else (new - old) / old


def summarize(steps: list[dict], baseline: dict | None, stopped_reason: str | None,
              held_out_forms: tuple[str, ...] = ()) -> dict:
    """Base vs final on the test split, and the iterative model vs the single-negation baseline; per form
    when the task has forms."""
    base, final = steps[0]["test"], steps[-1]["test"]
    summary = {
        "steps": len(steps) - 1,
        "ledger": [{"step": s["step"], "kind": s["kind"], "merge_weight": s["merge_weight"]} for s in steps[1:]],
        "stopped_reason": stopped_reason,
        "base": base, "final": final,
        "forget_relative_change": _relative(final["forget_score"], base["forget_score"]),
        "utility_relative_change": _relative(final["utility_score"], base["utility_score"]),
        "metric_relative_change": {m: _relative(final["metrics"][m], base["metrics"][m])
                                   for m in base["metrics"] if m in final["metrics"]},
    }
    if baseline is not None:
        summary["baseline"] = baseline
        summary["iterative_keeps_more_utility"] = final["utility_score"] > baseline["test"]["utility_score"]
    forms = form_report(base, {"rr": final, **({"single negation": baseline["test"]} if baseline else {})},
                        held_out_forms)
    if forms is not None:
        summary["forms"] = forms
    return summary


def summary_markdown(summary: dict, job) -> str:
    def fmt(evaluation, metric):
        value = evaluation["metrics"].get(metric)
        interval = evaluation.get("intervals", {}).get(metric)
        text = f"{value:.4f}" if value is not None else "–"
        return text + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")

    metrics = sorted(m for m in summary["base"]["metrics"] if not is_form_metric(m))  # forms: their own table
    columns = ["base", "rr (iterative)"] + (["single negation"] if "baseline" in summary else [])
    lines = [f"# Release summary: {job.config.task.name} ({job.config.model.name_or_path})", "",
             "Test split; rates with Wilson 95% intervals. Weights were chosen on the validation split.", "",
             "| metric | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for m in metrics:
        row = [fmt(summary["base"], m), fmt(summary["final"], m)]
        if "baseline" in summary:
            row.append(fmt(summary["baseline"]["test"], m))
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    row = [f"{summary['base'][k]:.4f}" for k in ("forget_score",)] + [f"{summary['final']['forget_score']:.4f}"]
    lines.append("| forget score | " + " | ".join(row + ([f"{summary['baseline']['test']['forget_score']:.4f}"]
                                                     if "baseline" in summary else [])) + " |")
    row = [f"{summary['base']['utility_score']:.4f}", f"{summary['final']['utility_score']:.4f}"]
    lines.append("| utility score | " + " | ".join(row + ([f"{summary['baseline']['test']['utility_score']:.4f}"]
                                                      if "baseline" in summary else [])) + " |")
    lines += ["", "Ledger: " + ", ".join(f"{e['merge_weight']:+g}·{e['kind']}" for e in summary["ledger"]), ""]
    for m, change in summary["metric_relative_change"].items():
        if change is not None and not is_form_metric(m):
            lines.append(f"- {m}: {change:+.1%} relative to the base model")
    if "baseline" in summary:
        b = summary["baseline"]
        lines.append(f"- single negation: weight {b['merge_weight']:+g} "
                     f"({'reaches' if b['reached_target'] else 'does NOT reach'} the iterative model's validation "
                     f"forget score {b['target_forget_score']:.3f}); iterative keeps more utility: "
                     f"{summary['iterative_keeps_more_utility']}")
    for sim in summary.get("subspace_similarity", []):
        lines.append(f"- subspace similarity (top-{sim['k']}) {sim['pem_a']} vs {sim['pem_b']}: "
                     f"{sim['mean']:.4f} ± {sim['std']:.4f} over {sim['modules']} modules")
    if summary["stopped_reason"]:
        lines.append(f"- stopped early: {summary['stopped_reason']}")
    if "forms" in summary:
        lines += ["", "## Per form", "",
                  "The same test items asked in each form (held-out forms never reached Reveal, validation or "
                  "training); the target behaviour's rate with Wilson 95% intervals (hits/items).", "",
                  form_markdown(summary["forms"], getattr(job.task, "form_metric", "hit rate")).rstrip()]
    return "\n".join(lines) + "\n"
