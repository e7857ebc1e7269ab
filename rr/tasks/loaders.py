"""Loaders for the real code-task datasets (MBPP, MBPP+, GSM8K) through `datasets`, as rr records.

They need the Hugging Face hub (or its cache) and the `datasets` package (`pip install rr[datasets]`),
imported only when a loader is called. Each row is converted by a pure function
(`mbpp_row_to_problem`, `mbpp_plus_row_to_problem`, `gsm8k_row_to_item`) into the same records the
builtin data gives (CodeProblem, ArithmeticItem); a row missing a field raises RRError naming the
dataset, the row index and the field.
"""

from __future__ import annotations

import ast
import builtins
import re
from typing import Any, Mapping

from rr.errors import RRError
from rr.tasks.arithmetic import ArithmeticItem, worked_answer
from rr.tasks.code_problems import CodeProblem

MBPP = "google-research-datasets/mbpp"  # config "full": task_id, text, code, test_list, test_setup_code
MBPP_PLUS = "evalplus/mbppplus"  # task_id, code, prompt, source_file, test_imports, test_list, test
GSM8K = "openai/gsm8k"  # config "main": question, answer ("... #### 72")
MBPP_SPLITS = ("train", "validation", "test", "prompt")
GSM8K_SPLITS = ("train", "test")


def load_mbpp(split: str) -> list[CodeProblem]:
    """MBPP (full) problems of one split: train 374, validation 90, test 500, prompt 10."""
    if split not in MBPP_SPLITS:
        raise RRError(f"load_mbpp: unknown split {split!r}; choose one of {MBPP_SPLITS}")
    rows = _load_rows(MBPP, "full", split)
    return [mbpp_row_to_problem(row, i) for i, row in enumerate(rows)]


def load_mbpp_plus() -> list[CodeProblem]:
    """MBPP+ (EvalPlus v0.2, 378 problems): MBPP's base tests plus many generated ones, as one script."""
    rows = _load_rows(MBPP_PLUS, None, "test")
    return [mbpp_plus_row_to_problem(row, i) for i, row in enumerate(rows)]


def load_gsm8k(split: str) -> list[ArithmeticItem]:
    """GSM8K (main) items of one split: train 7473, test 1319."""
    if split not in GSM8K_SPLITS:
        raise RRError(f"load_gsm8k: unknown split {split!r}; choose one of {GSM8K_SPLITS}")
    rows = _load_rows(GSM8K, "main", split)
    return [gsm8k_row_to_item(row, i) for i, row in enumerate(rows)]


def _load_rows(path: str, name: str | None, split: str):
    try:
        import datasets
    except ImportError as exc:
        raise RRError(f"loading {path} needs the `datasets` package: pip install 'rr[datasets]' "
                      "(or set task.source: builtin to use the embedded problems)") from exc
    try:
        return datasets.load_dataset(path, name, split=split)
    except Exception as exc:  # noqa: BLE001 - hub, cache and schema errors all end up here
        raise RRError(f"could not load {path} (config {name!r}, split {split!r}): {exc}. Check network "
                      "access to the Hugging Face hub or a populated HF_HOME cache (HF_HUB_OFFLINE=1 "
                      "uses the cache only), or set task.source: builtin") from exc


