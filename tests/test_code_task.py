"""The code task: embedded data, splits, arithmetic, relevance oracle, evaluation and dataset loaders."""

from __future__ import annotations

import re
import subprocess
import sys
from fractions import Fraction

import pytest
from pydantic import ValidationError

from rr.errors import RRError
from rr.tasks.arithmetic import (ANSWER_INSTRUCTION, arithmetic_prompt, extract_answer,
                                 generate_arithmetic_splits, is_correct)
from rr.tasks.base import SPLITS, Task
from rr.core.prompt import as_prompt
from rr.tasks.code import CodeTask, CodeTaskConfig
from rr.tasks.code_forms import FORMS_BY_SPLIT
from rr.tasks.code_problems import (VALIDATION_GENERAL_TEXT, CodeProblem, check_program, code_likeness, code_prompt,
                                    extract_code, load_builtin_problems, load_perplexity_paragraphs)
from rr.tasks.loaders import gsm8k_row_to_item, load_gsm8k, mbpp_plus_row_to_problem, mbpp_row_to_problem
from rr.tasks.registry import build_task
from rr.tasks.sandbox import run_many

SMALL = dict(n_reveal_contexts=6, n_validation=4, n_test=8, n_arithmetic_validation=10, n_arithmetic_test=12,
             n_retain_examples=20, n_perplexity_paragraphs=5)


# ---- embedded data ------------------------------------------------------------------------

def test_builtin_problems_are_well_formed():
    problems = load_builtin_problems()
    assert len(problems) >= 110
    assert len({p.id for p in problems}) == len(problems)
    assert len({p.entry_point for p in problems}) == len(problems)
    for p in problems:
        assert len(p.tests) == 3 and all(t.startswith("assert ") for t in p.tests), p.id
        assert f"`{p.entry_point}(" in p.prompt, p.id


def test_every_reference_solution_passes_its_own_tests_in_the_sandbox():
    problems = load_builtin_problems()
    results = run_many([(p.reference_solution, check_program(p)) for p in problems], max_workers=2)
    failures = {p.id: r.detail for p, r in zip(problems, results) if not r.passed}
    assert failures == {}


def test_tests_are_not_vacuous():
    # A stub with the right name must fail: run in-process, it is our own code, not a model's.
    for p in load_builtin_problems():
        namespace: dict = {}
        exec(f"def {p.entry_point}(*args, **kwargs):\n    return None\n", namespace)
        with pytest.raises(Exception):
            exec(check_program(p), namespace)


def test_general_text_is_plain_prose():
    paragraphs = load_perplexity_paragraphs()
    assert len(paragraphs) >= 40
    assert sum(len(p.split()) for p in paragraphs) >= 3000
    assert all(code_likeness(p) == 0.0 and "```" not in p for p in paragraphs)


# ---- splits -------------------------------------------------------------------------------

def test_splits_are_disjoint_and_sized_as_configured():
    task = CodeTask(CodeTaskConfig(), seed=0)
    sizes = {"reveal": 40, "validation": 20, "test": 40}
    ids = {split: {p.id for p in task.problems(split)} for split in SPLITS}
    assert {split: len(ids[split]) for split in SPLITS} == sizes
    assert not (ids["reveal"] & ids["validation"] or ids["reveal"] & ids["test"] or ids["validation"] & ids["test"])
    # each problem is asked in several forms: the items of a split are (problem, form) pairs of its problems
    for split in SPLITS:
        items = task.form_items(split)
        assert {item.problem.id for item in items} == ids[split]
        assert len({item.id for item in items}) == len(items)
    assert [c.id for c in task.contexts("reveal")] == [item.id for item in task.form_items("reveal")]

    questions = {split: {i.question for i in task.arithmetic_items(split)} for split in ("validation", "test")}
    retain = {as_prompt(e.prompt).user.removesuffix("\n" + ANSWER_INSTRUCTION) for e in task.retain_examples()}
    assert (len(questions["validation"]), len(questions["test"]), len(retain)) == (60, 200, 200)
    assert not questions["validation"] & questions["test"]
    assert not retain & (questions["validation"] | questions["test"])


