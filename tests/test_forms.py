"""Code forms and the prompt type: the form split keeps held-out forms out of development data, every form
renders for every shipped problem, completion answers grade as the program they stand for, and prompts
render through the embedded model's tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rr.core.prompt import Prompt, Turn
from rr.tasks.code import CodeProblem, CodeTask, CodeTaskConfig, load_builtin_problems
from rr.tasks.code_forms import (CODE_FORMS, COMPLETION_STOP, DEVELOPMENT_FORMS, FEW_SHOT_EXAMPLES, FORMS_BY_SPLIT,
                                 HELD_OUT_FORMS, form_items, items_per_form, problem_parts, program_from_completion)

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
COMPLETION_FORMS = [name for name, form in CODE_FORMS.items() if form.stop == COMPLETION_STOP]


@pytest.fixture(scope="module")
def quickstart_task() -> CodeTask:
    job = yaml.safe_load(QUICKSTART.read_text(encoding="utf-8"))
    return CodeTask(CodeTaskConfig(**job["task"]), seed=job.get("seed", 0))


def reference_body(problem: CodeProblem) -> str:
    """What a model completing the problem's signature would write: the reference solution's body, its
    module-level imports moved inside the function (nothing can precede a given signature)."""
    lines = problem.reference_solution.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"def {problem.entry_point}("))
    imports = ["    " + line for line in lines[:start] if line.strip()]
    return "\n".join(imports + lines[start + 1:]) + "\n"


# ---- the form split -------------------------------------------------------------------------

def test_form_split_is_disjoint_covers_every_form_and_holds_out_at_least_three():
    assert len(CODE_FORMS) >= 8
    assert not set(DEVELOPMENT_FORMS) & set(HELD_OUT_FORMS)
    assert set(DEVELOPMENT_FORMS) | set(HELD_OUT_FORMS) == set(CODE_FORMS)
    assert len(HELD_OUT_FORMS) >= 3
    assert FORMS_BY_SPLIT["reveal"] == FORMS_BY_SPLIT["validation"] == DEVELOPMENT_FORMS
    assert set(FORMS_BY_SPLIT["test"]) == set(CODE_FORMS)


def test_held_out_forms_never_reach_reveal_or_validation_items(quickstart_task):
    for split in ("reveal", "validation"):
        items = form_items(quickstart_task.problems(split), split)
        assert {item.form for item in items} == set(DEVELOPMENT_FORMS), split
        assert not {item.form for item in items} & set(HELD_OUT_FORMS)
        assert {item.problem.id for item in items} == {p.id for p in quickstart_task.problems(split)}


def test_each_test_form_gets_twenty_items_from_the_quickstart_test_problems(quickstart_task):
    problems = quickstart_task.problems("test")
    items = form_items(problems, "test")
    counts = items_per_form(items)
    assert set(counts) == set(CODE_FORMS)
    assert min(counts.values()) >= 20, counts
    assert len({item.id for item in items}) == len(items), "a (problem, form) pair is dealt twice"
    assert {item.problem.id for item in items} == {p.id for p in problems}


def test_form_items_deal_every_form_to_tiny_splits_and_refuse_bad_input():
    problems = load_builtin_problems()[:3]
    items = form_items(problems, "test")
    assert len(items) == 3 * len(CODE_FORMS)  # too few problems for 20 a form: every problem in every form
    with pytest.raises(ValueError, match="unknown split 'train'"):
        form_items(problems, "train")
    with pytest.raises(ValueError, match="min_items_per_form"):
        form_items(problems, "test", min_items_per_form=0)


# ---- rendering every form -------------------------------------------------------------------

def test_every_form_renders_for_every_shipped_problem_and_differs_from_the_others():
    for problem in load_builtin_problems():
        prompts = {name: form.prompt(problem) for name, form in CODE_FORMS.items()}
        assert len({prompt.key() for prompt in prompts.values()}) == len(CODE_FORMS), problem.id
        for name, prompt in prompts.items():
            assert problem.entry_point in prompt.user, (problem.id, name)
            assert prompt.is_completion == (name in COMPLETION_FORMS), (problem.id, name)


def test_few_shot_examples_are_in_no_split_and_their_solutions_pass(quickstart_task):
    shipped = {p.entry_point for p in load_builtin_problems()}
    assert not {example.entry_point for example in FEW_SHOT_EXAMPLES} & shipped
    problems = [CodeProblem(id=f"shot-{e.entry_point}", prompt=e.request(), entry_point=e.entry_point, tests=e.tests)
                for e in FEW_SHOT_EXAMPLES]
    results = quickstart_task.run_solutions(problems, [e.solution for e in FEW_SHOT_EXAMPLES])
    assert all(r.passed for r in results), results


def test_problem_parts_read_mbpp_style_prompts_and_name_unreadable_ones():
    mbpp = CodeProblem(id="mbpp-2", prompt="Write a function to find the shared elements from the given two lists.",
                       entry_point="similar_elements", tests=("assert similar_elements((1, 2), (2, 3)) == (2,)",),
                       reference_solution="def similar_elements(test_tup1, test_tup2):\n    return tuple(set(test_tup1) & set(test_tup2))\n")
    parts = problem_parts(mbpp)
    assert parts.signature == "similar_elements(test_tup1, test_tup2)"
    assert parts.connective == "to" and parts.clause.startswith("find the shared")
    for form in CODE_FORMS.values():
        assert "similar_elements" in form.prompt(mbpp).user
    unreadable = CodeProblem(id="odd-1", prompt="Reverse things.", entry_point="rev", tests=("assert rev('') == ''",))
    with pytest.raises(ValueError, match="odd-1: cannot read a signature"):
        problem_parts(unreadable)


# ---- reading the program out of an answer ---------------------------------------------------

def test_completion_extraction_drops_example_calls_and_keeps_a_rewritten_function():
    header = "def double(n):\n"
    body = "    return 2 * n\n\nassert double(2) == 5\nprint(double(3))\n"
    assert program_from_completion(header, body, "double") == "def double(n):\n    return 2 * n\n\n"
    rewritten = "Sure!\n```python\ndef double(n):\n    return n + n\n```\n"
    assert program_from_completion(header, rewritten, "double") == "def double(n):\n    return n + n\n"
    helper = "    return twice(n)\n\ndef twice(x):\n    return 2 * x\nThat is all."
    assert "def twice" in program_from_completion(header, helper, "double")
    fenced_body = "```python\nreturn n * 2\n```"
    assert program_from_completion(header, fenced_body, "double") == "def double(n):\n    return n * 2\n"
    assert program_from_completion(header, "I cannot help with that.", "double") == ""


def test_completion_forms_grade_reference_bodies_as_passing_and_wrong_bodies_as_failing(quickstart_task):
    # Every fifth shipped problem (29) through each form that reads a completion; all of them under `slow`.
    problems = load_builtin_problems()[::5]
    forms = COMPLETION_FORMS + ["complete-docstring"]
    cases = [(problem, name) for problem in problems for name in forms]
    programs = [CODE_FORMS[name].program(problem, reference_body(problem)) for problem, name in cases]
    results = quickstart_task.run_solutions([problem for problem, _ in cases], programs)
    failures = [(p.id, name, r.status, r.detail[:120]) for (p, name), r in zip(cases, results) if not r.passed]
    assert not failures
    wrong = [CODE_FORMS[name].program(problems[0], "    return None\n") for name in forms]
    assert not any(r.passed for r in quickstart_task.run_solutions([problems[0]] * len(forms), wrong))


@pytest.mark.slow
def test_every_form_grades_every_shipped_reference_solution_as_passing(quickstart_task):
    cases = [(problem, name) for problem in load_builtin_problems() for name in CODE_FORMS]
    programs = []
    for problem, name in cases:
        if CODE_FORMS[name].stop == COMPLETION_STOP:
            response = reference_body(problem)
        else:
            response = f"Here it is:\n```python\n{problem.reference_solution}```\nIt runs in O(n)."
        programs.append(CODE_FORMS[name].program(problem, response))
    results = quickstart_task.run_solutions([problem for problem, _ in cases], programs)
    assert not [(p.id, name, r.status) for (p, name), r in zip(cases, results) if not r.passed]


# ---- the prompt type ------------------------------------------------------------------------

def test_prompt_refuses_malformed_chats_naming_the_problem():
    with pytest.raises(ValueError, match="exactly one of messages"):
        Prompt()
    with pytest.raises(ValueError, match="exactly one of messages"):
        Prompt(messages=(Turn("user", "hi"),), completion="def f():")
    with pytest.raises(ValueError, match="must end with a user turn"):
        Prompt(messages=(Turn("user", "hi"), Turn("assistant", "hello")))
    with pytest.raises(ValueError, match="turn 1 is a 'user' turn, expected 'assistant'"):
        Prompt(messages=(Turn("user", "a"), Turn("user", "b")))
    with pytest.raises(ValueError, match="'tool' is not one of"):
        Turn("tool", "x")
    with pytest.raises(ValueError, match="exactly one key"):
        Prompt.from_json({"messages": [], "completion": "x"})


def test_prompt_json_round_trips_and_keys_follow_content_not_identity():
    chat = Prompt.chat("Write f.", system="Be terse.", shots=[("Write g.", "def g(): pass")])
    assert Prompt.from_json(json.loads(json.dumps(chat.to_json()))) == chat
    assert Prompt.chat("Write f.", system="Be terse.", shots=[("Write g.", "def g(): pass")]).key() == chat.key()
    assert Prompt.chat("Write f.").key() != Prompt.raw("Write f.").key()
    assert Prompt.chat("Write f.").key() != Prompt.chat("Write f.", system="").key()
    assert Prompt(messages=[Turn("user", "x")]) == Prompt.chat("x")  # a list of turns is frozen into a tuple
    assert hash(chat) == hash(Prompt.from_json(chat.to_json()))


def test_prompt_key_is_the_same_in_another_interpreter():
    prompt = Prompt.chat("Écris une fonction.", system="sys")
    script = ("import json, sys; from rr.core.prompt import Prompt; "
              "print(Prompt.from_json(json.loads(sys.argv[1])).key())")
    other = subprocess.run([sys.executable, "-c", script, json.dumps(prompt.to_json())], capture_output=True,
                           text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert other.stdout.strip() == prompt.key()


def test_rr_core_imports_no_other_rr_module_and_no_torch():
    script = ("import sys, rr.core.prompt; "
              "print(sorted(m for m in sys.modules if m.startswith('rr.') and not m.startswith('rr.core')), "
              "'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] False"


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    # The tokenizer alone, as rr.models loads it: the prompt type needs no weights (loading them costs minutes
    # on a busy 2-core machine).
    from transformers import AutoTokenizer

    from rr.models import resolve_model

    source = resolve_model("embedded:smollm2")
    return AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)


def test_prompts_render_through_the_embedded_chat_template(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    plain = Prompt.chat("Write a function that adds two numbers.")
    # A single user turn renders as rr's HF generator renders a string prompt today (one user message).
    assert plain.render(tokenizer) == tokenizer.apply_chat_template(
        [{"role": "user", "content": plain.user}], tokenize=False, add_generation_prompt=True)
    assert plain.render(tokenizer).endswith("<|im_start|>assistant\n")
    few_shot = Prompt.chat("Write h.", system="You write Python.", shots=[("Write g.", "def g(): pass")])
    text = few_shot.render(tokenizer)
    assert text.startswith("<|im_start|>system\nYou write Python.<|im_end|>")
    assert text.index("Write g.") < text.index("def g(): pass") < text.index("Write h.")
    assert text.endswith("<|im_start|>assistant\n")
    assert "SmolLM" not in text  # the given system turn replaces the template's default one
    raw = CODE_FORMS["raw-docstring"].prompt(load_builtin_problems()[0])
    assert raw.render(tokenizer) == raw.completion and "<|im_start|>" not in raw.render(tokenizer)


# ---- entity forms ---------------------------------------------------------------------------

def test_entity_forms_render_for_every_shipped_fact_and_hold_out_three_forms():
    from rr.tasks.entity import EntityTask, EntityTaskConfig
    from rr.tasks.entity_forms import (ENTITY_DEVELOPMENT_FORMS, ENTITY_FORMS, ENTITY_HELD_OUT_FORMS,
                                       entity_form_items)

    assert not set(ENTITY_DEVELOPMENT_FORMS) & set(ENTITY_HELD_OUT_FORMS)
    assert set(ENTITY_DEVELOPMENT_FORMS) | set(ENTITY_HELD_OUT_FORMS) == set(ENTITY_FORMS)
    assert len(ENTITY_HELD_OUT_FORMS) >= 3
    task = EntityTask(EntityTaskConfig(cosine_similarity=False))
    everyone = task.forget_people + task.neighbours
    for split in ("reveal", "validation", "test"):
        items = entity_form_items(task.facts_of(everyone, split), split)
        forms = {item.form for item in items}
        assert forms == (set(ENTITY_FORMS) if split == "test" else set(ENTITY_DEVELOPMENT_FORMS)), split
        for fact in task.facts_of(everyone, split):
            prompts = [item.prompt() for item in items if item.fact == fact]
            assert len({p.key() for p in prompts}) == len(prompts), fact
            assert all(fact.person in p.user for p in prompts), fact
            assert all(fact.answer not in p.user for p in prompts), f"a form gives the answer away: {fact}"
    with pytest.raises(ValueError, match="facts of other splits"):
        entity_form_items(task.facts_of(everyone, "reveal"), "test")
