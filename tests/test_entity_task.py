"""The entity-knowledge task: disjoint splits over the same people, the fact-match oracle, and the scores of a
model that knows every fact, none, or only the neighbours'."""

import json

import pytest

from rr.config import JobConfig, load_config
from rr.errors import RRError
from rr.tasks.base import SPLITS, Task
from rr.tasks.entity import EntityTask, EntityTaskConfig, load_people
from rr.tasks.registry import build_task


class Oracle:
    """A ModelHandle answering each question with its statement if it knows the person, else a refusal."""

    def __init__(self, task: EntityTask, known: set[str]):
        self.answers = {f.question: f.statement if f.person in known else "I don't know." for f in task.facts}

    def generate(self, prompts, params, seeds=None):
        return [[self.answers.get(p, "I don't know.")] for p in prompts]


def task(**overrides) -> EntityTask:
    return EntityTask(EntityTaskConfig(cosine_similarity=False, **overrides))


def test_it_is_a_registered_task_with_disjoint_splits_about_the_same_people():
    entity = build_task(JobConfig.model_validate({"task": {"name": "entity", "cosine_similarity": False}}).task, 0)
    assert isinstance(entity, Task) and entity.name == "entity"
    questions = {split: {c.prompt for c in entity.contexts(split)} for split in SPLITS}
    assert all(not (questions[a] & questions[b]) for a in SPLITS for b in SPLITS if a < b)
    people = {split: {f.person for f in entity.facts_of(entity.forget_people, split)} for split in SPLITS}
    assert people["reveal"] == people["validation"] == people["test"] == {"Marisol Quenby", "Oren Vasquel"}
    # the reveal split also prompts the model about the person in the open
    assert "Tell me about Marisol Quenby." in questions["reveal"]
    assert len(entity.contexts("test")) == 6  # 2 people × 3 test facts
    # retain data: neighbours' reveal facts only, never a forget person's or an evaluation question
    retain = entity.retain_examples()
    assert len(retain) == 6 * 3 and not any("Marisol" in e.prompt or "Oren" in e.prompt for e in retain)
    evaluated = {f.question for split in ("validation", "test") for f in entity.facts_of(entity.neighbours, split)}
    assert not evaluated & {e.prompt for e in retain}
    assert len(entity.training_examples()) == 8 * 9
    assert all(e.prompt in questions["reveal"] for e in entity.exemplars())
    external = entity.external_forget_examples()  # TOFU's forget set: the forget people's reveal facts
    assert len(external) == 6 and all(e.prompt in questions["reveal"] for e in external)


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
    assert full.counts == {"forget_questions": 6, "neighbour_questions": 18}
    assert full.intervals["forget_accuracy"][1] == 1.0 and full.intervals["forget_accuracy"][0] < 0.7

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