def test_splits_follow_the_seed():
    first, again, other = (CodeTask(CodeTaskConfig(**SMALL), seed=s) for s in (1, 1, 2))
    assert [c.id for c in first.contexts("test")] == [c.id for c in again.contexts("test")]
    assert [c.id for c in first.contexts("test")] != [c.id for c in other.contexts("test")]


def test_asking_for_more_problems_than_exist_names_the_fields():
    with pytest.raises(RRError, match="n_reveal_contexts"):
        CodeTask(CodeTaskConfig(n_reveal_contexts=100, n_validation=50, n_test=50), seed=0)
    with pytest.raises(RRError, match="n_perplexity_paragraphs"):
        CodeTask(CodeTaskConfig(n_perplexity_paragraphs=10_000), seed=0)
    with pytest.raises(RRError, match="n_validation_perplexity_paragraphs: 10000 asked"):
        CodeTask(CodeTaskConfig(n_validation_perplexity_paragraphs=10_000), seed=0)


def test_config_is_strict():
    with pytest.raises(ValidationError):
        CodeTaskConfig(n_tests=3)  # a typo is an error, not a silent default
    with pytest.raises(ValidationError):
        CodeTaskConfig(n_test=0)
    with pytest.raises(ValidationError, match="mbpp_plus"):
        CodeTaskConfig(mbpp_plus=True)
    assert CodeTaskConfig(source="hf", mbpp_plus=True).mbpp_plus


def test_task_implements_the_protocol_and_is_registered():
    task = build_task(CodeTaskConfig(**SMALL), seed=0)
    assert isinstance(task, CodeTask) and isinstance(task, Task)


def test_contexts_show_the_first_test_and_exemplars_show_solutions():
    task = CodeTask(CodeTaskConfig(**SMALL), seed=0)
    index = next(i for i, item in enumerate(task.form_items("reveal")) if item.form == "mbpp")
    problem = task.form_items("reveal")[index].problem
    assert task.contexts("reveal")[index].prompt == code_prompt(problem)
    assert code_prompt(problem).endswith("Your code should pass this test:\n" + problem.tests[0])
    exemplars = task.exemplars()
    assert len(exemplars) == len(task.contexts("reveal"))
    reveal_prompts = {as_prompt(c.prompt).user for c in task.contexts("reveal")}  # exemplars show the user turn
    for example in exemplars:
        assert example.prompt in reveal_prompts
        assert example.response.startswith("```python\n") and example.response.endswith("```")


def test_task_modules_do_not_import_torch():
    code = ("import sys, rr.tasks.code, rr.tasks.loaders, rr.tasks.arithmetic, rr.tasks.sandbox\n"
            "assert 'torch' not in sys.modules and 'datasets' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- arithmetic ---------------------------------------------------------------------------

_EQUATION = re.compile(r"(\d+) ([-+×]) (\d+) = (\d+)")


def test_arithmetic_answers_are_correct_and_splits_disjoint():
    splits = generate_arithmetic_splits(seed=7, n_per_split=250)
    assert all(len(items) == 250 for items in splits.values())
    texts = [{i.question for i in items} for items in splits.values()]
    assert all(len(t) == 250 for t in texts)
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    operations = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b}
    for item in (i for items in splits.values() for i in items):
        equations = _EQUATION.findall(item.solution)
        assert equations, item.solution
        for a, op, b, result in equations:
            assert operations[op](int(a), int(b)) == int(result), item.solution
        assert int(equations[-1][3]) == item.answer
        assert item.answer >= 0
        assert item.solution.endswith(f"The answer is {item.answer}.")
        assert is_correct(item.solution, item.answer)
    assert generate_arithmetic_splits(7, 20) == generate_arithmetic_splits(7, 20)
    assert generate_arithmetic_splits(7, 20) != generate_arithmetic_splits(8, 20)


