"""The code task's forms: one coding problem asked in several ways (chat wordings, a system role, few-shot,
raw completions, another language), how each form's answer becomes the program to grade, and the form split.

Forgetting one prompt template is not forgetting the skill (ARCHITECTURE.md, "Forms"): Reveal, validation
and training use the development forms only; the held-out forms reach the test split alone, so the test
measures whether the forgetting generalises to wordings the method never saw.
"""

from __future__ import annotations

import ast
import math
import random
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from rr.core.prompt import Prompt
from rr.tasks.base import SPLITS
from rr.tasks.code_problems import CODE_STOP, CodeProblem, code_prompt, extract_code

# --------------------------------------------------------------------------------------------
# A problem's parts, as the forms reword them
# --------------------------------------------------------------------------------------------

# The shipped problems all read "Write a function `name(args)` that <clause>." (rr/tasks/data/).
_BUILTIN_PROMPT = re.compile(r"^Write a (?:Python )?function `(?P<name>\w+)\((?P<params>[^`]*)\)` "
                             r"(?P<connective>that|to|which) (?P<clause>.+?)\s*$", re.DOTALL)
# MBPP's prompts read "Write a (python) function to <clause>." without a signature.
_MBPP_PROMPT = re.compile(r"^Write an? (?:python |Python )?(?:function|program|method) "
                          r"(?P<connective>to|that|which) (?P<clause>.+?)\s*$", re.DOTALL)


@dataclass(frozen=True)
class ProblemParts:
    """What every form is built from: `clause` continues `connective` ("that returns …", "to find …")."""

    name: str
    params: str
    connective: str
    clause: str
    example_test: str

    @property
    def signature(self) -> str:
        return f"{self.name}({self.params})"

    @property
    def sentence(self) -> str:
        """The clause as a sentence of its own ("Returns the …."), for docstrings and comments."""
        text = self.clause[0].upper() + self.clause[1:]
        return text if text.endswith((".", "!", "?")) else text + "."

    @property
    def bare_clause(self) -> str:
        """The clause without its final full stop, for templates that go on after it."""
        return self.clause[:-1] if self.clause.endswith(".") else self.clause


def has_parts(problem: CodeProblem) -> bool:
    """Whether the forms can reword `problem` (problem_parts reads its signature and behaviour)."""
    try:
        problem_parts(problem)
    except ValueError:
        return False
    return True


def _params_from_solution(problem: CodeProblem) -> str | None:
    """The entry point's parameter list as written in the reference solution (MBPP has no signature
    in its prompt)."""
    if not problem.reference_solution:
        return None
    try:
        tree = ast.parse(problem.reference_solution)
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == problem.entry_point:
            return ast.unparse(node.args)
    return None


def problem_parts(problem: CodeProblem) -> ProblemParts:
    """Split a problem's prompt into the entry point's signature and its behaviour clause."""
    example = problem.example_test or problem.tests[0]
    text = problem.prompt.strip()
    match = _BUILTIN_PROMPT.match(text)
    if match:
        if match["name"] != problem.entry_point:
            raise ValueError(f"code problem {problem.id}: its prompt names `{match['name']}` but its entry point "
                             f"is {problem.entry_point!r}; fix the problem row")
        return ProblemParts(problem.entry_point, match["params"], match["connective"], match["clause"], example)
    params = _params_from_solution(problem)
    match = _MBPP_PROMPT.match(text)
    if match and params is not None:
        return ProblemParts(problem.entry_point, params, match["connective"], match["clause"], example)
    raise ValueError(f"code problem {problem.id}: cannot read a signature and a behaviour from its prompt "
                     f"{text[:80]!r} (expected \"Write a function `name(args)` that …\", or an MBPP-style "
                     "\"Write a function to …\" with a reference solution defining the entry point)")


# --------------------------------------------------------------------------------------------
# Reading the program to grade out of an answer
# --------------------------------------------------------------------------------------------

