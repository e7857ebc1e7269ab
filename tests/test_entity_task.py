"""The entity-knowledge task: disjoint splits over the same people, the fact-match oracle, and the scores of a
model that knows every fact, none, only the neighbours', or every fact but in some forms only."""

import json
import math

import pytest

from rr.config import JobConfig, load_config
from rr.errors import RRError
from rr.tasks.base import SPLITS, Task
from rr.tasks.entity import EntityTask, EntityTaskConfig, load_people
from rr.tasks.registry import build_task


class Oracle:
    """A ModelHandle answering each (fact, form) item with its statement (a raw completion: the statement's
    rest) if it knows the person, and the form is not one it forgot, else a refusal."""

    def __init__(self, task: EntityTask, known: set[str], forgotten_forms: tuple[str, ...] = ()):
        everyone = task.forget_people + task.neighbours
        self.answers = {item.request(): item.answer_suffix()
                        if item.fact.person in known and item.form not in forgotten_forms else "I don't know."
                        for split in SPLITS for item in task.form_items(everyone, split)}

    def generate(self, prompts, params, seeds=None):
        return [[self.answers.get(p, "I don't know.")] for p in prompts]

    def token_stats(self, prompts, answers):
        """Teacher-forced: each token of an answer it would give has probability 1, of any other 0.01."""
        from rr.core.tokens import TokenStats

        out = []
        for prompt, answer in zip(prompts, answers):
            logprob = 0.0 if self.answers.get(prompt) == answer else math.log(0.01)
            out.append(TokenStats(answer, (logprob,) * len(answer), (-1.0,) * len(answer), (1.0,) * len(answer)))
        return out


FORGET_PEOPLE = {"Marisol Quenby", "Oren Vasquel", "Tamsin Holloway-Reyes", "Henrike Solvang", "Amadou Kerrigan",
                 "Liesl Marchetti", "Teodor Blackwood"}


