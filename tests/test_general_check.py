"""The general check: shipped instructions load and their rules judge answers as written; arithmetic items are
asked in wordings no split or retain example uses; the code task reports it on the test split, and on the
validation split only with instructions of its own (no item shared with the test split's)."""

from __future__ import annotations

import re

import pytest

from rr.errors import RRError
from rr.release.general_retain import load_general_prompts
from rr.tasks.arithmetic import ANSWER_INSTRUCTION, ArithmeticItem
from rr.tasks.code import CodeTask, CodeTaskConfig
from rr.tasks.general_check import (INSTRUCTIONS, TUTOR_SYSTEM, arithmetic_check_items, load_instruction_items,
                                    run_general_check)


class TableModel:
    def __init__(self, answers: dict, default: str = "I do not know."):
        self.answers, self.default, self.asked = answers, default, []

    def generate(self, prompts, params, seeds=None):
        self.asked.extend(prompts)
        return [[self.answers.get(p, self.default)] for p in prompts]

    def perplexity(self, texts):
        return 10.0


def test_shipped_instructions_load_and_are_not_retain_prompts():
    items = load_instruction_items()
    assert len(items) == 40 and len({i.prompt.user for i in items}) == 40
    assert not {i.prompt.user for i in items} & set(load_general_prompts())


def test_validation_instructions_are_their_own_forty_and_neither_test_nor_retain_prompts():
    validation, test = load_instruction_items(INSTRUCTIONS["validation"]), load_instruction_items(INSTRUCTIONS["test"])
    asked = {i.prompt.user for i in validation}
    assert len(validation) == 40 and len(asked) == 40
    assert not asked & {i.prompt.user for i in test} and not asked & set(load_general_prompts())
    # Nothing the forget task or the arithmetic utility asks: the check measures what neither trains.
    assert not any(word in text.lower() for text in asked for word in ("python", "function", "code", "how many more"))


@pytest.mark.parametrize("prompt_start, good, bad", [
    ("What is the capital of France", "Paris.", "Lyon."),
    ("Reply with the single word YES", "YES", "yes"),
    ("List three fruits", "apple\npear\nplum", "apple, pear, plum"),
    ("Give three tips for staying warm", "1. hat\n2. coat\n3. tea", "Wear a hat and a coat."),
    ("Spell the word 'cat' backwards", "tac", "attack"),
    ("What is the chemical symbol for gold", "Au", "It is aurum, from Latin."),
])
def test_rules_judge_answers_as_written(prompt_start, good, bad):
    item = next(i for i in load_instruction_items() if i.prompt.user.startswith(prompt_start))
    assert item.judge(good) and not item.judge(bad)


@pytest.mark.parametrize("path, prompt_start, correct_sentence, both", [
    (INSTRUCTIONS["test"], "Is a tomato usually red or blue", "A ripe tomato is usually red.", "Red or blue."),
    (INSTRUCTIONS["test"], "Which is bigger, an elephant", "The elephant is the bigger one.", "Elephant, mouse"),
    (INSTRUCTIONS["validation"], "Does a lemon taste sweet or sour", "A lemon tastes sour.", "Sweet and sour."),
    (INSTRUCTIONS["validation"], "Which is faster, a cheetah", "The cheetah is faster.", "A cheetah or a snail."),
])
def test_comparison_instructions_fail_an_answer_that_names_both_options(path, prompt_start, correct_sentence, both):
    """"Red or blue? One word": naming both options hedges, whatever order they come in; the right option in a
    full sentence is still an answer. (The "a few words" comparisons keep no such rule: "a kilogram of iron is
    heavier than a gram of feathers" names both and is right.)"""
    item = next(i for i in load_instruction_items(path) if i.prompt.user.startswith(prompt_start))
    assert item.judge(correct_sentence) and not item.judge(both)


def test_no_instruction_passes_an_answer_that_repeats_it():
    """An echo is not an answer: each instruction's rule fails its own prompt, and its first sentence, repeated."""
    for path in INSTRUCTIONS.values():
        for item in load_instruction_items(path):
            first = re.split(r"(?<=[.?!])\s", item.prompt.user, maxsplit=1)[0]
            assert not item.judge(item.prompt.user) and not item.judge(f"Sure! {first.upper()}"), item.prompt.user


