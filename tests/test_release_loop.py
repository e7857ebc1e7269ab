"""The release loop's decisions (Eq. 1's plan, the μ and λ rules, widening, stopping, skipping, resuming) on
scripted scores: an executor that looks each composition's score up by its signed merge weights, and saves
tiny PEMs the real way. No model is loaded; the loop, rules, weight search, ledger and checkpoints are real."""

import json

import pytest
import torch

from rr.config import ReleaseConfig
from rr.release.ledger import Ledger, Pem, WeightedPem
from rr.release.loop import ReleaseLoop
from rr.tasks.base import Evaluation, Example

TASK = object()  # the loop only hands its task to the executor
FORGET = [Example("reverse a string", "s[::-1]")]
RETAIN = [Example("what is 2 + 2?", "4")]


class Killed(BaseException):
    """What a kill looks like to the code under test: nothing after the raise point runs."""


class ScriptedExecutor:
    """Executor whose scores come from `scores`: signed merge weights of the composition → (forget, utility) or
    (forget, utility, metrics), the same on both splits. Every evaluation and every training is a call; the `kill_at`-th call raises
    Killed (a training after its PEM is saved, as a kill before the step's checkpoint would)."""

    name = "scripted"

    def __init__(self, scores: dict[tuple[float, ...], tuple], kill_at: int | None = None):
        self.scores = scores
        self.kill_at = kill_at
        self.calls = 0
        self.evaluated: list[tuple[str, tuple[float, ...]]] = []  # finished evaluations, in order
        self.stopped: list[tuple[str, tuple[float, ...]]] = []  # of those, the candidates stopped early
        self.trained: list[tuple[str, int, int]] = []  # (name, examples, seed) of finished trainings
        self.anchors: list[tuple[str, int, float, float]] = []  # (name, anchor examples, β, at weight) of each

    def _call(self) -> None:
        self.calls += 1
        if self.calls == self.kill_at:
            raise Killed()

    def evaluate(self, task, split, composition=()):
        assert task is TASK
        weights = tuple(w.merge_weight for w in composition)
        if weights not in self.scores:
            raise AssertionError(f"no scripted score for the composition {weights}")
        self._call()
        self.evaluated.append((split, weights))
        return Evaluation(*self.scores[weights])

    def search_weights(self, task, split, composition, pem, signed_weights, on_result, decided, stop_early=None):
        """With `stop_early`, a candidate whose scripted scores cross the limits comes back stopped early, as a task
        that could tell after half of its items (its scores are then not the model's: the rule must not read them)."""
        for weight in sorted(signed_weights, key=abs):
            if decided():
                return
            evaluation = self.evaluate(task, split, [*composition, WeightedPem(pem, weight)])
            reason = stop_early and stop_early.crossed(evaluation.forget_score, evaluation.utility_score)
            if reason:
                self.stopped.append((split, tuple(w.merge_weight for w in composition) + (weight,)))
                evaluation = Evaluation(-1.0, -1.0, stopped_early={"reason": reason, "scored": {"items": [1, 2]}})
            on_result(weight, evaluation)

    def train_pem(self, composition, examples, config, name, kind, out_dir, seed, checkpoints=(), anchor=(),
                  anchor_weight=0.0, anchor_scale=1.0):
        pem = Pem(name, kind, 1, 1.0, ["q_proj"], {"q_proj": (torch.ones(1, 2), torch.ones(2, 1))})
        pem.save(out_dir)
        self._call()
        self.trained.append((name, len(examples), seed))
        self.anchors.append((name, len(anchor), anchor_weight, anchor_scale))
        return pem

    def prepare(self, stage, work):
        pass


def run_loop(release_dir, scores, kill_at=None, retain=lambda: RETAIN, **release):
    """One run of the loop in `release_dir` (a fresh process's view of it); returns (state, executor)."""
    executor = ScriptedExecutor(scores, kill_at)
    config = ReleaseConfig(**{"forget_weights": [1.0, 2.0, 3.0], "retain_weights": [0.5, 1.0], **release})
    loop = ReleaseLoop(executor, TASK, config, release_dir, 10, "tiny-base", FORGET, retain,
                       progress=lambda message: None)
    return loop.run(), executor


def ledger_weights(release_dir) -> list[float]:
    return [entry.merge_weight for entry in Ledger.load(release_dir / "ledger.json").entries]


def never_called():
    raise AssertionError("the retain examples were made though no retain PEM was trained")


