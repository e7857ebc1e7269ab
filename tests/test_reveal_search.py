"""Algorithm 1 with fake generator, oracle and embedder: scoring, forget-set growth and resume after a kill."""

import json

import numpy as np
import pytest

from rr.config import RevealConfig
from rr.reveal.arms import ArmPool, exemplar_views, extract_instruction, project_to_embeddings
from rr.reveal.search import RevealCheckpoint, RevealSearch, harmonic_score
from rr.tasks.base import Context

INSTRUCTIONS = ["The instruction was to write code.", "The instruction was to say hello.",
                "The instruction was to write a function.", "The instruction was to count.",
                "The instruction was to write code."]  # arms 0 and 4 decode to the same text


class FakeTask:
    answer_stop: tuple[str, ...] = ()

    def contexts(self, split):
        return [Context(f"c{i}", f"problem {i}") for i in range(6)]

    def relevance(self, contexts, responses):
        return [1.0 if "def" in r else 0.1 for r in responses]


def fake_generate(prompts, params, seeds):
    # Answers depend on the instruction and the context: code for "code"/"function" instructions.
    out = []
    for prompt, seed in zip(prompts, seeds):
        code = "code" in prompt or "function" in prompt
        out.append([f"def f_{seed % 97}(): pass  # {prompt[-9:]}" if code else f"hello {seed % 13}"] * params.n)
    return out


def fake_embed(texts):
    rng_rows = []
    for t in texts:
        rng = np.random.default_rng(abs(hash(t)) % (2**32))
        rng_rows.append(rng.standard_normal(16))
    matrix = np.array(rng_rows, dtype=np.float32)
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def make_search(tmp_path, calls=None, progress=lambda message: None, log_forget_examples=False, **overrides):
    config = RevealConfig(n_arms=5, outer_loops=2, inner_rounds=3, arms_per_round=2, initial_random_arms=2,
                          context_sample=3, warm_start_top_k=2, ucb_train_steps=10, **overrides)
    arms = ArmPool(np.zeros((5, 2)), INSTRUCTIONS, np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32))

    def generate(prompts, params, seeds):
        if calls is not None:
            calls.append(len(prompts))
        return fake_generate(prompts, params, seeds)

    return RevealSearch(config, FakeTask(), arms, generate, fake_embed, RevealCheckpoint(tmp_path), seed=0,
                        progress=progress, log_forget_examples=log_forget_examples)


def test_harmonic_score():
    assert harmonic_score(1.0, 1.0, 0.5) == pytest.approx(1.0)
    assert harmonic_score(0.5, 0.5, 0.3) == pytest.approx(0.5)
    assert harmonic_score(0.0, 0.9, 0.5) == 0.0 and harmonic_score(0.9, 0.0, 0.5) == 0.0
    # α weights diversity: with α=1 only diversity counts.
    assert harmonic_score(0.2, 0.8, 1.0) == pytest.approx(0.8)
    assert harmonic_score(0.2, 0.8, 0.0) == pytest.approx(0.2)


def test_extract_instruction_keeps_first_sentence():
    assert extract_instruction(" write a function. Then more text") == "The instruction was to write a function."


def test_exemplar_views_are_distinct_orders_and_subsets_starting_with_all():
    views = exemplar_views(3, 12, seed=0)
    assert views[0] == (0, 1, 2)
    assert len(views) == len(set(views)) == 12  # 3 pairs × 2 orders + 6 orders of all three
    assert all(len(v) >= 2 and len(set(v)) == len(v) and set(v) <= {0, 1, 2} for v in views)
    assert exemplar_views(3, 50, seed=0) == exemplar_views(3, 50, seed=0)
    assert len(exemplar_views(3, 50, seed=0)) == 12  # no more exist
    assert exemplar_views(1, 4, seed=0) == [(0,)]
    assert exemplar_views(3, 1, seed=5) == [(0, 1, 2)]


def test_projection_matches_embedding_statistics():
    table = np.random.default_rng(1).normal(0.02, 0.05, size=(500, 32))
    soft = project_to_embeddings(np.random.default_rng(2).random((64, 10)), 5, table, seed=0)
    assert soft.shape == (64, 5, 32)
    assert abs(soft.std() - table.std()) < 0.3 * table.std()
    assert abs(soft.mean() - table.mean()) < 0.01


