"""The code task (papers/002 §4): forget writing Python, keep arithmetic word problems.

Forget score: pass@1 (greedy) of the model's code on held-out problems, executed in the sandbox
(rr/tasks/sandbox.py). Utility score: exact-match accuracy on arithmetic word problems. Also
reported: perplexity on general prose.

Embedded data (source="builtin"), all written for rr and shipped in rr/tasks/data/:
- code_problems.json: 145 MBPP-style problems (a one-sentence task, the function name, three
  assert tests and a reference solution that a test runs against its own tests);
- arithmetic word problems generated from the seed (rr/tasks/arithmetic.py);
- general_text.txt: encyclopedia-style paragraphs on geography, history, nature and everyday life,
  one per line, for the perplexity check.
With source="hf" the real datasets are used instead (rr/tasks/loaders.py): MBPP for the three
code splits, optionally MBPP+ on the test split, and GSM8K for arithmetic.
"""

from __future__ import annotations

import ast
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rr.errors import RRError
from rr.evaluation.metrics import wilson_interval
from rr.tasks.arithmetic import ArithmeticItem, arithmetic_prompt, generate_arithmetic_splits, is_correct
from rr.tasks.base import SPLITS, Context, Evaluation, Example, ModelHandle, SamplingParams
from rr.tasks.sandbox import SandboxResult, run_many

DATA_DIR = Path(__file__).parent / "data"
BUILTIN_PROBLEMS = DATA_DIR / "code_problems.json"
GENERAL_TEXT = DATA_DIR / "general_text.txt"


# Code answers end at the closing fence of their first code block: an opening fence is followed by a
# language name, so "\n```\n" matches a close; what a model writes after its code is never run.
CODE_STOP = ("\n```\n",)


