"""A job killed anywhere resumes to the result of an unkilled run: every release step boundary and candidate, a
PEM save cut between its weights and its marker, the single-negation baseline, Reveal's checkpoint and compare.

The release stage runs for real (loop, rules, executor, ledger, PEM files, baseline, reports) on a two-unit
model whose scores are a closed form of the composition; training a PEM is the one thing replaced (fixed
tensors), so a test takes seconds where the embedded model would take minutes. Kills are raised in-process at
the Nth call of a function (a BaseException, as KeyboardInterrupt is), which leaves the files exactly as a
SIGKILL at that point would: every checkpoint is written by an atomic rename.
"""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import rr.release.ledger as ledger_module
import rr.release.pem as pem_module
from rr.config import load_config
from rr.job import Job
from rr.release.ledger import Pem
from rr.tasks.base import Evaluation, Example

CI_CONFIG = "configs/ci.yaml"


class Killed(BaseException):
    """What a kill looks like to the code under test: nothing after the raise point runs."""


class TwoUnitModel(nn.Module):
    """One target Linear: forget PEMs move unit 0 (and harm unit 1 a little), retain PEMs restore unit 1."""

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(2, 2, bias=False)
        nn.init.zeros_(self.q_proj.weight)


class ClosedFormTask:
    """forget score 0.8·exp(1.3·unit0), utility 0.6 + 0.2·unit1 (the test split is scaled, so it differs)."""

    answer_stop = ()

    def __init__(self):
        self.calls = 0
        self.kill_at = None

    def retain_examples(self):
        return [Example("what is 2 + 2?", "4")]

    def evaluate(self, generator, split, stop_early=None):  # scores in full (the Task protocol allows it)
        self.calls += 1
        if self.calls == self.kill_at:
            raise Killed()
        with torch.no_grad():
            unit0, unit1 = generator.model.q_proj(torch.ones(1, 2))[0].tolist()
        scale = 1.0 if split == "validation" else 1.1
        forget, utility = scale * 0.8 * math.exp(1.3 * unit0), scale * (0.6 + 0.2 * unit1)
        return Evaluation(forget, utility, {"pass@1": forget, "arithmetic_accuracy": utility})


class Probe:
    def __init__(self, model):
        self.model = model


def fixed_training(model, tokenizer, examples, config, name, kind, out_dir, seed, chat_template=True,
                   checkpoints=(), anchor=(), anchor_weight=0.0, anchor_scale=1.0):
    """Stands in for LoRA training: a rank-1 PEM per kind, saved with the real Pem.save."""
    if kind == "forget":
        a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [0.25]])
    else:
        a, b = torch.tensor([[0.0, 1.0]]), torch.tensor([[-0.3], [1.0]])
    pem = Pem(name=name, kind=kind, rank=1, alpha=1.0, target_modules=["q_proj"], tensors={"q_proj": (a, b)})
    pem.save(out_dir)
    return pem


# Step 1 meets rule 1 at −2 (forget 0.059); step 2's grid [0.25] recovers no utility, so it widens to
# [0.125, 0.25, 0.5] and +0.5 brings the forget score to 0.049 ≤ 0.05 with the utility back: the loop stops
# before step 3. The baseline needs the widened grid too: −4 is the first weight reaching 0.049.
RELEASE = {"iterations": 1, "forget_weights": [1.0, 2.0], "retain_weights": [0.25], "on_no_candidate": "widen",
           "stop_when_forget_below": 0.05, "general_retain_prompts": 0, "baseline_single_negation": True,
           "widen_factor": 2.0, "forget_fraction": 0.9, "recover_fraction": 0.95, "forget_bounce": 0.3}


def make_job(job_dir, monkeypatch, compare=None, release=None):
    from rr.config import CompareConfig

    import rr.evaluation.report as report_module
    import rr.release.stage as stage_module

    monkeypatch.setattr(pem_module, "train_pem", fixed_training)
    # Plots are redrawn from the checkpoints on every run (nothing resumes from them) and take most of a run's time.
    monkeypatch.setattr(stage_module, "plot_steps", lambda *args, **kwargs: None)
    monkeypatch.setattr(report_module, "plot_tradeoff", lambda *args, **kwargs: None)
    config = load_config(CI_CONFIG, job_dir)
    config = config.model_copy(update={
        "release": config.release.model_copy(update={**RELEASE, **(release or {})}),
        "tracking": config.tracking.model_copy(update={"enabled": False}),
        "compare": CompareConfig(**compare) if compare else None})
    job = Job(config)
    write_forget_set(job.dir)  # what a finished Reveal leaves
    model = TwoUnitModel()
    job.__dict__.update(model_and_tokenizer=(model, None), generator=Probe(model), task=ClosedFormTask())
    return job