# Base (1.0, 0.8). Step 1: −1 halves the forget score, −2 meets rule 1 (≤ 0.1 × 1.0), and so would −3.
# Step 2: +0.5 recovers too little, +1 recovers utility ≥ 0.95 × 0.8. Step 3: −1 meets rule 1 (≤ 0.1 × 0.12).
PLAN = {(): (1.0, 0.8),
        (-1.0,): (0.5, 0.7), (-2.0,): (0.08, 0.6), (-3.0,): (0.05, 0.4),
        (-2.0, 0.5): (0.1, 0.7), (-2.0, 1.0): (0.12, 0.78),
        (-2.0, 1.0, -1.0): (0.01, 0.77), (-2.0, 1.0, -2.0): (0.0, 0.5)}


def test_the_plan_runs_forget_retain_forget_and_the_ledger_holds_the_chosen_signed_weights(tmp_path):
    made = []
    state, executor = run_loop(tmp_path, PLAN, iterations=1, retain=lambda: made.append(1) or RETAIN)
    assert [(s.kind, s.merge_weight, s.rule) for s in state.steps] == [
        ("base", 0.0, "base"), ("forget", -2.0, "forget_target"), ("retain", 1.0, "recover_target"),
        ("forget", -1.0, "forget_target")]
    assert ledger_weights(tmp_path) == [-2.0, 1.0, -1.0]
    assert Ledger.load(tmp_path / "ledger.json").base_model == "tiny-base"
    assert state.finished and state.stopped_reason is None
    assert [(s.validation["forget_score"], s.test["utility_score"]) for s in state.steps] == [
        (1.0, 0.8), (0.08, 0.6), (0.12, 0.78), (0.01, 0.77)]
    # each PEM trains on its own data, seeded by the job's seed + its step, and is saved under pems/
    assert executor.trained == [("step1-forget", 1, 11), ("step2-retain", 1, 12), ("step3-forget", 1, 13)]
    assert all(Pem.is_saved(tmp_path / "pems" / name) for name, _, _ in executor.trained)
    assert made == [1]  # the retain data is made once
    assert json.loads((tmp_path / "state.json").read_text())["finished"]


def test_rule_1_takes_the_smallest_forget_weight_meeting_it_and_scores_no_larger_one(tmp_path):
    state, executor = run_loop(tmp_path, PLAN, iterations=0, retain=never_called)
    step = state.steps[1]
    assert (step.merge_weight, step.rule) == (-2.0, "forget_target")
    assert [c["weight"] for c in step.candidates] == [1.0, 2.0]
    assert ("validation", (-3.0,)) not in executor.evaluated  # −3 also meets rule 1 but cannot change the choice


# No base-grid weight [1] passes either μ rule (the forget score rises); the widened grid [0.5, 1, 2] has −2.
NEEDS_WIDENING = {(): (1.0, 0.8), (-0.5,): (1.05, 0.8), (-1.0,): (1.1, 0.7), (-2.0,): (0.05, 0.7)}


def test_no_candidate_widens_the_grid_once_and_takes_the_wider_weight(tmp_path):
    state, _ = run_loop(tmp_path, NEEDS_WIDENING, iterations=0, forget_weights=[1.0], on_no_candidate="widen")
    step = state.steps[1]
    assert [c["weight"] for c in step.candidates] == [0.5, 1.0, 2.0]
    assert (step.merge_weight, step.rule) == (-2.0, "forget_target")
    assert ledger_weights(tmp_path) == [-2.0]


def test_no_candidate_with_on_no_candidate_stop_ends_the_release_with_the_reason(tmp_path):
    state, executor = run_loop(tmp_path, NEEDS_WIDENING, iterations=1, forget_weights=[1.0],
                               on_no_candidate="stop", retain=never_called)
    assert [s.kind for s in state.steps] == ["base"]
    assert state.finished and state.stopped_reason.startswith("step 1 (forget): no candidate weight passes")
    assert ("validation", (-2.0,)) not in executor.evaluated and not (tmp_path / "ledger.json").exists()


# Validation perplexity (base 10) in the metrics: +0.5 brings utility back but leaves perplexity at 12; +1 at 10.5.
WITH_TEXT = {(): (1.0, 0.8, {"perplexity": 10.0}), (-1.0,): (0.5, 0.7, {"perplexity": 11.0}),
             (-2.0,): (0.08, 0.6, {"perplexity": 13.0}),
             (-2.0, 0.5): (0.1, 0.78, {"perplexity": 12.0}), (-2.0, 1.0): (0.1, 0.78, {"perplexity": 10.5})}