class CodeTaskConfig(BaseModel):
    """The `task:` block for the code task. Sizes are per split; the splits never overlap."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, str_max_length=4096)  # as rr/config.py's models

    name: Literal["code"] = "code"
    source: Literal["builtin", "hf"] = "builtin"
    n_reveal_contexts: int = Field(40, ge=1, le=10_000, description="coding prompts Reveal answers")
    n_validation: int = Field(20, ge=1, le=10_000, description="problems the weight search scores candidates on")
    n_test: int = Field(40, ge=1, le=10_000, description="problems reports and promotion gates use")
    n_arithmetic_validation: int = Field(60, ge=1, le=10_000)
    n_arithmetic_test: int = Field(200, ge=1, le=10_000)
    n_retain_examples: int = Field(200, ge=1, le=10_000, description="arithmetic items retain PEMs train on")
    n_perplexity_paragraphs: int = Field(40, ge=1, le=10_000)
    max_new_tokens: int = Field(256, ge=1, le=32768, description="generation budget for code answers")
    arithmetic_max_new_tokens: int = Field(128, ge=1, le=32768)
    arithmetic_level: Literal["one-step", "mixed"] = Field(
        "mixed", description="one-step: single add/subtract/multiply problems; mixed: one- and two-step")
    sandbox_timeout_s: float = Field(5.0, gt=0, le=600)
    sandbox_memory_mb: int = Field(512, ge=64, le=65536)
    sandbox_workers: int = Field(2, ge=1, le=256, description="sandboxed test runs in parallel")
    mbpp_plus: bool = Field(False, description="source=hf only: also report pass@1 on MBPP+ for the test split")

    @model_validator(mode="after")
    def _mbpp_plus_needs_hf(self) -> "CodeTaskConfig":
        if self.mbpp_plus and self.source != "hf":
            raise ValueError("task.mbpp_plus needs task.source: hf (MBPP+ is downloaded from the hub)")
        return self


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


def load_general_text(path: Path = GENERAL_TEXT) -> list[str]:
    """Paragraphs of the shipped general prose (one per non-empty line)."""
    try:
        return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as exc:
        raise RRError(f"{path}: cannot read the general text for perplexity ({exc}); reinstall rr") from exc


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


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------

class CodeTask:
    """Forget coding (pass@1 in the sandbox), keep arithmetic (accuracy) and prose (perplexity)."""

    name = "code"
    answer_stop = CODE_STOP

    def __init__(self, config: CodeTaskConfig | None = None, seed: int = 0):
        self.config = config or CodeTaskConfig()
        self.seed = seed
        if self.config.source == "hf":
            self._problems, self._plus = self._hf_problem_splits()
            self._arithmetic, self._retain = self._hf_arithmetic_splits()
        else:
            self._problems, self._plus = self._builtin_problem_splits(), []
            self._arithmetic, self._retain = self._builtin_arithmetic_splits()
        paragraphs = load_general_text()
        if self.config.n_perplexity_paragraphs > len(paragraphs):
            raise RRError(f"task.n_perplexity_paragraphs: {self.config.n_perplexity_paragraphs} asked, "
                          f"{GENERAL_TEXT} has {len(paragraphs)} paragraphs; lower it")
        self._paragraphs = paragraphs[: self.config.n_perplexity_paragraphs]

    # ---- data splits ----------------------------------------------------------------------

    def _sizes(self) -> dict[str, int]:
        c = self.config
        return {"reveal": c.n_reveal_contexts, "validation": c.n_validation, "test": c.n_test}

    def _builtin_problem_splits(self) -> dict[str, list[CodeProblem]]:
        problems = load_builtin_problems()
        sizes = self._sizes()
        if sum(sizes.values()) > len(problems):
            raise RRError(f"task.n_reveal_contexts + task.n_validation + task.n_test = {sum(sizes.values())}, "
                          f"but {BUILTIN_PROBLEMS.name} has {len(problems)} problems; lower them or use source: hf")
        random.Random(f"rr-code-{self.seed}").shuffle(problems)
        splits, start = {}, 0
        for split in SPLITS:
            splits[split] = problems[start:start + sizes[split]]
            start += sizes[split]
        return splits

    def _hf_problem_splits(self) -> tuple[dict[str, list[CodeProblem]], list[CodeProblem]]:
        from rr.tasks.loaders import load_mbpp, load_mbpp_plus

        field = {"reveal": "n_reveal_contexts", "validation": "n_validation", "test": "n_test"}
        source_split = {"reveal": "train", "validation": "validation", "test": "test"}
        splits = {}
        for split, size in self._sizes().items():
            problems = load_mbpp(source_split[split])
            if size > len(problems):
                raise RRError(f"task.{field[split]}: {size} asked, MBPP {source_split[split]} has {len(problems)}")
            random.Random(f"rr-code-{self.seed}-{split}").shuffle(problems)
            splits[split] = problems[:size]
        plus: list[CodeProblem] = []
        if self.config.mbpp_plus:
            # Only MBPP+ problems drawn from MBPP's test split: none of them is a context or validation item.
            test_ids = {p.id.removeprefix("mbpp-") for p in load_mbpp("test")}
            plus = [p for p in load_mbpp_plus() if p.id.removeprefix("mbppplus-") in test_ids]
            random.Random(f"rr-code-{self.seed}-mbppplus").shuffle(plus)
            plus = plus[: self.config.n_test]
        return splits, plus

    def _builtin_arithmetic_splits(self) -> tuple[dict[str, list[ArithmeticItem]], list[ArithmeticItem]]:
        c = self.config
        per_split = max(c.n_retain_examples, c.n_arithmetic_validation, c.n_arithmetic_test, 200)
        generated = generate_arithmetic_splits(self.seed, per_split, c.arithmetic_level)
        retain = generated["train"][: c.n_retain_examples]
        return {"reveal": retain[: c.n_arithmetic_validation],  # diagnostics only: these are retain data
                "validation": generated["validation"][: c.n_arithmetic_validation],
                "test": generated["test"][: c.n_arithmetic_test]}, retain

    def _hf_arithmetic_splits(self) -> tuple[dict[str, list[ArithmeticItem]], list[ArithmeticItem]]:
        from rr.tasks.loaders import load_gsm8k

        c = self.config
        train, test = load_gsm8k("train"), load_gsm8k("test")
        if c.n_retain_examples + c.n_arithmetic_validation > len(train):
            raise RRError(f"task.n_retain_examples + task.n_arithmetic_validation exceed GSM8K train ({len(train)})")
        if c.n_arithmetic_test > len(test):
            raise RRError(f"task.n_arithmetic_test: {c.n_arithmetic_test} asked, GSM8K test has {len(test)}")
        random.Random(f"rr-arithmetic-{self.seed}-train").shuffle(train)
        random.Random(f"rr-arithmetic-{self.seed}-test").shuffle(test)
        retain = train[: c.n_retain_examples]
        validation = train[c.n_retain_examples: c.n_retain_examples + c.n_arithmetic_validation]
        return {"reveal": retain[: c.n_arithmetic_validation], "validation": validation,
                "test": test[: c.n_arithmetic_test]}, retain

    def problems(self, split: str) -> list[CodeProblem]:
        """The coding problems of a split (reveal contexts, validation or test)."""
        return list(self._problems[_check_split(split)])

    def arithmetic_items(self, split: str) -> list[ArithmeticItem]:
        """The arithmetic items `evaluate` scores on a split ("reveal" reuses retain data)."""
        return list(self._arithmetic[_check_split(split)])

    # ---- the Task protocol ----------------------------------------------------------------

    def contexts(self, split: str) -> list[Context]:
        return [Context(id=p.id, prompt=code_prompt(p)) for p in self.problems(split)]

    def exemplars(self) -> list[Example]:
        """Reveal problems with their reference solutions, in split order; Reveal shows the first
        `reveal.n_exemplars` of them to the instruction model."""
        return [Example(prompt=code_prompt(p), response=f"```python\n{p.reference_solution.strip()}\n```")
                for p in self._problems["reveal"] if p.reference_solution]

    def external_forget_examples(self) -> list[Example]:
        """Human-written forget data (the reveal problems' reference solutions) for the external-data
        baseline `pem-external` and the ablation of papers/002 Tables 5–6. Reveal sees only the few it
        shows as exemplars, never as forget data."""
        return self.exemplars()

    def relevance(self, contexts: Sequence[Context], responses: Sequence[str]) -> list[float]:
        if len(contexts) != len(responses):
            raise RRError(f"relevance: {len(contexts)} contexts but {len(responses)} responses; "
                          "pass one response per context")
        return [code_likeness(r) for r in responses]

    def retain_examples(self) -> list[Example]:
        return [Example(prompt=arithmetic_prompt(item.question), response=item.solution) for item in self._retain]

    def evaluate(self, model: ModelHandle, split: str) -> Evaluation:
        """pass@1 (forget score) and arithmetic accuracy (utility score) on `split`, greedy; perplexity
        on the general text. With mbpp_plus, the test split also reports pass@1 on MBPP+."""
        split = _check_split(split)
        c = self.config
        code_results = self._pass_at_1(model, self._problems[split])
        items = self._arithmetic[split]
        answers = _first_completions(model.generate([arithmetic_prompt(i.question) for i in items],
                                                    SamplingParams(max_new_tokens=c.arithmetic_max_new_tokens)),
                                     len(items))
        correct = sum(is_correct(response, item.answer) for response, item in zip(answers, items))
        passed = sum(r.passed for r in code_results)
        n_code, n_arith = len(code_results), len(items)
        pass_at_1 = passed / n_code if n_code else 0.0
        accuracy = correct / n_arith if n_arith else 0.0
        perplexity = float(model.perplexity(self._paragraphs))

        metrics = {"pass@1": pass_at_1, "arithmetic_accuracy": accuracy, "perplexity": perplexity}
        intervals = {"pass@1": wilson_interval(passed, n_code),
                     "arithmetic_accuracy": wilson_interval(correct, n_arith)}
        counts = {"code_problems": n_code, "code_passed": passed, "arithmetic_items": n_arith,
                  "arithmetic_correct": correct, "perplexity_paragraphs": len(self._paragraphs)}
        for status in ("failed", "error", "timeout", "memory"):
            counts[f"code_{status}"] = sum(r.status == status for r in code_results)
        if split == "test" and self._plus:
            plus_results = self._pass_at_1(model, self._plus)
            plus_passed = sum(r.passed for r in plus_results)
            metrics["pass@1_plus"] = plus_passed / len(plus_results)
            intervals["pass@1_plus"] = wilson_interval(plus_passed, len(plus_results))
            counts.update({"plus_problems": len(plus_results), "plus_passed": plus_passed})
        return Evaluation(forget_score=pass_at_1, utility_score=accuracy, metrics=metrics,
                          intervals=intervals, counts=counts)

    def _pass_at_1(self, model: ModelHandle, problems: Sequence[CodeProblem]) -> list[SandboxResult]:
        if not problems:
            return []
        c = self.config
        responses = _first_completions(model.generate([code_prompt(p) for p in problems],
                                                      SamplingParams(max_new_tokens=c.max_new_tokens,
                                                                     stop=self.answer_stop)),
                                       len(problems))
        return self.run_solutions(problems, [extract_code(r, p.entry_point) for r, p in zip(responses, problems)])

    def run_solutions(self, problems: Sequence[CodeProblem], solutions: Sequence[str]) -> list[SandboxResult]:
        """Each solution run against its problem's tests in the sandbox (in input order)."""
        c = self.config
        results: list[SandboxResult | None] = [None] * len(problems)
        # MBPP+ scripts need site-packages (numpy); everything else runs with -S.
        for needs_site in (False, True):
            indices = [i for i, p in enumerate(problems) if p.needs_site_packages == needs_site]
            batch = run_many([(solutions[i], check_program(problems[i])) for i in indices],
                             max_workers=c.sandbox_workers, timeout_s=c.sandbox_timeout_s,
                             memory_mb=c.sandbox_memory_mb, allow_site_packages=needs_site)
            for i, result in zip(indices, batch):
                results[i] = result
        return results  # type: ignore[return-value]


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise RRError(f"unknown split {split!r}; choose one of {SPLITS}")
    return split


def _first_completions(outputs: list[list[str]], expected: int) -> list[str]:
    if len(outputs) != expected:
        raise RRError(f"the model returned {len(outputs)} completion lists for {expected} prompts")
    return [completions[0] if completions else "" for completions in outputs]