@pytest.mark.parametrize("path, prompt_start, good, bad", [
    ("test", "Write a greeting you could use in an email", "Hi Sam, I hope you are well.",
     "I hope this finds you well."),
    ("validation", "Write a short goodbye you could put", "Goodbye for now, my friend!", "Goodness, what a week."),
    ("test", "Write a sentence that contains the word 'umbrella'", "I forgot my umbrella at home.",
     "Write a sentence that contains the word umbrella"),
])
def test_word_rules_match_whole_words_and_echoes_fail(path, prompt_start, good, bad):
    item = next(i for i in load_instruction_items(INSTRUCTIONS[path]) if i.prompt.user.startswith(prompt_start))
    assert item.judge(good) and not item.judge(bad)


def test_malformed_rows_are_refused_with_the_line(tmp_path):
    for text, message in (('{"prompt": "hi"}\n', ":1: expected"), ('not json\n', ":1: not JSON"),
                          ('{"prompt": "hi", "rule": {"regex": "("}}\n', ":1: rule regex"),
                          ('{"prompt": "hi", "rule": {"exact": "x"}}\n', ":1: expected")):
        path = tmp_path / "check.jsonl"
        path.write_text(text)
        with pytest.raises(RRError, match=message):
            load_instruction_items(path)


def test_arithmetic_is_asked_without_the_answer_instruction_and_judged_on_the_number():
    items = arithmetic_check_items([ArithmeticItem("Ann has 2 pens and buys 3 more. How many pens now?", 5, "…")])
    tutor, raw = items
    assert tutor.prompt.system == TUTOR_SYSTEM and ANSWER_INSTRUCTION not in tutor.prompt.user
    assert raw.prompt.is_completion and raw.prompt.completion.endswith("The answer is")
    model = TableModel({tutor.prompt: "2 + 3 = 5, so the answer is 5.", raw.prompt: " 5."})
    metrics, intervals, counts = run_general_check(model, items, 32)
    assert metrics == {"general_check": 1.0, "general_check_arithmetic": 1.0}
    assert counts["general_check_arithmetic_items"] == 2 and intervals["general_check"][1] == pytest.approx(1.0)
    wrong = run_general_check(TableModel({}, default="seven"), items, 32)[0]
    assert wrong["general_check"] == 0.0


def test_code_task_reports_the_general_check_on_the_test_split_and_validation_only_when_asked():
    config = CodeTaskConfig(n_reveal_contexts=3, n_validation=2, n_test=2, n_arithmetic_validation=2,
                            n_arithmetic_test=3, n_retain_examples=4, n_perplexity_paragraphs=1,
                            min_validation_items_per_form=1, min_test_items_per_form=1,
                            n_general_check_instructions=4, n_general_check_arithmetic=2)
    task = CodeTask(config, seed=0)
    model = TableModel({})
    assert "general_check" not in task.evaluate(model, "validation").metrics
    result = task.evaluate(model, "test")
    assert result.counts["general_check_items"] == 4 + 2 * 2
    assert result.counts["general_check_instructions_items"] == 4
    with pytest.raises(RRError, match="n_general_check_instructions"):
        CodeTask(config.model_copy(update={"n_general_check_instructions": 41}), seed=0)
    # With n_general_check_validation the validation split asks its own instructions (and no arithmetic wording).
    model = TableModel({})
    task = CodeTask(config.model_copy(update={"n_general_check_validation": 3}), seed=0)
    validation = task.evaluate(model, "validation")
    assert validation.counts["general_check_items"] == validation.counts["general_check_instructions_items"] == 3
    own = [i.prompt for i in load_instruction_items(INSTRUCTIONS["validation"])[:3]]
    assert all(p in model.asked for p in own)
    assert not {i.prompt for i in load_instruction_items(INSTRUCTIONS["test"])} & set(model.asked)
    with pytest.raises(RRError, match="n_general_check_validation"):
        CodeTask(config.model_copy(update={"n_general_check_validation": 41}), seed=0)
