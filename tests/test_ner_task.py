"""The NER task: UniversalNER prompts, list parsing, splits, F1 per type, relevance, config errors."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from rr.errors import RRError
from rr.generation.base import request_seed
from rr.tasks.base import SPLITS, Task
from rr.tasks.ner import (ENTITY_TYPES, SHIPPED_PASSAGES, NerTask, NerTaskConfig, load_passages, ner_prompt,
                          parse_entity_list)
from rr.tasks.oracles import GazetteerNerOracle
from rr.tasks.registry import build_task


class FakeModel:
    """A ModelHandle answering each prompt with answer(prompt); records what it was asked."""

    def __init__(self, answer):
        self.answer = answer
        self.calls = []

    def generate(self, prompts, params, seeds=None):
        self.calls.append((list(prompts), params, list(seeds)))
        return [[self.answer(p)] * params.n for p in prompts]

    def perplexity(self, texts):
        raise AssertionError("the NER task does not use perplexity")


def _passage(i, person, location):
    text = f"Story {i}: " + " and ".join(person) + " went to " + " and ".join(location) + "."
    return {"id": f"s{i}", "text": text, "entities": {"Person": person, "Location": location}}


@pytest.fixture
def small_task(tmp_path):
    rows = [_passage(i, [f"Person{i} Lee"], [f"Town{i}"]) for i in range(1, 4)]
    rows += [_passage(10, ["Ann Lee", "Bo Chen"], ["Paris"]), _passage(11, ["Cy Diaz"], ["Rome", "Oslo"])]
    path = tmp_path / "passages.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = NerTaskConfig(passages=str(path), retain_types=["Location"], n_validation=1, n_test=2, split_seed=0)
    task = NerTask(config, seed=3)
    # Move the two hand-checked passages into test whatever the shuffle did.
    everything = {p.id: p for split in SPLITS for p in task.passages(split)}
    task.splits = {"test": [everything["s10"], everything["s11"]], "validation": [everything["s1"]],
                   "reveal": [everything["s2"], everything["s3"]]}
    return task


def test_prompt_follows_the_universalner_format():
    prompt = ner_prompt("Person", "Nels Carlson runs the fishery.")
    assert prompt.startswith("What describes Person in the text? Identify any Person entities mentioned in the "
                             'text and respond ONLY with a list in the exact format: ["Entity1", "Entity2"]. '
                             "If no Person entities are mentioned, respond only with an empty list: [].")
    assert prompt.endswith("\n\nText: Nels Carlson runs the fishery.")


@pytest.mark.parametrize("text, expected", [
    ('["Nels Carlson", "Joe Campo"]', ["Nels Carlson", "Joe Campo"]),
    ("Sure! ['Nels Carlson', 'Joe Campo']", ["Nels Carlson", "Joe Campo"]),
    ("[Nels Carlson, Joe Campo]", ["Nels Carlson", "Joe Campo"]),
    ('```json\n["Leland"]\n```', ["Leland"]),
    ("[]", []),
    ('["A", "A", " "]', ["A"]),
    ('["Nels Carlson", "Joe Ca', ["Nels Carlson"]),  # cut off by the token limit
    ('[["Ana", "Person"]]', ["Ana"]),
    ("There are no people in this text.", None),
])
def test_parse_entity_list(text, expected):
    assert parse_entity_list(text) == expected


def test_shipped_passages_split_disjointly_with_every_type_in_every_split():
    task = NerTask(NerTaskConfig(), seed=0)
    assert isinstance(task, Task)
    passages = load_passages(SHIPPED_PASSAGES)
    assert len(passages) >= 150
    ids = {split: {p.id for p in task.passages(split)} for split in SPLITS}
    assert not ids["reveal"] & ids["validation"] and not ids["reveal"] & ids["test"]
    assert not ids["validation"] & ids["test"]
    assert set().union(*ids.values()) == {p.id for p in passages}
    assert (len(ids["validation"]), len(ids["test"])) == (30, 50)
    for split in SPLITS:
        for entity_type in ENTITY_TYPES:
            assert any(p.gold(entity_type) for p in task.passages(split)), (split, entity_type)
        contexts = task.contexts(split)
        assert all(c.id.endswith("::Person") and "What describes Person" in c.prompt for c in contexts)


def test_exemplars_and_retain_examples_come_from_reveal_only():
    task = NerTask(NerTaskConfig(), seed=0)
    reveal_texts = {p.text for p in task.passages("reveal")}
    exemplars = task.exemplars()
    assert len(exemplars) == 4
    for example in exemplars:
        assert "What describes Person" in example.prompt and example.prompt.split("Text: ", 1)[1] in reveal_texts
        assert json.loads(example.response)
    retain = task.retain_examples()
    assert len(retain) == 4 * len(reveal_texts)
    for example in retain:
        assert "Person" not in example.prompt.split("\n\n")[0]
        assert example.prompt.split("Text: ", 1)[1] in reveal_texts
        assert isinstance(json.loads(example.response), list)


def test_evaluate_computes_f1_per_type_for_canned_outputs(small_task):
    answers = {("Story 10", "Person"): '["Ann Lee", "Paris"]', ("Story 10", "Location"): '["Paris"]',
               ("Story 11", "Person"): "I found no people.", ("Story 11", "Location"): "['rome']"}

    def answer(prompt):
        entity_type = prompt.split()[2]
        story = prompt.split("Text: ", 1)[1].split(":")[0]
        return answers[(story, entity_type)]

    model = FakeModel(answer)
    result = small_task.evaluate(model, "test")
    # Person: tp 1 (Ann Lee), fp 1 (Paris), fn 2 (Bo Chen, Cy Diaz) → P 1/2, R 1/3, F1 0.4
    # Location: tp 2 (Paris, rome~Rome), fp 0, fn 1 (Oslo) → P 1, R 2/3, F1 0.8
    assert result.metrics["f1/Person"] == pytest.approx(0.4)
    assert result.metrics["f1/Location"] == pytest.approx(0.8)
    assert result.forget_score == pytest.approx(0.4) and result.utility_score == pytest.approx(0.8)
    assert result.metrics["unparsed_rate"] == pytest.approx(0.25) and result.counts["unparsed"] == 1
    assert result.counts["gold/Person"] == 3 and result.counts["passages"] == 2
    (prompts, params, seeds), = model.calls
    assert len(prompts) == 4 and params.temperature == 0.0 and params.n == 1
    assert seeds[0] == request_seed(3, "ner-eval", "s10::Person")


def test_relevance_counts_forget_type_entities_by_gold_then_gazetteer(small_task):
    contexts = small_task.contexts("reveal")
    story2, story3 = small_task.passages("reveal")
    person2, town2 = story2.gold("Person")[0], story2.gold("Location")[0]
    scores = small_task.relevance([contexts[0]] * 4 + [contexts[1]], [
        json.dumps([person2, town2]),          # gold Person + gold Location → 1/2
        json.dumps([town2, "Maria Gonzalez"]),  # not gold: the gazetteer knows the name → 1/2
        "[]",
        "No list here",
        json.dumps([story3.gold("Person")[0]]),
    ])
    assert scores == [0.5, 0.5, 0.0, 0.0, 1.0]
    with pytest.raises(RRError, match="relevance"):
        small_task.relevance(contexts[:1], [])


def test_gazetteer_standin_types_entities():
    oracle = GazetteerNerOracle({"Concept": ["democracy"]})
    assert "STAND-IN" in GazetteerNerOracle.__doc__ and oracle.name == "gazetteer-standin"
    assert oracle.entity_type("Nels Carlson") == "Person"
    assert oracle.entity_type("Dr. Wright") == "Person"
    assert oracle.entity_type("Carlson's Fishery") == "Organization"
    assert oracle.entity_type("Hudson River") == "Location"
    assert oracle.entity_type("March 3, 2015") == "Date"
    assert oracle.entity_type("Democracy") == "Concept"
    assert oracle.entity_type("xyzzy") is None
    assert oracle.fraction_of_type(["Nels Carlson", "Paris", "Emma"], ["Person"]) == pytest.approx(2 / 3)
    assert oracle.fraction_of_type([], ["Person"]) == 0.0


def test_registry_builds_the_ner_task():
    assert build_task(NerTaskConfig(), seed=0).name == "ner"


@pytest.mark.parametrize("kwargs, field", [
    ({"forget_types": []}, "forget_types"),
    ({"retain_types": ["Person", "Date"]}, "overlap"),
    ({"retain_types": ["Date", "Date"]}, "retain_types"),
    ({"n_test": 0}, "n_test"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"oracle": "spacy"}, "oracle"),
    ({"forget_type": ["Person"]}, "forget_type"),
])
def test_bad_config_values_fail_naming_the_field(kwargs, field):
    with pytest.raises(ValidationError, match=field):
        NerTaskConfig(**kwargs)


def test_a_type_absent_from_the_data_is_refused():
    with pytest.raises(RRError, match=r"task\.forget_types.*'Persons'"):
        NerTask(NerTaskConfig(forget_types=["Persons"]), seed=0)


def test_bad_passage_files_name_the_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"id": "a", "text": "Ann went home.", "entities": {"Person": ["Bob"]}}) + "\n")
    with pytest.raises(RRError, match=r"bad\.jsonl:1.*entities\.Person.*Bob"):
        load_passages(path)
    path.write_text(json.dumps({"id": "a", "text": "Ann went home.", "entities": ["Ann"]}) + "\n")
    with pytest.raises(RRError, match=r"bad\.jsonl:1.*'entities'"):
        load_passages(path)
    with pytest.raises(RRError, match="task.passages"):
        load_passages(tmp_path / "missing.jsonl")
