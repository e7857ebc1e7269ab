"""Stage 2, Eq. 1: Φ0 − μ0·ΔF0, then per iteration +λi·ΔRi and −μi·ΔFi, weights chosen by the rules.

Every step trains one PEM on the current composed model, evaluates candidate merge weights on the
validation split by runtime scaling (no re-merge, no reload), applies the weight the rule picks, scores
the test split (each step's with release.test_each_step, else the final model's only), and checkpoints (adapter, ledger, scores) before the next step starts. The composition is
data (`entries`); an executor realizes it wherever generation and training run (rr/execution). The loop
takes only what it uses (no Job), so its decisions are tested with scripted scores (tests/test_release_loop.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from rr.config import ReleaseConfig
from rr.core.files import atomic_write_text
from rr.core.profile import phase
from rr.execution.base import Executor
from rr.release.ledger import Ledger, LedgerEntry, Pem, WeightedPem
from rr.release.weight_search import (GENERAL_CHECK_METRIC, describe, executor_scorer, scored_from_json,
                                      scored_to_json, search_weight, validation_scores)
from rr.release.weights import (RULE_FORGET_TARGET, RULE_RECOVER_TARGET, CandidateResult, WeightChoice,
                                choose_forget_weight, choose_retain_weight, forget_rule_limits, general_check_floor,
                                perplexity_limit, retain_rule_limits, utility_floor)
from rr.tasks.base import Evaluation, Example


def evaluation_dict(evaluation: Evaluation) -> dict:
    return {"forget_score": evaluation.forget_score, "utility_score": evaluation.utility_score,
            "metrics": evaluation.metrics, "intervals": {k: list(v) for k, v in evaluation.intervals.items()},
            "counts": evaluation.counts, **({"forms": evaluation.forms} if evaluation.forms else {})}


def cached_validation(scores: list) -> dict:
    """A step's validation scores from its weight search's cache (the weight it applied was scored there)."""
    validation = {"forget_score": scores[0], "utility_score": scores[1]}
    metrics = {name: score for name, score in zip(("perplexity", GENERAL_CHECK_METRIC), scores[2:])
               if score is not None}
    if metrics:
        validation["metrics"] = metrics
    return validation


@dataclass
class StepRecord:
    """One row of the step table (papers/002 Tables 7–9)."""

    step: int
    kind: str                 # "base", "forget" or "retain"
    pem: str | None
    merge_weight: float       # signed: −μ for forget steps, +λ for retain steps, 0 for the base
    rule: str
    passed: bool
    reason: str
    validation: dict
    test: dict | None         # None: not scored (release.test_each_step off, and not the final step)
    candidates: list[dict] = field(default_factory=list)


@dataclass
class ReleaseState:
    steps: list[StepRecord] = field(default_factory=list)
    pending_candidates: dict = field(default_factory=dict)   # step → {weight: result} of an unfinished search
    stopped_reason: str | None = None
    finished: bool = False

    @classmethod
    def load(cls, path: Path) -> "ReleaseState":
        if not path.exists():
            return cls()
        raw = json.loads(path.read_text())
        return cls([StepRecord(**s) for s in raw["steps"]], raw["pending_candidates"], raw["stopped_reason"],
                   raw["finished"])

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(asdict(self), indent=1))


def step_plan(iterations: int) -> list[str]:
    """forget, then (retain, forget) × iterations."""
    return ["forget"] + ["retain", "forget"] * iterations


def nothing_left_to_forget(step: int, kind: str, forget_before: float, stop_below: float | None) -> str | None:
    """Why a later forget step should not run, or None. With the validation forget score already at the
    stop target (0 when none is set), rule 1 (s ≤ 0.1·s_ref) holds for every weight, so the step would
    apply its smallest weight and could only cost utility. Step 1 always runs: the base model is the
    reference the whole loop is measured against."""
    floor = 0.0 if stop_below is None else stop_below
    if kind != "forget" or step == 1 or forget_before > floor:
        return None
    return (f"step {step} (forget) not run: the validation forget score is already {forget_before:.3f} "
            f"(≤ {floor:g}), so there is nothing left to forget and any weight would only cost utility")


def targets_met(validation: dict, base_validation: dict, stop_below: float | None,
                recover_fraction: float, max_perplexity: float | None = None,
                min_general_check: float | None = None) -> str | None:
    """Why the loop may stop after a step, or None: the validation forget score is at most the stop target
    (release.stop_when_forget_below; never when unset), the utility is at least recover_fraction × the
    base model's, the perplexity at most max_perplexity and the general check at least min_general_check
    (each when set). A forget step that reaches the forget target but has cost utility is followed by its
    retain step; a retain step that recovers utility while the forget score stays at the target ends the
    loop before another forget step can cost more."""
    if stop_below is None:
        return None
    forget, utility = validation["forget_score"], validation["utility_score"]
    utility_target = recover_fraction * base_validation["utility_score"]
    if forget > stop_below or utility < utility_target:
        return None
    metrics = validation.get("metrics", {})
    perplexity, general_check = metrics.get("perplexity"), metrics.get(GENERAL_CHECK_METRIC)
    if max_perplexity is not None and (perplexity is None or perplexity > max_perplexity):
        return None
    if min_general_check is not None and (general_check is None or general_check < min_general_check):
        return None
    text = (("" if max_perplexity is None else f" and perplexity {perplexity:.3f} ≤ {max_perplexity:.3f}")
            + ("" if min_general_check is None else f" and general check {general_check:.3f} ≥ {min_general_check:.3f}"))
    return (f"targets met on the validation split: forget score {forget:.3f} ≤ {stop_below:g} and utility "
            f"{utility:.3f} ≥ {recover_fraction:g} × base {base_validation['utility_score']:.3f}{text}")


class ReleaseLoop:
    """Runs Eq. 1 for `task` through `executor`, checkpointing in `release_dir` (state.json, ledger.json,
    pems/step{n}-{kind}); `evaluate(split)` scores the model as currently composed.

    `retain_examples` makes the retain PEMs' training data (and anchored forget PEMs' anchor, with
    release.forget_anchor); it is called once, when the first PEM that needs it is trained, so data the base
    model generates (general retain data) is made only if a retain step or an anchored forget step runs.
    `seed` + the step's number seeds each PEM's training; `base_model` names the model in the ledger."""

    def __init__(self, executor: Executor, task, config: ReleaseConfig, release_dir: Path, seed: int,
                 base_model: str, forget_examples: list[Example], retain_examples: Callable[[], list[Example]],
                 progress: Callable[[str], None] = print,
                 on_step: Callable[[StepRecord], None] = lambda record: None):
        self.executor = executor
        self.task = task
        self.config = config
        self.seed = seed
        self.base_model = base_model
        self.forget_examples = forget_examples
        self.make_retain_examples = retain_examples
        self.retain_examples: list[Example] | None = None  # made on first use
        self.progress = progress
        self.on_step = on_step  # called with each finished step, after its checkpoint (tracking)
        self.dir = Path(release_dir)
        (self.dir / "pems").mkdir(parents=True, exist_ok=True)
        self.state_path = self.dir / "state.json"
        self.ledger_path = self.dir / "ledger.json"
        self.entries: list[WeightedPem] = []  # the composition so far: (PEM, signed merge weight) in ledger order

    # ---- evaluation --------------------------------------------------------------------
    def evaluate(self, split: str) -> Evaluation:
        with phase(split):
            return self.executor.evaluate(self.task, split, self.entries)

    # ---- the loop ----------------------------------------------------------------------
    def run(self) -> ReleaseState:
        self.state = ReleaseState.load(self.state_path)
        ledger = self._restore_ledger()
        self.executor.prepare("release", len(self.forget_examples))  # sizes trainers (and replicas) for the work
        if not self.state.steps:
            self.progress("release: scoring the base model (validation and test)")
            with phase("step 0 (base)"):
                self.state.steps.append(StepRecord(0, "base", None, 0.0, "base", True, "base model",
                                                   evaluation_dict(self.evaluate("validation")),
                                                   evaluation_dict(self.evaluate("test"))))
            self.state.save(self.state_path)
            self.on_step(self.state.steps[0])
        if self.state.finished:
            self._score_final_test()
            return self.state
        self._perplexity_limit(), self._general_check_floor()  # refused now, not after a step's work
        plan = step_plan(self.config.iterations)
        for step, kind in enumerate(plan, start=1):
            if step < len(self.state.steps):
                continue  # finished before a restart
            skip = nothing_left_to_forget(step, kind, self.state.steps[-1].validation["forget_score"],
                                          self.config.stop_when_forget_below)
            if skip:
                self.state.stopped_reason = skip
                self.progress(skip)
                break
            with phase(f"step {step} ({kind})"):
                record = self._run_step(step, kind, ledger)
            if record is None:
                break
            met = targets_met(record.validation, self.state.steps[0].validation,
                              self.config.stop_when_forget_below, self.config.recover_fraction,
                              self._perplexity_limit(), self._general_check_floor())
            if met and step < len(plan):
                self.state.stopped_reason = met
                self.progress(met)
                break
        self.state.finished = True
        self.state.save(self.state_path)
        self._score_final_test()
        return self.state

    def _score_final_test(self) -> None:
        """The final model's test split, where release.test_each_step left its step unscored (a rerun after a kill
        here scores it then: the finished state and the ledger already describe the final model)."""
        last = self.state.steps[-1]
        if last.test is None:
            self.progress(f"release: scoring the final model (step {last.step}) on the test split")
            with phase(f"step {last.step} final"):
                last.test = evaluation_dict(self.evaluate("test"))
            self.state.save(self.state_path)

    def _run_step(self, step: int, kind: str, ledger: Ledger) -> StepRecord | None:
        name = f"step{step}-{kind}"
        previous = self.state.steps[-1].validation
        base = self.state.steps[0].validation
        with phase("pem"):
            pem = self._train_or_load(name, kind)
        sign = -1.0 if kind == "forget" else 1.0
        magnitudes = self.config.forget_weights if kind == "forget" else self.config.retain_weights
        self.progress(f"step {step} ({kind}): searching {len(magnitudes)} weights on the validation split")
        with phase("search"):
            choice = self.search(step, sign, pem, magnitudes,
                                 lambda results: self._choose(kind, results, previous, base),
                                 lambda choice: choice.rule in (RULE_FORGET_TARGET, RULE_RECOVER_TARGET),
                                 self.config.widen_factor if self.config.on_no_candidate == "widen" else None,
                                 self._limits(kind, previous, base))
        cached = self.state.pending_candidates.get(str(step), {})
        if choice.weight is None:
            self.state.stopped_reason = f"step {step} ({kind}): no candidate weight passes: {choice.reason}"
            self.progress(self.state.stopped_reason)
            self.state.save(self.state_path)
            return None
        merge_weight = sign * choice.weight
        self.entries.append(WeightedPem(pem, merge_weight))
        ledger.entries.append(LedgerEntry(pem.name, f"pems/{name}", kind, merge_weight, step))
        validation = evaluation_dict(self.evaluate("validation")) if repr(merge_weight) not in cached else \
            cached_validation(cached[repr(merge_weight)])
        test = evaluation_dict(self.evaluate("test")) if self.config.test_each_step else None
        stopped = [{"weight": abs(float(w)), **scores} for w, scores in cached.items() if isinstance(scores, dict)]
        candidates = sorted([asdict(c) for c in choice.evaluated] + stopped, key=lambda c: abs(c["weight"]))
        record = StepRecord(step, kind, pem.name, merge_weight, choice.rule, choice.passed, choice.reason,
                            validation, test, candidates)
        ledger.save(self.ledger_path)
        self.state.steps.append(record)
        self.state.pending_candidates.pop(str(step), None)
        self.state.save(self.state_path)
        self.on_step(record)
        scored = record.test or record.validation
        self.progress(f"step {step}: applied {merge_weight:+g} ({choice.rule}); {'test' if record.test else 'validation'}"
                      f" forget {scored['forget_score']:.3f}, utility {scored['utility_score']:.3f}")
        return record

    def search(self, step: int, sign: float, pem: Pem, magnitudes, choose, decisive,
               widen_factor: float | None = None, stop_early=None) -> WeightChoice:
        """Step `step`'s weight search (rr/release/weight_search.py) for `pem` applied with `sign` on top of the
        composition so far, scored on the validation split through the executor (each candidate stopped early
        at `stop_early`, the limits of the rule's deciding branch); every score is checkpointed in the release
        state as it arrives, so a killed search resumes with the next candidate."""
        # repr(signed weight) → [forget, utility, perplexity, general check (None where the task reports none)], or
        # {"stopped_early": {reason, scored}} for a candidate stopped early
        cached = self.state.pending_candidates.setdefault(str(step), {})

        def checkpoint(weight: float, evaluation: Evaluation) -> None:
            cached[repr(weight)] = scored_to_json(validation_scores(evaluation))
            self.progress(f"  candidate {describe(weight, evaluation)}")
            self.state.save(self.state_path)

        score = executor_scorer(self.executor, self.task, self.entries, pem, sign, checkpoint, stop_early)

        def on_widen(choice: WeightChoice, wider: list[float]) -> None:
            self.progress(f"step {step}: no candidate met the target ({choice.reason}); widening to {wider}")

        return search_weight(magnitudes, choose, decisive, score,
                             {abs(float(w)): scored_from_json(scores) for w, scores in cached.items()}, widen_factor,
                             on_widen)

    def _limits(self, kind: str, previous: dict, base: dict):
        """The limits of the step's deciding rule branch, where a candidate's scoring may stop (release.stop_early)."""
        if not self.config.stop_early:
            return None
        if kind == "forget":
            return forget_rule_limits(previous["forget_score"], self.config.forget_fraction,
                                      utility_floor(self.config.forget_utility_floor, base["utility_score"]))
        return retain_rule_limits(previous["forget_score"], base["utility_score"], self.config.recover_fraction,
                                  self.config.forget_bounce)

    def _choose(self, kind: str, results: list[CandidateResult], previous: dict, base: dict) -> WeightChoice:
        if kind == "forget":
            return choose_forget_weight(results, previous["forget_score"], previous["utility_score"],
                                        self.config.forget_fraction,
                                        utility_floor(self.config.forget_utility_floor, base["utility_score"]))
        return choose_retain_weight(results, previous["forget_score"], base["utility_score"],
                                    self.config.recover_fraction, self.config.forget_bounce, self._perplexity_limit(),
                                    self._general_check_floor())

    def _perplexity_limit(self) -> float | None:
        """release.max_perplexity_rise over the base model's validation perplexity (None: not set)."""
        if self.config.max_perplexity_rise is None:
            return None
        return perplexity_limit(self.config.max_perplexity_rise,
                                self.state.steps[0].validation.get("metrics", {}).get("perplexity"))

    def _general_check_floor(self) -> float | None:
        """release.min_general_check_ratio × the base model's validation general check (None: not set)."""
        return general_check_floor(self.config.min_general_check_ratio,
                                   self.state.steps[0].validation.get("metrics", {}).get(GENERAL_CHECK_METRIC))

    def _train_or_load(self, name: str, kind: str) -> Pem:
        out_dir = self.dir / "pems" / name
        if Pem.is_saved(out_dir):  # its marker, not its weights: a kill mid-save retrains
            self.progress(f"{name}: reusing the trained adapter in {out_dir}")
            return Pem.load(out_dir)
        anchored = kind == "forget" and self.config.forget_anchor is not None
        if (kind == "retain" or anchored) and self.retain_examples is None:
            self.retain_examples = self.make_retain_examples()
        examples = self.forget_examples if kind == "forget" else self.retain_examples
        anchor = f", anchored on {len(self.retain_examples)} retain examples" if anchored else ""
        self.progress(f"{name}: training a LoRA on {len(examples)} {kind} examples{anchor}")
        anchoring = {} if not anchored else {
            "anchor": self.retain_examples, "anchor_weight": self.config.forget_anchor,
            "anchor_scale": self.config.forget_anchor_at or max(self.config.forget_weights)}
        return self.executor.train_pem(self.entries, examples, self.config.lora, name, kind, out_dir,
                                       seed=self.seed + len(self.state.steps), **anchoring)

    def _restore_ledger(self) -> Ledger:
        """Re-attach every finished step's PEM with its weight: the model is as it was before the kill."""
        if not self.ledger_path.exists():
            return Ledger(base_model=self.base_model, entries=[])
        ledger = Ledger.load(self.ledger_path)
        self.entries = list(ledger.resolve(self.dir))
        # Steps whose ledger entry was written but whose state was not are redone from the state's view.
        done = len(self.state.steps) - 1 if self.state.steps else 0
        while len(ledger.entries) > max(done, 0):
            ledger.entries.pop()
            self.entries.pop()
        return ledger