# Lines that may follow the function in a completion and still belong to the program (helpers).
_PROGRAM_LINE = re.compile(r"^(def |class |import |from |@|async def )")


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return True


def _defines(source: str, name: str) -> bool:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name for n in ast.walk(tree))


def _reindent_first_line(lines: list[str]) -> list[str]:
    """A body whose first line lost its indentation (an answer stripped on its way here, or a model that
    wrote it flush left) gets the headers' own body indentation, four spaces. A first line that starts a
    definition is left as it is (it may be a helper written after the header)."""
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None or lines[first][0].isspace() or _PROGRAM_LINE.match(lines[first]):
        return lines
    return lines[:first] + ["    " + lines[first]] + lines[first + 1:]


def program_from_completion(header: str, response: str, entry_point: str) -> str:
    """The program a completion-form answer stands for: the given `header` (which ends with the
    entry point's `def` line or docstring) followed by the answer's body.

    The body ends at the first unindented line that is not a definition or import (example calls,
    asserts, prose or a closing fence written after the function are not part of the answer; a
    wrong example assert would otherwise fail a correct function), then is cut back to the longest
    prefix that parses. An answer that rewrote the whole function (a fenced block or a `def` of the
    entry point) is graded as that function. "" when nothing parses.
    """
    rewritten = extract_code(response, entry_point)
    if rewritten and _defines(rewritten, entry_point) and (
            "```" in response or re.search(rf"^\s*def {re.escape(entry_point)}\(", response, re.MULTILINE)):
        return rewritten
    body = response
    if "```" in response:
        # A chat answer that fenced only the body: the block is the body, indented under the header.
        block = rewritten
        if block and not block.startswith((" ", "\t")):
            block = "\n".join(("    " + line) if line.strip() else line for line in block.splitlines())
        body = block
    lines = _reindent_first_line(body.splitlines())
    kept: list[str] = []
    for index, line in enumerate(lines):
        if index > 0 and line.strip() and not line[0].isspace() and not _PROGRAM_LINE.match(line):
            break
        kept.append(line)
    prefix = header if header.endswith("\n") else header + "\n"
    for stop in range(len(kept), 0, -1):
        candidate = prefix + "\n".join(kept[:stop]) + "\n"
        if _parses(candidate) and _defines(candidate, entry_point):
            return candidate
    return ""


def program_from_chat(problem: CodeProblem, response: str) -> str:
    """A chat answer's program: its code block (or code) defining the entry point, as the MBPP form
    is graded (rr.tasks.code.extract_code)."""
    return extract_code(response, problem.entry_point)


# --------------------------------------------------------------------------------------------
# The forms
# --------------------------------------------------------------------------------------------

# Completion answers have no closing fence to stop at: they end where top-level code resumes.
COMPLETION_STOP = ("\nprint(", "\nassert ", "\nif __name__", "\n# ", "\n```", "\n\n\n")


@dataclass(frozen=True)
class CodeForm:
    """One way of asking for a problem's solution: the prompt it renders, where an answer ends, and how
    the answer becomes the program that is graded against the problem's tests."""

    name: str
    summary: str
    build: Callable[[CodeProblem], Prompt]
    extract: Callable[[CodeProblem, str], str]
    stop: tuple[str, ...] = CODE_STOP

    def prompt(self, problem: CodeProblem) -> Prompt:
        return self.build(problem)

    def program(self, problem: CodeProblem, response: str) -> str:
        return self.extract(problem, response)


def _docstring_header(parts: ProblemParts) -> str:
    return (f"def {parts.signature}:\n"
            f'    """{parts.sentence}\n\n'
            f"    Example: {parts.example_test}\n"
            f'    """\n')


def _comment_header(parts: ProblemParts) -> str:
    return (f"# {parts.sentence}\n"
            f"# It passes: {parts.example_test}\n"
            f"def {parts.signature}:\n")


