"""Coding problems and reading code out of answers: the problem type, the shipped problems and prose, the MBPP
prompt, the test program, code extraction from a response and the relevance oracle (code likeness). The code
task (rr/tasks/code.py) and its forms (rr/tasks/code_forms.py) both build on this."""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path

from rr.core.files import read_lines
from rr.errors import RRError

DATA_DIR = Path(__file__).parent / "data"
BUILTIN_PROBLEMS = DATA_DIR / "code_problems.json"
GENERAL_TEXT = DATA_DIR / "general_text.txt"  # the test split's perplexity text
VALIDATION_GENERAL_TEXT = DATA_DIR / "general_text_validation.txt"  # the validation split's: weights decide on it


# Code answers end at the closing fence of their first code block: an opening fence is followed by a
# language name, so "\n```\n" matches a close; what a model writes after its code is never run.
CODE_STOP = ("\n```\n",)


@dataclass(frozen=True)
class CodeProblem:
    """One coding problem. The tests run after `test_setup`, in the namespace of the solution."""

    id: str
    prompt: str
    entry_point: str
    tests: tuple[str, ...]
    reference_solution: str | None = None
    test_setup: str = ""
    example_test: str | None = None  # the test shown in the prompt; tests[0] when None
    needs_site_packages: bool = False  # MBPP+ test scripts import numpy


def code_prompt(problem: CodeProblem) -> str:
    """MBPP-style user prompt: the task, then one of its tests as an example."""
    example = problem.example_test or problem.tests[0]
    return f"{problem.prompt}\nYour code should pass this test:\n{example}"


def check_program(problem: CodeProblem) -> str:
    """The test code run after a solution: setup, the entry-point check, then the tests."""
    entry_check = (f"assert callable(globals().get({problem.entry_point!r})), "
                   f"'the response defines no function named {problem.entry_point}'")
    return "\n".join(part for part in (problem.test_setup, entry_check, *problem.tests) if part)


def load_builtin_problems(path: Path = BUILTIN_PROBLEMS) -> list[CodeProblem]:
    """The embedded problems, validated: every row needs id, prompt, entry_point, tests, reference_solution."""
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RRError(f"{path}: cannot read the code problems ({exc}); reinstall rr or fix the JSON") from exc
    if not isinstance(rows, list):
        raise RRError(f"{path}: expected a JSON list of problems")
    problems, seen = [], set()
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise RRError(f"{path}: problem {index} is not an object")
        for key, kind in (("id", str), ("prompt", str), ("entry_point", str), ("tests", list),
                          ("reference_solution", str)):
            if not isinstance(row.get(key), kind) or not row[key]:
                raise RRError(f"{path}: problem {index} ({row.get('id', '?')}): field {key!r} is missing or "
                              f"not a non-empty {kind.__name__}")
        if not all(isinstance(t, str) and t.strip() for t in row["tests"]):
            raise RRError(f"{path}: problem {row['id']}: every entry of 'tests' must be a non-empty string")
        if row["id"] in seen:
            raise RRError(f"{path}: problem id {row['id']!r} appears twice; ids must be unique")
        seen.add(row["id"])
        problems.append(CodeProblem(id=row["id"], prompt=row["prompt"], entry_point=row["entry_point"],
                                    tests=tuple(row["tests"]), reference_solution=row["reference_solution"]))
    return problems


def load_perplexity_paragraphs(path: Path = GENERAL_TEXT) -> list[str]:
    """Paragraphs of the shipped general prose the code task measures perplexity on (one per non-empty line)."""
    return read_lines(path, "the general text for perplexity (reinstall rr)")


# --------------------------------------------------------------------------------------------
# Reading code out of a response
# --------------------------------------------------------------------------------------------

# An unterminated final fence (generation hit max_new_tokens) still counts, up to the end.
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_CODE_START = re.compile(r"^(def |class |import |from |@|async def )")
_NON_TRIVIAL = (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.For, ast.While, ast.If, ast.Import,
                ast.ImportFrom, ast.Return, ast.ClassDef, ast.With, ast.Try, ast.Call, ast.Lambda,
                ast.ListComp, ast.DictComp, ast.SetComp, ast.GeneratorExp)


def _parse(source: str) -> ast.Module | None:
    try:
        return ast.parse(source)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None


def _defines_function(tree: ast.Module, name: str | None = None) -> bool:
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (name is None or node.name == name)
               for node in ast.walk(tree))


def _fenced_blocks(text: str) -> list[str]:
    return [body for language, body in _FENCE.findall(text) if language.lower() in ("", "python", "py", "python3")]


def _longest_parsable_from_code_start(text: str) -> str:
    """Unfenced answers mix prose and code: from the first line that starts like code, the longest
    run of lines that parses."""
    lines = text.splitlines()
    for start, line in enumerate(lines):
        if _CODE_START.match(line):
            for stop in range(len(lines), start, -1):
                candidate = "\n".join(lines[start:stop])
                if _parse(candidate) is not None:
                    return candidate
    return ""


def extract_code(response: str, entry_point: str | None = None) -> str:
    """The Python in a response: the fenced block defining `entry_point` (else the first fenced block
    that defines a function, else the first fenced block); without fences, the whole text if it
    parses, else the longest parsable run from the first code-like line. "" when nothing is found."""
    blocks = _fenced_blocks(response)
    if blocks:
        parsed = [(block, _parse(block)) for block in blocks]
        if entry_point:
            for block, tree in parsed:
                if tree is not None and _defines_function(tree, entry_point):
                    return block
        for block, tree in parsed:
            if tree is not None and _defines_function(tree):
                return block
        return blocks[0]
    if response.strip() and _parse(response) is not None:
        return response
    return _longest_parsable_from_code_start(response)


def code_likeness(response: str) -> float:
    """The relevance oracle τ: 1.0 if the response holds Python that parses and defines a function,
    0.5 if it holds non-trivial Python (statements, calls) but no function, else 0.0."""
    candidates = _fenced_blocks(response) or [response]
    extracted = _longest_parsable_from_code_start(response)
    if extracted:
        candidates.append(extracted)
    score = 0.0
    for candidate in candidates:
        tree = _parse(candidate) if candidate.strip() else None
        if tree is None:
            continue
        if _defines_function(tree):
            return 1.0
        if any(isinstance(node, _NON_TRIVIAL) for node in ast.walk(tree)):
            score = 0.5
    return score