@pytest.mark.parametrize("max_rise, retain_weight", [(None, 0.5), (0.1, 1.0)])
def test_a_perplexity_limit_makes_the_retain_step_bring_general_text_back_too(tmp_path, max_rise, retain_weight):
    state, _ = run_loop(tmp_path, WITH_TEXT, iterations=1, stop_when_forget_below=0.15, max_perplexity_rise=max_rise)
    assert [(s.kind, s.merge_weight) for s in state.steps] == [("base", 0.0), ("forget", -2.0),
                                                                ("retain", retain_weight)]
    assert state.steps[2].rule == "recover_target" and state.stopped_reason.startswith("targets met")
    # every candidate's perplexity is kept with its scores, so a resumed search decides the same way
    assert [c["perplexity"] for c in state.steps[2].candidates] == [12.0, 10.5][:len(state.steps[2].candidates)]


# Validation general check (base 0.6) in the metrics: +0.5 brings utility back with the instructions at 0.45 (75%);
# +1 brings them to 0.6. The test split scores the same, so the step table shows what the rule saw.
WITH_CHECK = {(): (1.0, 0.8, {"general_check_instructions": 0.6}), (-1.0,): (0.5, 0.7, {"general_check_instructions": 0.5}),
              (-2.0,): (0.08, 0.6, {"general_check_instructions": 0.3}),
              (-2.0, 0.5): (0.1, 0.78, {"general_check_instructions": 0.45}), (-2.0, 1.0): (0.1, 0.78, {"general_check_instructions": 0.6})}


@pytest.mark.parametrize("min_ratio, retain_weight", [(None, 0.5), (0.95, 1.0)])
def test_a_general_check_floor_makes_the_retain_step_bring_the_instructions_back_too(tmp_path, min_ratio,
                                                                                     retain_weight):
    state, _ = run_loop(tmp_path, WITH_CHECK, iterations=1, stop_when_forget_below=0.15,
                        min_general_check_ratio=min_ratio)
    assert [(s.kind, s.merge_weight) for s in state.steps] == [("base", 0.0), ("forget", -2.0),
                                                                ("retain", retain_weight)]
    assert state.steps[2].rule == "recover_target" and state.stopped_reason.startswith("targets met")
    assert [c["general_check"] for c in state.steps[2].candidates] == [0.45, 0.6][:len(state.steps[2].candidates)]
    if min_ratio is not None:
        assert "general check 0.600 ≥ 0.570" in state.steps[2].reason
        assert "general check 0.600 ≥ 0.570" in state.stopped_reason


def test_a_general_check_floor_is_kept_by_a_search_resumed_from_its_cache(tmp_path):
    # Killed on the second candidate's evaluation: the first candidate's general check comes back from the
    # checkpoint (state.json) and still rules it out, so the resumed search takes +1 as an unkilled one does.
    with pytest.raises(Killed):
        run_loop(tmp_path, WITH_CHECK, kill_at=9, iterations=1, stop_when_forget_below=0.15,
                 min_general_check_ratio=0.95)
    saved = json.loads((tmp_path / "state.json").read_text())["pending_candidates"]["2"]
    assert saved == {"0.5": [0.1, 0.78, None, 0.45]}
    state, _ = run_loop(tmp_path, WITH_CHECK, iterations=1, stop_when_forget_below=0.15, min_general_check_ratio=0.95)
    assert [s.merge_weight for s in state.steps] == [0.0, -2.0, 1.0]


def test_a_general_check_floor_without_a_validation_general_check_is_refused_with_the_fix(tmp_path):
    from rr.errors import RRError

    with pytest.raises(RRError, match="task.n_general_check_validation"):
        run_loop(tmp_path, PLAN, iterations=1, min_general_check_ratio=0.95)


def test_targets_met_after_a_retain_step_stop_before_the_next_forget_step(tmp_path):
    # step 1 reaches forget ≤ 0.1 but costs utility (0.6 < 0.76), so its retain step runs; that one recovers it.
    state, executor = run_loop(tmp_path, PLAN, iterations=2, stop_when_forget_below=0.15)
    assert [s.kind for s in state.steps] == ["base", "forget", "retain"]
    assert state.stopped_reason.startswith("targets met on the validation split: forget score 0.120")
    assert [name for name, _, _ in executor.trained] == ["step1-forget", "step2-retain"]
    assert ledger_weights(tmp_path) == [-2.0, 1.0]


def test_a_later_forget_step_with_nothing_left_to_forget_is_skipped(tmp_path):
    nothing_left = {**PLAN, (-2.0, 1.0): (0.0, 0.78)}  # the retain step leaves the forget score at 0
    state, executor = run_loop(tmp_path, nothing_left, iterations=1)
    assert [s.kind for s in state.steps] == ["base", "forget", "retain"]
    assert state.stopped_reason.startswith("step 3 (forget) not run")
    assert not (tmp_path / "pems" / "step3-forget").exists()
    assert ledger_weights(tmp_path) == [-2.0, 1.0]