def test_search_collects_relevant_answers_and_never_rescores_an_instruction(tmp_path):
    messages = []
    state, records = make_search(tmp_path, progress=messages.append).run()
    # The model being unlearned wrote the instructions (they can state forget data): progress shows hashes only.
    assert any("P* = instruction sha256" in m for m in messages)
    assert not any(i in m for i in INSTRUCTIONS for m in messages)
    assert state.finished and len(state.best_instructions) == 2
    for loop in range(2):
        scored = [e.instruction for e in state.evaluations if e.outer_loop == loop]
        assert len(scored) == len(set(scored)), "an instruction text was scored twice in one outer loop"
    # The best instruction produces code (relevance 1) whenever one of those was found.
    assert all("code" in i or "function" in i for i in state.best_instructions)
    assert len(records) == 2 * 6 and all(r["relevance"] == 1.0 for r in records)
    assert {r["context_id"] for r in records} == {f"c{i}" for i in range(6)}
    manifest_fields = {"context_id", "instruction", "response", "relevance", "outer_loop", "seed"}
    assert manifest_fields <= set(records[0])


def test_log_forget_examples_prints_p_star_and_its_records_in_full(tmp_path):
    messages = []
    _, records = make_search(tmp_path, progress=messages.append, log_forget_examples=True).run()
    assert any("P* in full" in m and any(i in m for i in INSTRUCTIONS) for m in messages)
    assert all(any(repr(r["response"]) in m for m in messages) for r in records)


def test_killed_search_resumes_without_recomputing(tmp_path):
    full_state, full_records = make_search(tmp_path / "full").run()

    class Killed(Exception):
        pass

    calls = []
    search = make_search(tmp_path / "killed", calls)
    original = search.evaluate_arms

    def dying(*args, **kwargs):
        if len(calls) >= 3:
            raise Killed()
        return original(*args, **kwargs)

    search.evaluate_arms = dying
    with pytest.raises(Killed):
        search.run()
    saved = json.loads((tmp_path / "killed" / "state.json").read_text())
    assert saved["round"] == 3 or saved["outer_loop"] >= 1
    done_before = len(saved["evaluations"])

    resumed_calls = []
    state, records = make_search(tmp_path / "killed", resumed_calls).run()
    assert [e.instruction for e in state.evaluations[:done_before]] == [e["instruction"] for e in saved["evaluations"]]
    assert [(e.arm, e.score) for e in state.evaluations] == pytest.approx([(e.arm, e.score) for e in full_state.evaluations])
    assert [r["response"] for r in records] == [r["response"] for r in full_records]
    assert sum(resumed_calls) < sum(calls) + sum(resumed_calls)  # the resumed run did not start over
    assert len(resumed_calls) < 2 * 3 + 2  # fewer generate calls than a full run (6 rounds + 2 collections)


def test_answers_are_asked_to_stop_where_the_task_says_answers_end(tmp_path):
    from rr.reveal.arms import SENTENCE_ENDS
    from rr.tasks.code import CodeTask
    from rr.tasks.code_problems import CODE_STOP

    class FencedTask(FakeTask):
        answer_stop = CODE_STOP

    seen = []
    config = RevealConfig(n_arms=5, outer_loops=1, inner_rounds=1, arms_per_round=1, initial_random_arms=1,
                          context_sample=2, ucb_train_steps=1)
    arms = ArmPool(np.zeros((5, 2)), INSTRUCTIONS, np.zeros((5, 4), dtype=np.float32))
    search = RevealSearch(config, FencedTask(), arms, lambda p, params, s: seen.append(params.stop) or
                          fake_generate(p, params, s), fake_embed, RevealCheckpoint(tmp_path), seed=0)
    search.run()
    assert seen and all(stop == CODE_STOP for stop in seen)
    assert CodeTask.answer_stop == CODE_STOP and FakeTask.answer_stop == ()
    # Instructions keep their first sentence only, so arm decoding may stop at any sentence end.
    assert extract_instruction(" write code.\nMore") == "The instruction was to write code."
    assert all(end[0] in ".!?" and end[1].isspace() for end in SENTENCE_ENDS)