def write_forget_set(job_dir):
    reveal = job_dir / "reveal"
    if (reveal / "manifest.json").exists():
        return
    reveal.mkdir(exist_ok=True)
    (reveal / "forget_set.jsonl").write_text(json.dumps({"prompt": "reverse a string", "response": "s[::-1]"}) + "\n")
    (reveal / "manifest.json").write_text(json.dumps({"size": 1}))


def release_once(job_dir, monkeypatch, kill_at=None):
    """run_release in a fresh Job (a fresh process's view of the directory); returns (summary, evaluations)."""
    from rr.release.stage import run_release

    job = make_job(job_dir, monkeypatch)
    job.task.kill_at = kill_at
    try:
        return run_release(job, progress=lambda _: None), job.task.calls
    finally:
        job.close()


def release_result(job_dir) -> dict:
    """What a user gets from the release stage: the step records, the ledger and the summary."""
    read = lambda name: json.loads((job_dir / "release" / name).read_text())
    summary = read("summary.json")
    return {"steps": read("state.json")["steps"], "ledger": read("ledger.json"),
            "summary": {k: summary[k] for k in ("ledger", "stopped_reason", "base", "final", "baseline")}}


@pytest.fixture
def unkilled(tmp_path_factory, monkeypatch):
    job_dir = tmp_path_factory.mktemp("unkilled") / "job"
    _, evaluations = release_once(job_dir, monkeypatch)
    return release_result(job_dir), evaluations


def test_the_scenario_widens_stops_early_and_needs_new_baseline_candidates(unkilled):
    result, _ = unkilled
    steps = result["steps"]
    assert [s["kind"] for s in steps] == ["base", "forget", "retain"]
    assert [c["weight"] for c in steps[2]["candidates"]] == [0.125, 0.25, 0.5]  # widened from [0.25]
    assert result["summary"]["stopped_reason"].startswith("targets met")
    baseline = result["summary"]["baseline"]
    assert baseline["merge_weight"] == -4.0 and baseline["reached_target"]


def test_a_baseline_made_for_another_target_is_chosen_again_and_one_for_this_target_is_reused(
        tmp_path, monkeypatch, unkilled):
    job_dir = tmp_path / "job"
    release_once(job_dir, monkeypatch)
    baseline_path = job_dir / "release" / "baseline.json"
    _, evaluations = release_once(job_dir, monkeypatch)
    assert evaluations == 0  # a finished release with its baseline: nothing is scored again
    stale = json.loads(baseline_path.read_text())
    stale.update(target_forget_score=0.5, merge_weight=-1.0)  # as if the loop had ended elsewhere before
    baseline_path.write_text(json.dumps(stale))
    (job_dir / "release" / "summary.json").unlink()
    release_once(job_dir, monkeypatch)
    assert release_result(job_dir)["summary"]["baseline"] == unkilled[0]["summary"]["baseline"]


def test_a_utility_floor_refuses_the_weight_rule_1_would_take(tmp_path, monkeypatch):
    """release.forget_utility_floor reaches the loop's μ rule: −2 meets rule 1 (forget 0.059) but leaves utility
    0.50 < 0.9 × base 0.60; nothing in the widened grid meets rule 1 within the floor, so rule 2 takes −1."""
    from rr.release.stage import run_release

    job = make_job(tmp_path / "job", monkeypatch, release={"forget_utility_floor": 0.9})
    try:
        run_release(job, progress=lambda _: None)
    finally:
        job.close()
    step = json.loads((tmp_path / "job" / "release" / "state.json").read_text())["steps"][1]
    assert (step["merge_weight"], step["rule"]) == (-1.0, "relative_drop")
    assert "left out for utility below the floor 0.5400" in step["reason"]


def test_a_release_killed_at_any_evaluation_resumes_to_the_same_result(tmp_path, monkeypatch, unkilled):
    """Every evaluation is a kill point: base scoring, each candidate of each step (widened ones too), each
    step's test scoring, the baseline's candidates and its test scoring. What was checkpointed before the kill
    is not scored again (at most the base model's validation score, made just before its test score)."""
    expected, total = unkilled
    for kill_at in range(1, total + 1):
        job_dir = tmp_path / f"killed-at-{kill_at}"
        with pytest.raises(Killed):
            release_once(job_dir, monkeypatch, kill_at=kill_at)
        _, resumed = release_once(job_dir, monkeypatch)
        assert release_result(job_dir) == expected, f"killed at evaluation {kill_at}"
        redone = (kill_at - 1) + resumed - total
        assert redone <= (1 if kill_at == 2 else 0), f"killed at evaluation {kill_at}: {redone} scored again"