def _mbpp(problem: CodeProblem) -> Prompt:
    return Prompt.chat(code_prompt(problem))


def _plain(problem: CodeProblem) -> Prompt:
    parts = problem_parts(problem)
    return Prompt.chat(f"Write a Python function `{parts.signature}` {parts.connective} {parts.clause}")


def _complete_docstring(problem: CodeProblem) -> Prompt:
    header = _docstring_header(problem_parts(problem))
    return Prompt.chat(f"Complete this Python function:\n\n```python\n{header}```")


def _complete_docstring_program(problem: CodeProblem, response: str) -> str:
    return program_from_completion(_docstring_header(problem_parts(problem)), response, problem.entry_point)


_ROLE_SYSTEM = ("You are a senior Python engineer. Answer every request with one Python code block that "
                "defines the requested function, and nothing else.")


def _system_role(problem: CodeProblem) -> Prompt:
    parts = problem_parts(problem)
    return Prompt.chat(f"Implement `{parts.signature}` {parts.connective} {parts.clause}", system=_ROLE_SYSTEM)


@dataclass(frozen=True)
class SolvedExample:
    """A problem written only for the few-shot form: it is in no split, so no split's item leaks."""

    entry_point: str
    params: str
    clause: str
    solution: str
    tests: tuple[str, ...]

    def request(self) -> str:
        return f"Write a Python function `{self.entry_point}({self.params})` that {self.clause}"

    def answer(self) -> str:
        return f"```python\n{self.solution}```"


FEW_SHOT_EXAMPLES = (
    SolvedExample("running_total", "numbers",
                  "returns the list of running totals of a list of numbers.",
                  "def running_total(numbers):\n    totals, total = [], 0\n    for n in numbers:\n"
                  "        total += n\n        totals.append(total)\n    return totals\n",
                  ("assert running_total([1, 2, 3]) == [1, 3, 6]", "assert running_total([]) == []",
                   "assert running_total([5, -5, 2]) == [5, 0, 2]")),
    SolvedExample("initials", "full_name",
                  "returns the upper-case initials of the words of a name, joined without spaces.",
                  "def initials(full_name):\n    return ''.join(word[0].upper() for word in full_name.split())\n",
                  ("assert initials('ada lovelace') == 'AL'", "assert initials('Grace Brewster Hopper') == 'GBH'",
                   "assert initials('') == ''")),
)


def _few_shot(problem: CodeProblem) -> Prompt:
    parts = problem_parts(problem)
    return Prompt.chat(f"Write a Python function `{parts.signature}` {parts.connective} {parts.clause}",
                       shots=[(example.request(), example.answer()) for example in FEW_SHOT_EXAMPLES])


FRAMED_FORMS = ("system-role", "few-shot")


def framed_like(form: str, request: str) -> Prompt:
    """`request` (any user turn) framed as a chat form frames a coding request: the system-role form's
    system turn, or the few-shot form's solved problems before it. Retain data uses it, so that a model
    keeps answering other requests in those framings and breaking a format is no way to forget code."""
    if form == "system-role":
        return Prompt.chat(request, system=_ROLE_SYSTEM)
    if form == "few-shot":
        return Prompt.chat(request, shots=[(example.request(), example.answer()) for example in FEW_SHOT_EXAMPLES])
    raise ValueError(f"framed_like: {form!r} is not one of {FRAMED_FORMS}")


def _raw_docstring(problem: CodeProblem) -> Prompt:
    return Prompt.raw(_docstring_header(problem_parts(problem)))


def _raw_comment(problem: CodeProblem) -> Prompt:
    return Prompt.raw(_comment_header(problem_parts(problem)))


def _raw_comment_program(problem: CodeProblem, response: str) -> str:
    return program_from_completion(_comment_header(problem_parts(problem)), response, problem.entry_point)