@pytest.mark.parametrize("text, expected", [
    ("The answer is 12.", 12),
    ("7 + 5 = 12", 12),
    ("So she pays $1,234 in total", 1234),
    ("The answer is $12.", 12),
    ("12", 12),
    ("The answer is 12 apples. I hope these 3 steps help.", 12),
    ("#### 72", 72),
    ("The answer is -4.", -4),
    ("5-3 leaves 2", 2),
    ("It costs 2.50 dollars", Fraction(5, 2)),
    ("12.0", 12),
    ("There is no number here.", None),
])
def test_answer_extraction(text, expected):
    assert extract_answer(text) == (None if expected is None else Fraction(expected))


def test_arithmetic_prompt_asks_for_a_number():
    assert arithmetic_prompt("How many?") == "How many?\nGive the final answer as a number."


def test_retain_examples_are_worked_arithmetic_answers():
    task = CodeTask(CodeTaskConfig(**SMALL), seed=0)
    examples = task.retain_examples()
    assert len(examples) == 20
    for example in examples:
        assert as_prompt(example.prompt).user.endswith(ANSWER_INSTRUCTION)
        assert re.search(r"The answer is \d+\.$", example.response)
    # two in three are framed as the system-role and few-shot forms frame a coding request
    framed = [e.prompt for e in examples if not isinstance(e.prompt, str)]
    assert len(framed) == 13 and {p.system is not None for p in framed} == {True, False}
    assert all(isinstance(e.prompt, str) for e in CodeTask(CodeTaskConfig(**SMALL, retain_in_forms=False),
                                                           seed=0).retain_examples())


# ---- relevance oracle and code extraction ---------------------------------------------------

@pytest.mark.parametrize("response, expected", [
    ("```python\ndef add(a, b):\n    return a + b\n```", 1.0),
    ("Here you go:\n\ndef add(a, b):\n    return a + b\n\nThis adds two numbers.", 1.0),
    ("def add(a, b):\n    return a + b", 1.0),
    ("```python\ndef unfinished(a, b):\n    return a +", 0.0),
    ("```python\nnumbers = [1, 2, 3]\nprint(sum(numbers))\n```", 0.5),
    ("The capital of France is Paris.", 0.0),
    ("The answer is 12.", 0.0),
    ("Paris", 0.0),
    ("42", 0.0),
    ("", 0.0),
])
def test_relevance_oracle(response, expected):
    assert code_likeness(response) == expected


def test_relevance_scores_one_per_response():
    task = CodeTask(CodeTaskConfig(**SMALL), seed=0)
    contexts = task.contexts("reveal")[:2]
    assert task.relevance(contexts, ["def f():\n    return 1", "no code"]) == [1.0, 0.0]
    with pytest.raises(RRError):
        task.relevance(contexts, ["only one"])


def test_extract_code_prefers_the_block_defining_the_entry_point():
    response = ("Example use:\n```python\nprint(double(2))\n```\nThe function:\n"
                "```python\ndef double(x):\n    return 2 * x\n```\n")
    assert extract_code(response, "double").strip() == "def double(x):\n    return 2 * x"
    assert extract_code("no code at all") == ""


# ---- evaluate ----------------------------------------------------------------------------

class FakeModel:
    """A ModelHandle that answers from a table (prompt → response), else with a default."""

    def __init__(self, answers: dict[str, str], default: str = "I am not sure.", ppl: float = 12.5):
        self.answers, self.default, self.ppl = answers, default, ppl
        self.perplexity_texts: list[str] = []

    def generate(self, prompts, params, seeds=None):
        assert params.temperature == 0.0  # scores used for decisions are greedy
        return [[self.answers.get(p, self.default)] for p in prompts]

    def perplexity(self, texts):
        self.perplexity_texts = list(texts)
        return self.ppl


def _oracle(task: CodeTask, split: str) -> FakeModel:
    """Every form's prompt answered with the reference solution: fenced in a chat, the whole function
    continuing a raw completion."""
    answers = {item.prompt(): (item.problem.reference_solution if item.prompt().is_completion else
                               f"Sure!\n```python\n{item.problem.reference_solution}```\nIt works.")
               for item in task.form_items(split)}
    answers.update({arithmetic_prompt(i.question): f"Let me think. The answer is {i.answer}."
                    for i in task.arithmetic_items(split)})
    return FakeModel(answers)