def test_a_pem_save_killed_between_weights_and_marker_is_retrained_not_reused(tmp_path, monkeypatch, unkilled):
    expected, _ = unkilled
    job_dir = tmp_path / "job"
    real_write = ledger_module.atomic_write

    def dies_before_the_marker(path, write):
        if path.name == ledger_module.PEM_SIDECAR:
            raise Killed()
        real_write(path, write)

    monkeypatch.setattr(ledger_module, "atomic_write", dies_before_the_marker)
    with pytest.raises(Killed):
        release_once(job_dir, monkeypatch)
    pem_dir = job_dir / "release" / "pems" / "step1-forget"
    assert (pem_dir / ledger_module.ADAPTER_WEIGHTS).is_file() and not Pem.is_saved(pem_dir)
    # A half-written adapter must not be read back as a finished one.
    (pem_dir / ledger_module.ADAPTER_WEIGHTS).write_bytes(b"cut off")
    monkeypatch.setattr(ledger_module, "atomic_write", real_write)
    release_once(job_dir, monkeypatch)
    assert release_result(job_dir) == expected
    assert Pem.is_saved(pem_dir)


def test_a_pem_saved_again_over_an_old_one_is_not_trusted_until_it_finishes(tmp_path):
    old = Pem("p", "forget", 1, 1.0, ["q_proj"], {"q_proj": (torch.ones(1, 2), torch.ones(2, 1))})
    old.save(tmp_path)
    assert Pem.is_saved(tmp_path)
    real_write = ledger_module.atomic_write
    ledger_module.atomic_write = lambda path, write: (_ for _ in ()).throw(Killed())
    try:
        with pytest.raises(Killed):
            old.save(tmp_path)
    finally:
        ledger_module.atomic_write = real_write
    assert not Pem.is_saved(tmp_path)


# ---- Reveal's checkpoint -----------------------------------------------------------------------------------


class KeywordTask:
    answer_stop = ()

    def contexts(self, split):
        from rr.tasks.base import Context

        return [Context(f"c{i}", f"problem {i}") for i in range(5)]

    def relevance(self, contexts, responses):
        return [1.0 if "def" in r else 0.2 for r in responses]


def keyword_generate(prompts, params, seeds):
    return [[(f"def f{seed % 89}(): pass" if "code" in prompt else f"hello {seed % 7}")] * params.n
            for prompt, seed in zip(prompts, seeds)]


def hashed_embed(texts):
    rows = [np.random.default_rng(sum(map(ord, t)) * 7919 % (2 ** 32)).standard_normal(8) for t in texts]
    matrix = np.array(rows, dtype=np.float32)
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def reveal_search(directory):
    from rr.config import RevealConfig
    from rr.reveal.arms import ArmPool
    from rr.reveal.search import RevealCheckpoint, RevealSearch

    instructions = ["The instruction was to write code.", "The instruction was to greet.",
                    "The instruction was to code a function.", "The instruction was to count.",
                    "The instruction was to write more code."]
    config = RevealConfig(n_arms=5, outer_loops=2, inner_rounds=2, arms_per_round=2, initial_random_arms=2,
                          context_sample=3, warm_start_top_k=2, ucb_train_steps=10, finalists=2)
    arms = ArmPool(np.zeros((5, 2)), instructions, np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32))
    return RevealSearch(config, KeywordTask(), arms, keyword_generate, hashed_embed, RevealCheckpoint(directory),
                        seed=0)


def test_a_reveal_killed_inside_any_checkpoint_write_resumes_to_the_same_forget_set(tmp_path, monkeypatch):
    """A kill after the records, Gram matrix and bandit of a round are written but before its state: the resumed
    search must not add the same records or bandit observations twice."""
    import rr.reveal.search as search_module

    full_state, full_records = reveal_search(tmp_path / "full").run()
    state_writes = len(full_state.evaluations) // 2 + 2 + 1  # rounds + outer loops + the finished flag, at most
    real_write = search_module.atomic_write_text
    for kill_at in range(1, state_writes + 1):
        calls = {"state": 0}

        def dies_before_the_state(path, text):
            if path.name == "state.json":
                calls["state"] += 1
                if calls["state"] == kill_at:
                    raise Killed()
            real_write(path, text)

        directory = tmp_path / f"killed-{kill_at}"
        monkeypatch.setattr(search_module, "atomic_write_text", dies_before_the_state)
        try:
            reveal_search(directory).run()
            continue  # fewer state writes than this kill point
        except Killed:
            pass
        monkeypatch.setattr(search_module, "atomic_write_text", real_write)
        state, records = reveal_search(directory).run()
        assert records == full_records, f"killed before state write {kill_at}"
        assert [(e.arm, e.score) for e in state.evaluations] == [(e.arm, e.score) for e in full_state.evaluations]
        assert state.best_instructions == full_state.best_instructions
        assert sorted(p.name for p in directory.iterdir()) == sorted(p.name for p in (tmp_path / "full").iterdir())