def _field(row: Mapping[str, Any], key: str, dataset: str, index: int, kind: type | tuple[type, ...]):
    if key not in row or row[key] is None:
        raise RRError(f"{dataset} row {index}: missing field {key!r} (fields present: {sorted(row)}); "
                      "the dataset's schema may have changed: check the dataset card and its revision")
    value = row[key]
    if not isinstance(value, kind):
        raise RRError(f"{dataset} row {index}: field {key!r} should be {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _string_list(row: Mapping[str, Any], key: str, dataset: str, index: int, non_empty: bool = True) -> list[str]:
    value = _field(row, key, dataset, index, (list, tuple))
    if (non_empty and not value) or not all(isinstance(v, str) for v in value):
        raise RRError(f"{dataset} row {index}: field {key!r} should be a non-empty list of strings")
    return [v.replace("\r\n", "\n") for v in value]


def infer_entry_point(code: str, tests: list[str], dataset: str, index: int) -> str:
    """The function the tests call: the first called name that the reference solution defines
    (MBPP solutions often define helpers too), else the first name the tests call."""
    try:
        defined = [node.name for node in ast.parse(code).body if isinstance(node, ast.FunctionDef)]
    except SyntaxError:
        defined = []
    called: list[str] = []
    for test in tests:
        try:
            tree = ast.parse(test)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id not in called:
                called.append(node.func.id)
    for name in called:
        if name in defined:
            return name
    candidates = [name for name in called if not hasattr(builtins, name) and name not in _TEST_HELPERS]
    if candidates:
        return candidates[0]
    raise RRError(f"{dataset} row {index}: cannot tell which function the tests call "
                  f"(defined: {defined}, called: {called}); this row cannot be scored")


_TEST_HELPERS = {"isclose", "assertion", "is_floats"}


def mbpp_row_to_problem(row: Mapping[str, Any], index: int, dataset: str = MBPP) -> CodeProblem:
    """One MBPP (full) row → CodeProblem: id "mbpp-<task_id>", prompt from `text`, tests from `test_list`."""
    task_id = _field(row, "task_id", dataset, index, int)
    text = _field(row, "text", dataset, index, str).strip()
    code = _field(row, "code", dataset, index, str).replace("\r\n", "\n")
    tests = _string_list(row, "test_list", dataset, index)
    setup = row.get("test_setup_code") or ""
    return CodeProblem(id=f"mbpp-{task_id}", prompt=text, entry_point=infer_entry_point(code, tests, dataset, index),
                       tests=tuple(tests), reference_solution=code, test_setup=str(setup).replace("\r\n", "\n"))


def mbpp_plus_row_to_problem(row: Mapping[str, Any], index: int, dataset: str = MBPP_PLUS) -> CodeProblem:
    """One MBPP+ row → CodeProblem with one check per EvalPlus case: the literal `inputs` and `results`
    lists of the row's `test` script become `assert f(*inp) == out` (floats: math.isclose with EvalPlus's
    tolerances), graded by the trusted side. A script without literal lists stays as it is, and the
    grader fails it closed, naming the shape."""
    task_id = _field(row, "task_id", dataset, index, int)
    prompt = _field(row, "prompt", dataset, index, str)
    code = _field(row, "code", dataset, index, str).replace("\r\n", "\n")
    base_tests = _string_list(row, "test_list", dataset, index)
    imports = _string_list(row, "test_imports", dataset, index, non_empty=False)
    script = _field(row, "test", dataset, index, str).replace("\r\n", "\n")
    if not script.strip():
        raise RRError(f"{dataset} row {index}: field 'test' is empty")
    # The prompt may come as a docstring holding the text and an example assert: keep the text only.
    text = "\n".join(line for line in prompt.strip().strip('"').strip().splitlines()
                     if not line.strip().startswith("assert")).strip()
    entry_point = infer_entry_point(code, base_tests, dataset, index)
    cases = mbpp_plus_cases(script, entry_point)
    tests = tuple(cases) if cases else (script,)
    setup = "\n".join(imports)
    return CodeProblem(id=f"mbppplus-{task_id}", prompt=text, entry_point=entry_point, tests=tests,
                       reference_solution=code, test_setup=setup, example_test=base_tests[0],
                       needs_site_packages="numpy" in setup + ("" if cases else script))


def mbpp_plus_cases(script: str, entry_point: str) -> list[str]:
    """`assert` lines for the cases of an EvalPlus script (`inputs = [...]`, `results = [...]`, both
    literals of equal length); [] when the script does not have that form. EvalPlus compares floats
    with atol 1e-6 (rtol 1e-7) and everything else with ==."""
    try:
        tree = ast.parse(script)
    except SyntaxError:
        return []
    lists: dict[str, Any] = {}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id in ("inputs", "results")):
            try:
                lists[node.targets[0].id] = ast.literal_eval(node.value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                return []
    inputs, results = lists.get("inputs"), lists.get("results")
    if not isinstance(inputs, list) or not isinstance(results, list) or len(inputs) != len(results) or not inputs:
        return []
    tests = []
    for args, expected in zip(inputs, results):
        if not isinstance(args, (list, tuple)):
            return []
        call = f"{entry_point}(*{list(args)!r})"
        if type(expected) is float:
            tests.append(f"assert math.isclose({call}, {expected!r}, rel_tol=1e-07, abs_tol=1e-06)")
        else:
            tests.append(f"assert {call} == {expected!r}")
    return tests


_CALCULATOR = re.compile(r"<<[^<>]*>>")


def gsm8k_row_to_item(row: Mapping[str, Any], index: int, dataset: str = GSM8K) -> ArithmeticItem:
    """One GSM8K row → ArithmeticItem; the worked answer drops the <<calculator>> annotations."""
    question = _field(row, "question", dataset, index, str).strip()
    answer_text = _field(row, "answer", dataset, index, str)
    if "####" not in answer_text:
        raise RRError(f"{dataset} row {index}: field 'answer' has no '#### <number>' final line")
    rationale, final = answer_text.rsplit("####", 1)
    final = final.strip().replace(",", "").replace("$", "")
    try:
        answer = int(final)
    except ValueError:
        raise RRError(f"{dataset} row {index}: the final answer {final!r} after '####' is not an integer") from None
    steps = " ".join(_CALCULATOR.sub("", rationale).split())
    return ArithmeticItem(question=question, answer=answer, solution=worked_answer(steps, answer))
