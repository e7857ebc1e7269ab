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

from rr.core.prompt import Prompt, Turn, as_prompt
from rr.tasks.code import CodeTask, CodeTaskConfig
from rr.tasks.code_problems import CodeProblem, load_builtin_problems
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

def _is_chat(form: str) -> bool:
    return not CODE_FORMS[form].prompt(load_builtin_problems()[0]).is_completion


def test_form_split_is_disjoint_covers_every_form_and_holds_out_at_least_three():
    assert len(CODE_FORMS) >= 8
    assert not set(DEVELOPMENT_FORMS) & set(HELD_OUT_FORMS)
    assert set(DEVELOPMENT_FORMS) | set(HELD_OUT_FORMS) == set(CODE_FORMS)
    assert len(HELD_OUT_FORMS) >= 3
    assert FORMS_BY_SPLIT["validation"] == DEVELOPMENT_FORMS
    # Reveal's contexts take an instruction before their user turn: the development forms that are chats
    assert FORMS_BY_SPLIT["reveal"] == tuple(name for name in DEVELOPMENT_FORMS if _is_chat(name))
    assert set(FORMS_BY_SPLIT["test"]) == set(CODE_FORMS)


def test_held_out_forms_never_reach_reveal_or_validation_items(quickstart_task):
    for split in ("reveal", "validation"):
        items = quickstart_task.form_items(split)  # what Reveal answers and the weight search scores
        assert {item.form for item in items} == set(FORMS_BY_SPLIT[split]), split
        assert not {item.form for item in items} & set(HELD_OUT_FORMS)
        assert {item.problem.id for item in items} == {p.id for p in quickstart_task.problems(split)}
    # Reveal's contexts (and so the forget set, which pairs them with answers) are those items' prompts
    contexts = quickstart_task.contexts("reveal")
    assert [c.id for c in contexts] == [item.id for item in quickstart_task.form_items("reveal")]
    held_out_prompts = {CODE_FORMS[form].prompt(p).user for p in load_builtin_problems() for form in HELD_OUT_FORMS}
    asked = {as_prompt(c.prompt).user for c in contexts + quickstart_task.contexts("validation")}
    assert not asked & held_out_prompts


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
    # Forms that build the same program for a problem (the chat forms all read the same answer) are run once.
    distinct = sorted({(problem.id, program): problem for (problem, _), program in zip(cases, programs)}.items())
    results = quickstart_task.run_solutions([problem for _, problem in distinct], [key[1] for key, _ in distinct])
    verdict = {key: result for (key, _), result in zip(distinct, results)}
    assert not [(p.id, name, verdict[(p.id, program)].status) for (p, name), program in zip(cases, programs)
                if not verdict[(p.id, program)].passed]


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
    # the generators send what the prompt renders: a str as one user turn, a Prompt as itself
    from rr.generation.hf import HFGenerator

    generator = HFGenerator.__new__(HFGenerator)  # chat_text needs only the tokenizer and system prompt
    generator.tokenizer, generator.system_prompt = tokenizer, None
    assert generator.chat_text(plain.user) == plain.render(tokenizer)
    assert generator.chat_text(few_shot) == text and generator.chat_text(raw) == raw.completion
    generator.system_prompt = "Be brief."
    assert generator.chat_text("hi") == Prompt.chat("hi", system="Be brief.").render(tokenizer)
    assert generator.chat_text(few_shot) == text  # a Prompt's own turns win over the generator's default


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
        expected = {"test": set(ENTITY_FORMS), "validation": set(ENTITY_DEVELOPMENT_FORMS),
                    "reveal": set(ENTITY_DEVELOPMENT_FORMS) - {"statement-completion"}}  # Reveal: chat forms
        assert forms == expected[split], split
        for fact in task.facts_of(everyone, split):
            prompts = [item.prompt() for item in items if item.fact == fact]
            assert len({p.key() for p in prompts}) == len(prompts), fact
            assert all(fact.person in p.user for p in prompts), fact
            assert all(fact.answer not in p.user for p in prompts), f"a form gives the answer away: {fact}"
    with pytest.raises(ValueError, match="facts of other splits"):
        entity_form_items(task.facts_of(everyone, "reveal"), "test")


# ---- forms in the task's scores, the weight rules and the report --------------------------------