# ---- compare -------------------------------------------------------------------------------------------------


def compare_once(job_dir, monkeypatch, kill_at=None):
    """run_compare of pem-negation then reveal-release in a fresh Job; returns (table rows, evaluations)."""
    from rr.compare import run_compare

    job = make_job(job_dir, monkeypatch, compare={"methods": ["pem-negation", "reveal-release"]})
    job.task.kill_at = kill_at
    try:
        summary = run_compare(job, progress=lambda _: None)
    finally:
        job.close()
    # Wall times differ between runs; everything else a user reads in the table must not.
    return [{k: row[k] for k in ("method", "test", "details")} for row in summary["rows"]], job.task.calls


def test_a_compare_killed_at_any_evaluation_resumes_to_the_same_table(tmp_path, monkeypatch):
    unkilled_dir = tmp_path / "unkilled"
    expected, total = compare_once(unkilled_dir, monkeypatch)
    assert [row["method"] for row in expected] == ["base", "pem-negation", "reveal-release"]
    for kill_at in range(1, total + 1):
        job_dir = tmp_path / f"killed-at-{kill_at}"
        with pytest.raises(Killed):
            compare_once(job_dir, monkeypatch, kill_at=kill_at)
        rows, resumed = compare_once(job_dir, monkeypatch)
        for row in rows:  # the directories differ; what they hold does not
            row["details"].pop("pem_dir", None), row["details"].pop("release_dir", None)
        for row in expected:
            row["details"].pop("pem_dir", None), row["details"].pop("release_dir", None)
        assert rows == expected, f"killed at evaluation {kill_at}"
        # Checkpointed scores are not made again; at most the release's base validation score (see above).
        assert (kill_at - 1) + resumed - total <= 1, f"killed at evaluation {kill_at}"


def test_a_compare_method_rerun_on_other_data_does_not_reuse_what_it_trained_before(tmp_path, monkeypatch):
    compare_once(tmp_path / "job", monkeypatch)
    pem_dir = tmp_path / "job" / "compare" / "pem-negation" / "pem"
    first = (pem_dir / ledger_module.ADAPTER_WEIGHTS).stat().st_mtime_ns
    forget_set = tmp_path / "job" / "reveal" / "forget_set.jsonl"
    forget_set.write_text(json.dumps({"prompt": "sort a list", "response": "sorted(xs)"}) + "\n")
    compare_once(tmp_path / "job", monkeypatch)
    assert (pem_dir / ledger_module.ADAPTER_WEIGHTS).stat().st_mtime_ns != first  # retrained on the new data


def test_arm_decoding_killed_while_writing_its_cache_decodes_again_to_the_same_arms(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import rr.reveal.stage as reveal_stage
    from rr.config import RevealConfig
    from rr.reveal.arms import ArmPool

    decoded = []

    def decode(*args, **kwargs):
        decoded.append(1)
        return ArmPool(np.arange(6.0).reshape(3, 2), ["The instruction was to a.", "The instruction was to b.",
                                                        "The instruction was to a."], np.eye(3, dtype=np.float32))

    monkeypatch.setattr(reveal_stage, "decode_arm_pool", decode)
    job = SimpleNamespace(dir=tmp_path, model=None, tokenizer=None, generator=None,
                          config=SimpleNamespace(reveal=RevealConfig(n_arms=3), seed=0,
                                                 model=SimpleNamespace(instruction_model=None),
                                                 generation=SimpleNamespace(backend="hf", batch_size=4)),
                          task=SimpleNamespace(exemplars=lambda: []))
    real_to_npz = ArmPool.to_npz

    def cut_off(self, path):
        real_to_npz(self, path)
        with open(path, "r+b") as handle:
            handle.truncate(100)  # what a kill in the middle of the write leaves
        raise Killed()

    monkeypatch.setattr(ArmPool, "to_npz", cut_off)
    with pytest.raises(Killed):
        reveal_stage.load_or_decode_arms(job, lambda _: None)
    assert not (tmp_path / "reveal" / "arms.npz").exists()
    monkeypatch.setattr(ArmPool, "to_npz", real_to_npz)
    pool = reveal_stage.load_or_decode_arms(job, lambda _: None)
    again = reveal_stage.load_or_decode_arms(job, lambda _: None)  # read back from the cache, not decoded
    assert len(decoded) == 2 and pool.instructions == again.instructions == decode().instructions
    assert np.array_equal(pool.features, again.features)