def test_no_retain_step_means_the_retain_examples_are_never_made(tmp_path):
    state, _ = run_loop(tmp_path, PLAN, iterations=0, retain=never_called)
    assert [s.kind for s in state.steps] == ["base", "forget"]


def test_forget_anchor_anchors_every_forget_pem_on_the_retain_examples_at_the_largest_forget_weight(tmp_path):
    """release.forget_anchor: the retain examples are made before the first forget PEM and anchor each forget
    PEM (at the largest forget weight unless forget_anchor_at says otherwise); retain PEMs are never anchored."""
    _, executor = run_loop(tmp_path / "default", PLAN, iterations=1, forget_anchor=2.0)
    assert executor.anchors == [("step1-forget", 1, 2.0, 3.0), ("step2-retain", 0, 0.0, 1.0),
                                ("step3-forget", 1, 2.0, 3.0)]
    _, executor = run_loop(tmp_path / "at", PLAN, iterations=0, forget_anchor=0.5, forget_anchor_at=8.0)
    assert executor.anchors == [("step1-forget", 1, 0.5, 8.0)]
    _, executor = run_loop(tmp_path / "off", PLAN, iterations=0, retain=never_called)
    assert executor.anchors == [("step1-forget", 0, 0.0, 1.0)]


def test_a_loop_killed_at_any_evaluation_or_training_resumes_to_the_same_state_and_ledger(tmp_path):
    """Kill points: each score (base, every candidate of each step, widened ones too, each step's test score)
    and each training just after its PEM is saved. The resumed run scores no checkpointed candidate again
    (only the base model's validation score, made just before its test score) and retrains no saved PEM."""
    scores = {**PLAN, (-2.0, 0.25): (0.1, 0.7)}  # the retain grid [0.5] recovers too little: widened to [0.25, 0.5, 1]
    release = {"iterations": 1, "retain_weights": [0.5]}
    read = lambda release_dir: ((release_dir / "state.json").read_text(), (release_dir / "ledger.json").read_text())
    _, unkilled = run_loop(tmp_path / "unkilled", scores, **release)
    expected = read(tmp_path / "unkilled")
    assert [c["weight"] for c in json.loads(expected[0])["steps"][2]["candidates"]] == [0.25, 0.5, 1.0]
    for kill_at in range(1, unkilled.calls + 1):
        release_dir = tmp_path / f"killed-at-{kill_at}"
        with pytest.raises(Killed):
            run_loop(release_dir, scores, kill_at=kill_at, **release)
        saved = {p.name for p in (release_dir / "pems").iterdir() if Pem.is_saved(p)}
        _, resumed = run_loop(release_dir, scores, **release)
        assert read(release_dir) == expected, f"killed at call {kill_at}"
        assert not saved & {name for name, _, _ in resumed.trained}, f"killed at call {kill_at}: retrained {saved}"
        redone = (kill_at - 1) + resumed.calls - unkilled.calls  # calls made by both runs
        assert redone <= (1 if kill_at == 2 else 0), f"killed at call {kill_at}: {redone} scored again"


@pytest.mark.parametrize("stop_when_forget_below", [None, 0.15])  # ends on its plan's last step; ends on met targets
def test_without_a_test_split_per_step_only_the_base_and_the_final_model_are_tested_and_decisions_stay(
        tmp_path, stop_when_forget_below):
    every, _ = run_loop(tmp_path / "every", PLAN, iterations=1, stop_when_forget_below=stop_when_forget_below)
    state, executor = run_loop(tmp_path / "final", PLAN, iterations=1, test_each_step=False,
                               stop_when_forget_below=stop_when_forget_below)
    assert [(s.merge_weight, s.rule, s.validation) for s in state.steps] == [
        (s.merge_weight, s.rule, s.validation) for s in every.steps]
    assert [s.test is not None for s in state.steps] == [True] + [False] * (len(state.steps) - 2) + [True]
    assert state.steps[-1].test == every.steps[-1].test
    tested = [weights for split, weights in executor.evaluated if split == "test"]
    assert tested == [(), tuple(s.merge_weight for s in state.steps[1:])]