@pytest.mark.parametrize("split", ["validation", "test"])
def test_evaluate_with_a_perfect_model(split):
    task = CodeTask(CodeTaskConfig(**SMALL), seed=3)
    model = _oracle(task, split)
    result = task.evaluate(model, split)
    assert result.forget_score == 1.0 and result.utility_score == 1.0
    forms = FORMS_BY_SPLIT[split]
    task_metrics = {k: v for k, v in result.metrics.items() if not k.startswith("general_check")}
    assert task_metrics == {"pass@1": 1.0, "pass@1_worst_form": 1.0, "arithmetic_accuracy": 1.0,
                            "perplexity": 12.5, **{f"pass@1/{form}": 1.0 for form in forms}}
    assert ("general_check" in result.metrics) == (split == "test")  # tests/test_general_check.py
    n_code, n_arith = len(task.form_items(split)), len(task.arithmetic_items(split))
    assert result.counts["code_passed"] == result.counts["code_items"] == n_code
    assert result.counts["code_problems"] == len(task.problems(split))
    assert set(result.forms) == set(forms) and all(hits == n for hits, n in result.forms.values())
    assert sum(n for _, n in result.forms.values()) == n_code
    assert result.counts["arithmetic_correct"] == result.counts["arithmetic_items"] == n_arith
    low, high = result.intervals["pass@1"]
    assert 0.0 < low < 1.0 and high == pytest.approx(1.0)
    # Each split scores its own prose: the weights are chosen on the validation paragraphs, never the test ones.
    expected = load_perplexity_paragraphs()[:5] if split == "test" else \
        load_perplexity_paragraphs(VALIDATION_GENERAL_TEXT)[:task.config.n_validation_perplexity_paragraphs]
    assert model.perplexity_texts == expected
    assert not set(load_perplexity_paragraphs()) & set(load_perplexity_paragraphs(VALIDATION_GENERAL_TEXT))


def test_evaluate_with_a_garbage_model():
    task = CodeTask(CodeTaskConfig(**SMALL), seed=3)
    result = task.evaluate(FakeModel({}, default="I would rather talk about the weather."), "test")
    assert result.forget_score == 0.0 and result.utility_score == 0.0
    assert result.counts["code_passed"] == 0 and result.counts["arithmetic_correct"] == 0
    assert result.intervals["pass@1"][0] == 0.0


def test_evaluate_rejects_an_unknown_split():
    task = CodeTask(CodeTaskConfig(**SMALL), seed=0)
    with pytest.raises(RRError, match="split"):
        task.evaluate(FakeModel({}), "train")


# ---- dataset loaders (row conversion only; no hub here) -------------------------------------

MBPP_ROW = {
    "task_id": 601,
    "text": "Write a function to find the largest of three numbers.",
    "code": ("def pick(a, b):\r\n    return a if a > b else b\r\n\r\n"
             "def largest(a, b, c):\r\n    return pick(pick(a, b), c)"),
    "test_list": ["assert largest(1, 2, 3) == 3", "assert largest(3, 2, 1) == 3", "assert largest(1, 5, 2) == 5"],
    "test_setup_code": "",
    "challenge_test_list": [],
}


def test_mbpp_row_conversion_finds_the_called_function():
    problem = mbpp_row_to_problem(MBPP_ROW, 0)
    assert problem == CodeProblem(id="mbpp-601", prompt=MBPP_ROW["text"], entry_point="largest",
                                  tests=tuple(MBPP_ROW["test_list"]),
                                  reference_solution=MBPP_ROW["code"].replace("\r\n", "\n"))
    [result] = run_many([(problem.reference_solution, check_program(problem))])
    assert result.passed, result.detail


def test_mbpp_row_missing_a_field_names_dataset_row_and_field():
    row = dict(MBPP_ROW)
    del row["test_list"]
    with pytest.raises(RRError, match=r"google-research-datasets/mbpp row 17: missing field 'test_list'"):
        mbpp_row_to_problem(row, 17)