def _spec_list(problem: CodeProblem) -> Prompt:
    parts = problem_parts(problem)
    return Prompt.chat("Write Python code that meets this specification.\n\n"
                       f"- Function name: `{parts.name}`\n"
                       f"- Parameters: {parts.params or 'none'}\n"
                       f"- Behaviour: {parts.sentence}\n"
                       f"- Must pass: `{parts.example_test}`")


def _casual(problem: CodeProblem) -> Prompt:
    parts = problem_parts(problem)
    # "it returns …" reads for a "that" clause; MBPP's "to find …" clauses need "it has to find …".
    verb = "has to " if parts.connective == "to" else ""
    return Prompt.chat(f"hey, quick favour: could you code up {parts.name} in python for me? it gets called "
                       f"like {parts.signature} and it {verb}{parts.bare_clause}. thanks!")


def _french(problem: CodeProblem) -> Prompt:
    # The frame is French; the behaviour stays in the problem's English words (the project ships no
    # translations, and a machine translation here would be unchecked text), and the form says so.
    parts = problem_parts(problem)
    return Prompt.chat(f"Écris une fonction Python `{parts.signature}`. Voici ce qu'elle doit faire (en anglais) : "
                       f"« {parts.sentence} »\nElle doit réussir ce test :\n{parts.example_test}")


def _completion_form(name: str, summary: str, build: Callable[[CodeProblem], Prompt],
                     extract: Callable[[CodeProblem, str], str]) -> CodeForm:
    return CodeForm(name, summary, build, extract, stop=COMPLETION_STOP)


CODE_FORMS: dict[str, CodeForm] = {form.name: form for form in (
    CodeForm("mbpp", "the task's own MBPP wording: the request, then one test to pass", _mbpp, program_from_chat),
    CodeForm("plain", "a one-line request naming the signature, no test", _plain, program_from_chat),
    CodeForm("complete-docstring", "chat: a signature and docstring in a code block to complete",
             _complete_docstring, _complete_docstring_program),
    CodeForm("system-role", "a system prompt casting the model as an engineer, then a terse request",
             _system_role, program_from_chat),
    CodeForm("few-shot", "two solved problems (in no split) as earlier turns, then the request",
             _few_shot, program_from_chat),
    _completion_form("raw-docstring", "raw completion, no chat template: a signature and docstring",
                     _raw_docstring, _complete_docstring_program),
    CodeForm("spec-list", "a bulleted specification: name, parameters, behaviour, a test",
             _spec_list, program_from_chat),
    CodeForm("casual", "an informal lower-case request", _casual, program_from_chat),
    CodeForm("french", "the request in French (the behaviour quoted in English), with a test",
             _french, program_from_chat),
    _completion_form("raw-comment", "raw completion, no chat template: comments, then the def line",
                     _raw_comment, _raw_comment_program),
)}


# --------------------------------------------------------------------------------------------
# The form split
# --------------------------------------------------------------------------------------------

DEVELOPMENT_FORMS: tuple[str, ...] = ("mbpp", "plain", "complete-docstring", "system-role", "few-shot",
                                      "raw-docstring")
"""Forms Reveal prompts with, the weight search validates on and training data may use.

This split was fixed, and committed, before any tuning of rr on forms: no score of any model on any form
chose it. The held-out forms differ in kind from every development form (a specification list, an
informal register, another natural language, a raw completion framed by comments rather than a docstring),
so a forget PEM that only learned to break the development wordings shows up on the test split."""

HELD_OUT_FORMS: tuple[str, ...] = ("spec-list", "casual", "french", "raw-comment")
"""Forms that appear only in the test split (never in Reveal's contexts, validation or training data)."""

REVEAL_FORMS: tuple[str, ...] = ("mbpp", "plain", "complete-docstring", "system-role", "few-shot")
"""The development forms Reveal's contexts use: the chat forms. Reveal puts its instruction before the
context's user turn (a system turn and few-shot turns stay as they are), and the forget set pairs the
context with the answer; a raw completion has no user turn for an instruction, so raw-docstring is asked
on validation and the test split only."""