def test_a_kill_before_the_final_models_test_score_scores_it_on_the_rerun(tmp_path):
    _, unkilled = run_loop(tmp_path / "unkilled", PLAN, iterations=0, test_each_step=False)
    with pytest.raises(Killed):  # the last call: the final model's test score, after the finished state is saved
        run_loop(tmp_path / "killed", PLAN, kill_at=unkilled.calls, iterations=0, test_each_step=False)
    assert json.loads((tmp_path / "killed" / "state.json").read_text())["steps"][-1]["test"] is None
    state, resumed = run_loop(tmp_path / "killed", PLAN, iterations=0, test_each_step=False)
    assert resumed.evaluated == [("test", (-2.0,))] and state.steps[-1].test is not None
    assert (tmp_path / "killed" / "state.json").read_text() == (tmp_path / "unkilled" / "state.json").read_text()


# Each path of the weight rules, scored with early stop and in full: base (1.0, 0.8) throughout.
EARLY_STOP_PATHS = {
    # μ rule 1: −1 misses the target (stopped early), −2 meets it; λ rule: +0.5 short of 0.76 (stopped), +1 recovers
    "target met, λ passed": (PLAN, {"iterations": 1}),
    # no weight reaches forget ≤ 0.1: every candidate stops early, then all are scored in full for rule 2
    "relative drop": ({(): (1.0, 0.8), (-1.0,): (0.5, 0.75), (-2.0,): (0.3, 0.6), (-3.0,): (0.2, 0.3)},
                      {"iterations": 0, "on_no_candidate": "stop"}),
    # nothing qualifies under either branch: the step ends the release with the reason full scoring gives
    "no weight meets it": ({(): (1.0, 0.8), (-1.0,): (1.0, 0.7), (-2.0,): (1.2, 0.6), (-3.0,): (1.5, 0.4)},
                           {"iterations": 0, "on_no_candidate": "stop"}),
    # the λ rule's fallback: neither retain weight recovers 0.76, the highest utility within the bounce is taken
    "λ fallback": ({**PLAN, (-2.0, 0.5): (0.1, 0.7), (-2.0, 1.0): (0.12, 0.72)},
                   {"iterations": 1, "on_no_candidate": "stop", "retain_weights": [0.5, 1.0]}),
    # widened: −1 misses (stopped), the grid ×/÷2 adds −0.5 (stopped) and −2, which meets the target
    "widened": ({(): (1.0, 0.8), (-0.5,): (0.9, 0.8), (-1.0,): (0.5, 0.7), (-2.0,): (0.08, 0.6)},
                {"iterations": 0, "forget_weights": [1.0], "widen_factor": 2.0}),
    # a utility floor (0.9 × 0.8): −2 and −3 meet the forget target but fall below it, so rule 2 decides in full
    "utility floor": ({**PLAN, (-2.0,): (0.08, 0.6)},
                      {"iterations": 0, "forget_utility_floor": 0.9, "on_no_candidate": "stop"}),
}


@pytest.mark.parametrize("path", list(EARLY_STOP_PATHS))
def test_early_stop_and_full_scoring_agree_on_every_choice_and_every_score_a_rule_read(tmp_path, path):
    scores, release = EARLY_STOP_PATHS[path]
    full, full_executor = run_loop(tmp_path / "full", scores, stop_early=False, **release)
    early, early_executor = run_loop(tmp_path / "early", scores, **release)
    assert full_executor.stopped == []
    assert early_executor.stopped, "the path must stop at least one candidate early to test anything"
    assert [(s.step, s.merge_weight, s.rule, s.passed, s.validation, s.test) for s in early.steps] == [
        (s.step, s.merge_weight, s.rule, s.passed, s.validation, s.test) for s in full.steps]
    assert early.stopped_reason == full.stopped_reason
    assert (tmp_path / "early" / "ledger.json").exists() == (tmp_path / "full" / "ledger.json").exists()
    if (tmp_path / "full" / "ledger.json").exists():
        assert ledger_weights(tmp_path / "early") == ledger_weights(tmp_path / "full")
    for early_step, full_step in zip(early.steps[1:], full.steps[1:]):
        by_weight = {c["weight"]: c for c in full_step.candidates}
        for candidate in early_step.candidates:  # every score the rule read is the full scoring's
            if "stopped_early" not in candidate:
                assert candidate == by_weight[candidate["weight"]]
    decided = [s for s in early.steps[1:] if s.rule in ("forget_target", "recover_target")]
    if len(decided) == len(early.steps) - 1 and not early.stopped_reason:
        # every step decided: no candidate was scored twice, and the stopped ones stay recorded as stopped
        assert len(early_executor.evaluated) <= len(full_executor.evaluated)
        assert any("stopped_early" in c for s in early.steps[1:] for c in s.candidates)
    else:  # a step ended undecided: its stopped candidates were scored in full before its other branches read them
        undecided = [s for s in early.steps[1:] if s not in decided]
        assert all("stopped_early" not in c for s in undecided for c in s.candidates)