class FormModel:
    """A ModelHandle that answers every item of `task`'s split with its reference solution, except in the
    forms of `broken`, where it answers with prose (it has forgotten only those wordings)."""

    def __init__(self, task: CodeTask, split: str, broken: tuple[str, ...] = ()):
        self.answers = {}
        for item in task.form_items(split):
            solution = item.problem.reference_solution
            self.answers[item.prompt()] = ("I would rather not write code." if item.form in broken else
                                           solution if item.prompt().is_completion else f"```python\n{solution}```")

    def generate(self, prompts, params, seeds=None):
        return [[self.answers.get(p, "The answer is 0.")] for p in prompts]

    def perplexity(self, texts):
        return 10.0


SMALL_FORMS = dict(n_reveal_contexts=6, n_validation=12, n_test=10, n_arithmetic_validation=4, n_arithmetic_test=4,
                   n_retain_examples=8, n_perplexity_paragraphs=2, min_validation_items_per_form=4,
                   min_test_items_per_form=5)


def test_a_candidate_that_breaks_one_form_only_is_refused_by_the_forget_rule():
    from rr.release.weights import RULE_FORGET_TARGET, CandidateResult, choose_forget_weight

    for decision in ("pooled", "worst-form"):
        task = CodeTask(CodeTaskConfig(**SMALL_FORMS, forget_decision=decision), seed=0)
        base = task.evaluate(FormModel(task, "validation"), "validation")
        one_form = task.evaluate(FormModel(task, "validation", broken=("mbpp",)), "validation")
        every_form = task.evaluate(FormModel(task, "validation", broken=DEVELOPMENT_FORMS), "validation")
        assert base.forget_score == 1.0 and one_form.metrics["pass@1/mbpp"] == 0.0
        assert one_form.forget_score == (5 / 6 if decision == "pooled" else 1.0), decision  # 4 items in each of 6
        choice = choose_forget_weight([CandidateResult(1.0, one_form.forget_score, 1.0),
                                       CandidateResult(2.0, every_form.forget_score, 1.0)],
                                      base.forget_score, base.utility_score, forget_fraction=0.9)
        assert (choice.weight, choice.rule, choice.passed) == (2.0, RULE_FORGET_TARGET, True), decision
        # the task's own template alone (the old score) would have taken the candidate that broke it
        alone = choose_forget_weight([CandidateResult(1.0, one_form.metrics["pass@1/mbpp"], 1.0)],
                                     base.metrics["pass@1/mbpp"], 1.0, forget_fraction=0.9)
        assert alone.weight == 1.0


def test_form_report_counts_forms_the_base_model_shows_and_names_the_worst():
    from rr.evaluation.forms import form_markdown, form_report

    base = {"forms": {"mbpp": [12, 20], "plain": [5, 20], "french": [2, 20]}}
    rr_model = {"forms": {"mbpp": [5, 20], "plain": [3, 20], "french": [2, 20]}}
    report = form_report(base, {"rr": rr_model}, held_out=("french",))
    assert report["counted_forms"] == ["mbpp", "plain"]  # french: 2 < 5 base hits, reported but not counted
    assert report["pooled"]["base"]["rate"] == pytest.approx(17 / 40)
    assert report["pooled"]["rr"]["rate"] == pytest.approx(8 / 40)
    assert report["pooled"]["rr"]["relative_drop"] == pytest.approx(1 - 8 / 17)
    # worst: the highest rate left (mbpp 0.25), as decisions and gates read it; plain fell least (0.25 → 0.15)
    assert report["worst"]["rr"] == {"form": "mbpp", "rate": 0.25, "base_rate": 0.6,
                                     "relative_drop": pytest.approx(1 - 0.25 / 0.6)}
    assert report["least_dropped"]["rr"]["form"] == "plain"
    french = next(row for row in report["rows"] if row["form"] == "french")
    assert french["held_out"] and not french["counted"] and french["rr"]["hits"] == 2
    text = form_markdown(report, "pass@1")
    assert "| french | yes | no |" in text and "worst form mbpp 0.250" in text and "smallest drop: plain, down 40%" in text
    assert form_report({"forms": {}}, {"rr": rr_model}) is None
    nothing = form_report({"forms": {"mbpp": [1, 20]}}, {"rr": {"forms": {"mbpp": [0, 20]}}})
    assert nothing["counted_forms"] == [] and "No form counts" in form_markdown(nothing)
    # an evaluation without forms (an older result) is missing there, never "forgotten"
    old = form_report(base, {"rr": {"metrics": {}}})
    assert old["rows"][0]["rr"] is None and "rr" not in old["pooled"] and "not scored" in form_markdown(old)
    with pytest.raises(ValueError, match="min_base_hits"):
        form_report(base, {}, min_base_hits=0)