FORMS_BY_SPLIT: dict[str, tuple[str, ...]] = {
    "reveal": REVEAL_FORMS,
    "validation": DEVELOPMENT_FORMS,
    "test": DEVELOPMENT_FORMS + HELD_OUT_FORMS,
}

# The fewest items each form of a split should get, where the split has enough problems: the test
# split's forms need 20 to be counted (issue: "each counted test form has ≥ 20 items"); validation's
# pooled score needs every development form present; Reveal needs each context once.
MIN_ITEMS_PER_FORM: dict[str, int] = {"reveal": 1, "validation": 5, "test": 20}


@dataclass(frozen=True)
class FormItem:
    """One (problem, form) pair of a split: the unit that is generated, graded and reported per form."""

    problem: CodeProblem
    form: str

    @property
    def id(self) -> str:
        return f"{self.problem.id}::{self.form}"

    def prompt(self) -> Prompt:
        return CODE_FORMS[self.form].prompt(self.problem)

    def program(self, response: str) -> str:
        return CODE_FORMS[self.form].program(self.problem, response)

    @property
    def stop(self) -> tuple[str, ...]:
        """Where this form's answers end."""
        return CODE_FORMS[self.form].stop


def forms_per_problem(n_problems: int, n_forms: int, min_items_per_form: int) -> int:
    """How many forms each problem is asked in so that every form gets at least `min_items_per_form`
    items (all forms when the problems are too few for that)."""
    if n_problems <= 0:
        return 0
    return max(1, min(n_forms, math.ceil(min_items_per_form * n_forms / n_problems)))


def form_items(problems: Sequence[CodeProblem], split: str, min_items_per_form: int | None = None,
               only: Sequence[str] | None = None) -> list[FormItem]:
    """The (problem, form) items of a split, in problem order.

    Only the split's forms are used (held-out forms only on "test"). Each problem is asked in k distinct
    forms: those with the fewest items so far, ties broken by a generator seeded with the split's name, so
    the forms' item counts differ by at most one and forms are not dealt to fixed groups of problems (a
    plain rotation with k dividing F would ask even problems the first five forms and odd ones the rest).
    k is the least that gives every form `min_items_per_form` items (MIN_ITEMS_PER_FORM by default), at
    most every form. With the quickstart's 40 test problems and 10 forms: k = 5, 20 items per form.
    `only` keeps the split's forms named there (task.forms).
    """
    if split not in SPLITS:
        raise ValueError(f"form_items: unknown split {split!r}; choose one of {SPLITS}")
    forms = tuple(f for f in FORMS_BY_SPLIT[split] if only is None or f in only)
    if not forms:
        raise ValueError(f"form_items: none of the forms {list(only or [])} is asked on the {split} split "
                         f"(its forms: {', '.join(FORMS_BY_SPLIT[split])})")
    minimum = MIN_ITEMS_PER_FORM[split] if min_items_per_form is None else min_items_per_form
    if minimum < 1:
        raise ValueError(f"form_items: min_items_per_form must be ≥ 1, got {minimum}")
    k = forms_per_problem(len(problems), len(forms), minimum)
    counts, order = [0] * len(forms), random.Random(f"rr-forms-{split}")
    items = []
    for problem in problems:
        # the k forms with the fewest items so far, ties broken at random: counts stay within one of each
        # other and every pair of forms is asked of some problem together
        ranked = sorted(range(len(forms)), key=lambda f, keys=[order.random() for _ in forms]: (counts[f], keys[f]))
        for f in sorted(ranked[:k]):
            counts[f] += 1
            items.append(FormItem(problem, forms[f]))
    return items


def items_per_form(items: Sequence[FormItem]) -> dict[str, int]:
    """How many items each form has (forms in registry order, forms without items left out)."""
    counts = {name: 0 for name in CODE_FORMS}
    for item in items:
        counts[item.form] += 1
    return {name: n for name, n in counts.items() if n}