def test_finalists_scored_on_every_context_choose_p_star(tmp_path):
    """The inner rounds rank "write code." first, but on every context its answers are code for only half of
    them: with finalists=2 the runner-up, code everywhere, becomes P* and its answers the records."""
    from rr.reveal.diversity import RunningGram
    from rr.reveal.search import ArmEvaluation, RevealState

    def generate(prompts, params, seeds):
        return [["hello" if "write code" in p and int(p[-1]) % 2 else f"def f{p[-1]}(): pass"] * params.n
                for p in prompts]

    candidates = [ArmEvaluation(0, INSTRUCTIONS[0], 1.0, 0.9, 0.95, 0, 0),
                  ArmEvaluation(2, INSTRUCTIONS[2], 1.0, 0.8, 0.89, 0, 1),
                  ArmEvaluation(1, INSTRUCTIONS[1], 0.1, 0.9, 0.18, 0, 1)]
    chosen = {}
    for finalists in (1, 2):
        search = make_search(tmp_path / str(finalists), finalists=finalists)
        search.generate = generate
        state = RevealState()
        best, records = search._collect(candidates, RunningGram(16), state)
        chosen[finalists] = best.instruction
        assert len(records) == 6 and {r["instruction"] for r in records} == {best.instruction}
        assert len(state.finals) == (0 if finalists == 1 else 2)
    assert chosen == {1: INSTRUCTIONS[0], 2: INSTRUCTIONS[2]}
    assert [f.relevance for f in state.finals] == pytest.approx([0.55, 1.0])
    assert max(state.finals, key=lambda f: f.score).instruction == INSTRUCTIONS[2]


def test_replicas_are_sized_for_the_largest_reveal_call():
    from rr.reveal.search import largest_generate_call

    quickstart_like = RevealConfig(arms_per_round=4, context_sample=8, finalists=3, samples_per_context=2)
    assert largest_generate_call(quickstart_like, 40) == 3 * 40 * 2  # the finalists on every context
    assert largest_generate_call(RevealConfig(arms_per_round=8, context_sample=8), 40) == 8 * 8  # a round
    assert largest_generate_call(RevealConfig(arms_per_round=8, context_sample=8), 4) == 8 * 4  # sample ≤ contexts


def test_shared_reveal_outputs_hold_instruction_hashes_and_an_older_manifest_shares_the_manifest_alone(tmp_path):
    from rr.reveal.search import instruction_label
    from rr.reveal.stage import write_redacted

    secret = INSTRUCTIONS[0]
    manifest = {"size": 1, "sha256": "ab" * 32, "arms_scored": 2, "mean_relevance": 0.5, "vendi_score": 1.0,
                "filtered_by_relevance": False, "instructions": [secret],
                "finalists": [{"outer_loop": 0, "relevance": 1.0, "diversity": 0.5, "score": 0.7, "instruction": secret}],
                "records": [{"context_id": "c0", "instruction": secret}],
                "comparison": {"contexts": 6, "samples_per_context": 1, "best_instruction": secret,
                               "best_instruction_mean_relevance": 1.0, "plain_answers_mean_relevance": 0.1,
                               "relevance_at_least_plain": True, "n_for_vendi": 6, "fixed_instruction": secret,
                               "fixed_instruction_temperature": 0.0, "forget_set_vendi_subsampled": 2.0,
                               "fixed_instruction_vendi": 1.5, "plain_answers_vendi": 1.2}}
    paths = write_redacted(tmp_path, manifest)
    assert [p.name for p in paths] == ["manifest.json", "report.md"]
    for path in paths:
        assert secret not in path.read_text() and instruction_label(secret) in path.read_text()
    older = {**manifest, "comparison": {k: v for k, v in manifest["comparison"].items()
                                        if not k.startswith("fixed_instruction")}}  # as rr wrote it before
    (tmp_path / "reveal" / "redacted" / "report.md").unlink()
    paths = write_redacted(tmp_path, older)
    assert [p.name for p in paths] == ["manifest.json"] and secret not in paths[0].read_text()