def test_the_test_split_reports_held_out_forms_and_validation_never_asks_them():
    task = CodeTask(CodeTaskConfig(**SMALL_FORMS), seed=0)
    asked = []

    class Recording(FormModel):
        def generate(self, prompts, params, seeds=None):
            asked.extend(prompts)
            return super().generate(prompts, params, seeds)

    validation = task.evaluate(Recording(task, "validation"), "validation")
    held_out_prompts = {item.prompt() for item in task.form_items("test") if item.form in HELD_OUT_FORMS}
    assert not set(asked) & held_out_prompts and set(validation.forms) == set(DEVELOPMENT_FORMS)
    test = task.evaluate(FormModel(task, "test", broken=("casual",)), "test")
    assert set(test.forms) == set(CODE_FORMS) and test.forms["casual"][0] == 0
    assert min(n for _, n in test.forms.values()) >= 5
    assert test.metrics["pass@1_worst_form"] == 1.0 and test.metrics["pass@1/casual"] == 0.0


def test_completion_answers_keep_their_indentation_and_a_stripped_first_line_is_reindented(quickstart_task):
    from rr.generation.base import tidy_answer

    raw = Prompt.raw("def f(n):\n")
    assert tidy_answer("    return 2 * n\n\n", raw) == "    return 2 * n"  # a raw completion keeps its indent
    assert tidy_answer("  Sure.  ", "a chat turn") == "Sure."
    # an answer that lost its first line's indentation (any backend, or a model writing flush left) still grades
    for problem in load_builtin_problems()[:20]:
        for form in COMPLETION_FORMS:
            item_prompt = CODE_FORMS[form].prompt(problem)
            body = reference_body(problem)
            stripped = body.lstrip()
            program = CODE_FORMS[form].program(problem, stripped)
            assert program.startswith(item_prompt.completion), (problem.id, form)
            result, = quickstart_task.run_solutions([problem], [program])
            assert result.passed, (problem.id, form, result)


def test_raw_completions_start_with_bos_where_the_tokenizer_starts_plain_text_with_it():
    class Tokenizer:
        bos_token, bos_token_id, chat_template = "<s>", 1, None

        def __init__(self, adds_bos):
            self.adds_bos = adds_bos

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": ([1] if add_special_tokens and self.adds_bos else []) + [ord(c) for c in text]}

    raw = Prompt.raw("def f():\n")
    assert raw.render(Tokenizer(adds_bos=True)) == "<s>def f():\n"  # Llama, Mistral
    assert raw.render(Tokenizer(adds_bos=False)) == "def f():\n"    # SmolLM2 (tested above with its tokenizer)
    assert Prompt.raw("<s>x").render(Tokenizer(adds_bos=True)) == "<s>x"


def test_forms_are_not_dealt_to_fixed_groups_of_problems(quickstart_task):
    items = quickstart_task.form_items("test")
    by_problem: dict[str, set] = {}
    for item in items:
        by_problem.setdefault(item.problem.id, set()).add(item.form)
    # every pair of forms is asked together of some problem: no two forms are compared on disjoint problems
    for first in CODE_FORMS:
        for second in CODE_FORMS:
            assert any({first, second} <= forms for forms in by_problem.values()), (first, second)


def test_task_forms_restricts_every_split_and_refuses_a_list_a_split_cannot_ask():
    from pydantic import ValidationError

    task = CodeTask(CodeTaskConfig(**SMALL_FORMS, forms=["mbpp", "casual"]), seed=0)
    assert {i.form for i in task.form_items("reveal")} == {i.form for i in task.form_items("validation")} == {"mbpp"}
    assert {i.form for i in task.form_items("test")} == {"mbpp", "casual"}
    assert all(isinstance(e.prompt, str) for e in task.retain_examples())  # no framed form listed: no framing
    for bad, message in ((["casual"], "reveal split"), (["mbpp", "nope"], "nope"), (["mbpp", "mbpp"], "once")):
        with pytest.raises(ValidationError, match=message):
            CodeTaskConfig(forms=bad)