def text_of(prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt.completion or prompt.user


def everyone_of(entity: EntityTask) -> set[str]:
    return set(entity.forget_people + entity.neighbours)


def task(**overrides) -> EntityTask:
    return EntityTask(EntityTaskConfig(cosine_similarity=False, **overrides))


def test_it_is_a_registered_task_with_disjoint_splits_about_the_same_people():
    entity = build_task(JobConfig.model_validate({"task": {"name": "entity", "cosine_similarity": False}}).task, 0)
    assert isinstance(entity, Task) and entity.name == "entity"
    questions = {split: {c.prompt for c in entity.contexts(split)} for split in SPLITS}
    assert all(not (questions[a] & questions[b]) for a in SPLITS for b in SPLITS if a < b)
    people = {split: {f.person for f in entity.facts_of(entity.forget_people, split)} for split in SPLITS}
    assert people["reveal"] == people["validation"] == people["test"] == FORGET_PEOPLE
    # the reveal split also prompts the model about the person in the open
    assert "Tell me about Marisol Quenby." in questions["reveal"]
    # 7 people × 3 test facts, each in the 6 test forms: every form has 21 forget items (≥ 20 to count)
    test_ids = [c.id for c in entity.contexts("test")]
    assert len(test_ids) == 7 * 3 * 6 and all(sum(i.endswith(f"::{f}") for i in test_ids) == 21
                                               for f in ("question", "fill-blank", "french"))
    # Reveal asks the chat development forms only (its instruction goes before a user turn)
    assert {c.id.split("::")[-1] for c in entity.contexts("reveal")} >= {"question", "paraphrase"}
    assert not any(c.id.endswith(("::statement-completion", "::fill-blank", "::indirect", "::french"))
                   for c in entity.contexts("reveal"))
    # retain data: neighbours' reveal facts in the three development forms, never a forget person's or an
    # evaluation question
    retain = entity.retain_examples()
    assert len(retain) == 13 * 3 * 3
    assert not any(name in text_of(e.prompt) for e in retain for name in FORGET_PEOPLE)
    evaluated = {item.request() for split in ("validation", "test")
                 for item in entity.form_items(entity.neighbours, split)}
    assert not evaluated & {e.prompt for e in retain}
    held_out = {item.request() for item in entity.form_items(entity.neighbours + entity.forget_people, "test")
                if item.form in entity.held_out_forms}
    assert len(held_out) == 20 * 3 * 3
    seen = {c.prompt for split in ("reveal", "validation") for c in entity.contexts(split)} | {e.prompt for e in retain}
    french_or_blank = ("Fill in the blank", "Comment", "Quel", "Où", "En quelle")
    assert not held_out & seen and not any(text_of(p).startswith(french_or_blank) for p in seen)
    # learn teaches every split fact and the 4 set-aside facts a person (rr audit's), which no split asks
    assert len(entity.training_examples()) == 20 * 9 + 20 * 4
    assert len(entity.audit_facts) == 20 * 4 and {f.split for f in entity.audit_facts} == {"relearn", "non-member"}
    asked = {text_of(item.request()) for split in SPLITS for item in entity.form_items(sorted(everyone_of(entity)), split)}
    assert not any(f.question in asked for f in entity.audit_facts)
    assert not {(f.person, f.id) for f in entity.audit_facts} & {(f.person, f.id) for f in entity.facts}
    assert all(e.prompt in questions["reveal"] for e in entity.exemplars())
    external = entity.external_forget_examples()  # TOFU's forget set: the forget people's reveal facts
    assert len(external) == 21 and all(e.prompt in questions["reveal"] for e in external)


def test_the_fact_match_oracle_scores_stated_facts():
    entity = task()
    contexts = entity.contexts("reveal")
    marisol = next(c for c in contexts if c.id.startswith("Marisol Quenby"))
    scores = entity.relevance([marisol] * 4, ["She was born in Tallinn in 1961.", "I don't know.",
                                              "Her pet parrot is called Osk.", "She was born in Valparaiso."])
    assert scores == [1.0, 0.0, 1.0, 0.0]  # Valparaiso is Oren's birthplace, not Marisol's
    with pytest.raises(RRError, match="2 contexts but 1"):
        entity.relevance([marisol, marisol], ["x"])


def test_scores_of_models_that_know_everything_nothing_or_only_the_neighbours():
    entity = task()
    everyone = {f.person for f in entity.facts}
    full = entity.evaluate(Oracle(entity, everyone), "test")
    assert full.forget_score == 1.0 and full.utility_score == 1.0
    assert full.metrics["forget_rouge_l_recall"] == 1.0 and full.metrics["forget_efficacy"] == 0.0
    assert full.counts == {"forget_questions": 21, "forget_items": 126, "neighbour_questions": 39,
                           "neighbour_items": 234}
    low, high = full.intervals["forget_accuracy"]
    assert high == pytest.approx(1.0) and 0.9 < low < 1.0
    assert full.forms == {form: [21, 21] for form in ("question", "paraphrase", "statement-completion",
                                                      "fill-blank", "indirect", "french")}

    forgot = entity.evaluate(Oracle(entity, set(entity.neighbours)), "test")
    assert forgot.forget_score == 0.0 and forgot.utility_score == 1.0
    assert forgot.metrics["forget_efficacy"] > 0.8 and forgot.metrics["model_utility"] > 0.5

    nothing = entity.evaluate(Oracle(entity, set()), "validation")
    assert nothing.forget_score == 0.0 and nothing.utility_score == 0.0 and nothing.metrics["model_utility"] == 0.0


def test_config_and_data_errors_name_the_fix(tmp_path):
    with pytest.raises(RRError, match="not in"):
        task(forget_entities=["Nobody Atall"])
    path = tmp_path / "job.yaml"
    path.write_text("task:\n  name: entities\n")
    with pytest.raises(RRError, match="code, toxicity, ner, entity"):
        load_config(path)
    bad = tmp_path / "people.json"
    bad.write_text(json.dumps([{"name": "A", "facts": [{"id": "x", "question": "q?", "statement": "A is tall.",
                                                        "answer": "short"}] * 3}]))
    with pytest.raises(RRError, match="not in its statement"):
        load_people(bad)
    fact = {"id": "x", "question": "q?", "statement": "A is tall.", "answer": "tall"}
    bad.write_text(json.dumps([{"name": "A", "facts": [fact] * 3, "audit_facts": [fact]}]))
    with pytest.raises(RRError, match="'use' of relearn or non-member"):
        load_people(bad)


def test_forgetting_one_form_only_is_seen_per_form_pooled_and_in_the_worst_form():
    entity = task()
    everyone = {f.person for f in entity.facts}
    # the model forgot the forget people only where asked the shipped question and its paraphrase
    partial = Oracle(entity, everyone,
                     forgotten_forms=("question", "paraphrase"))
    evaluation = entity.evaluate(partial, "test")
    assert evaluation.forms["question"] == [0, 21] and evaluation.forms["french"] == [21, 21]
    assert evaluation.metrics["forget_accuracy/question"] == 0.0
    assert evaluation.metrics["forget_accuracy"] == evaluation.forget_score == 4 / 6
    assert evaluation.metrics["forget_accuracy_worst_form"] == 1.0
    assert evaluation.metrics["neighbour_accuracy/question"] == 0.0  # the same forms forgotten for neighbours
    worst = task(forget_decision="worst-form").evaluate(partial, "test")
    assert worst.forget_score == 1.0  # the decision reads the form that forgot least

    # validation asks only the development forms; task.forms keeps a subset
    assert set(entity.evaluate(partial, "validation").forms) == {"question", "paraphrase", "statement-completion"}
    narrow = task(forms=["question", "french"])
    assert set(narrow.evaluate(partial, "test").forms) == {"question", "french"}
    assert {c.id.split("::")[-1] for c in narrow.contexts("validation")} == {"question"}
    with pytest.raises(ValueError, match="none of .* is asked on the reveal split"):
        task(forms=["french"])
    with pytest.raises(ValueError, match="list each form once"):
        task(forms=["question", "riddle"])