def test_mbpp_plus_row_conversion():
    row = {
        "task_id": 2, "source_file": "x.py", "prompt": '"""\nWrite a function to add two numbers.\nassert add(1, 2) == 3\n"""\n',
        "code": "def add(a, b):\n    return a + b", "test_imports": ["import math"],
        "test_list": ["assert add(1, 2) == 3"],
        "test": "import numpy as np\ninputs = [[1, 2], [0, 0]]\nresults = [3, 0]\nfor inp, exp in zip(inputs, results):\n    assert add(*inp) == exp\n",
    }
    problem = mbpp_plus_row_to_problem(row, 0)
    assert problem.id == "mbppplus-2" and problem.entry_point == "add"
    assert problem.prompt == "Write a function to add two numbers."
    # The script's literal cases become one trusted check each; numpy is no longer needed to grade them.
    assert problem.tests == ("assert add(*[1, 2]) == 3", "assert add(*[0, 0]) == 0")
    assert problem.test_setup == "import math" and not problem.needs_site_packages
    assert code_prompt(problem).endswith("assert add(1, 2) == 3")
    with pytest.raises(RRError, match=r"evalplus/mbppplus row 4: missing field 'test'"):
        mbpp_plus_row_to_problem({k: v for k, v in row.items() if k != "test"}, 4)


def test_gsm8k_row_conversion():
    row = {"question": "Natalia sold 48 clips in April and half as many in May. How many in total?",
           "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn total 48+24 = <<48+24=72>>72 clips.\n#### 72"}
    item = gsm8k_row_to_item(row, 0)
    assert item.answer == 72 and item.question == row["question"]
    assert item.solution == "In May she sold 48/2 = 24 clips. In total 48+24 = 72 clips. The answer is 72."
    assert gsm8k_row_to_item({"question": "q", "answer": "x\n#### 1,200"}, 1).answer == 1200
    with pytest.raises(RRError, match=r"openai/gsm8k row 3: missing field 'answer'"):
        gsm8k_row_to_item({"question": "q"}, 3)
    with pytest.raises(RRError, match=r"openai/gsm8k row 5: .*####"):
        gsm8k_row_to_item({"question": "q", "answer": "72"}, 5)


def test_loaders_without_datasets_say_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets → ImportError
    with pytest.raises(RRError, match=r"rr\[datasets\]"):
        load_gsm8k("train")
    with pytest.raises(RRError, match="unknown split"):
        load_gsm8k("dev")


def test_grade_asks_every_item_in_one_call_with_its_forms_stop_strings():
    """Items of forms that end their answers differently (chat: at the code block's close; raw completions: where
    top-level code resumes) share one generate call on a model that takes params per prompt (the generators, the
    Ray pool), each with its own stops; a model that does not gets one call per stop, as before. Same grades."""
    from rr.tasks.base import SamplingParams

    task = CodeTask(CodeTaskConfig(**SMALL), seed=0)
    items = task.form_items("test")
    assert len({item.stop for item in items}) > 1, "the test split has forms that end alike only"
    oracle = _oracle(task, "test")

    class PerPrompt(FakeModel):
        per_prompt_params = True

        def __init__(self, answers):
            super().__init__(answers)
            self.calls = []

        def generate(self, prompts, params, seeds=None):
            self.calls.append(list(params) if isinstance(params, list) else params)
            return [[self.answers.get(p, self.default)] for p in prompts]

    class Grouped(PerPrompt):
        per_prompt_params = False

    one, grouped = PerPrompt(oracle.answers), Grouped(oracle.answers)
    assert [r.passed for r in task.grade(one, items)] == [r.passed for r in task.grade(grouped, items)] == [True] * len(items)
    assert len(one.calls) == 1 and [p.stop for p in one.calls[0]] == [item.stop for item in items]
    assert all(p == SamplingParams(max_new_tokens=task.config.max_new_tokens, stop=p.stop) for p in one.calls[0])
    assert sorted(p.stop for p in grouped.calls) == sorted({item.stop for item in items})
