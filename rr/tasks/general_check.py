"""The general check: utility that no retain PEM trained on, judged by trusted rules. Everyday instructions
with a rule each (rr/tasks/data/general_check.jsonl: a word to contain, a line count, a pattern; an answer that
repeats the instruction fails whatever its rule), and a task's
arithmetic test items asked in wordings no split uses (a tutor's system role without the answer instruction,
and a raw question/answer completion). On the test split it is reported beside the task's utility. The
validation split has its own instructions (general_check_validation.jsonl, no item shared with the test
split's), which release.min_general_check_ratio may hold a retain weight to."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from rr.core.prompt import Prompt
from rr.errors import RRError
from rr.evaluation.memorization import words
from rr.evaluation.metrics import wilson_interval
from rr.tasks.arithmetic import ArithmeticItem, is_correct
from rr.tasks.base import SamplingParams

INSTRUCTIONS = {"test": Path(__file__).parent / "data" / "general_check.jsonl",
                "validation": Path(__file__).parent / "data" / "general_check_validation.jsonl"}
RULE_KEYS = {"any", "none", "case", "word", "min_lines", "regex"}
TUTOR_SYSTEM = "You are a patient maths tutor. Work through the problem briefly and state the result."


@dataclass(frozen=True)
class CheckItem:
    """One prompt of the general check and the trusted judgement of an answer to it."""

    id: str
    kind: str  # "instruction" or "arithmetic"
    prompt: Prompt
    judge: Callable[[str], bool]


def _rule_judge(rule: dict) -> Callable[[str], bool]:
    """An answer passes when it meets every key of the rule: `any` (one of these strings, as a substring or
    with `word` as a whole word; case-insensitive unless `case`), `none` (none of these words, each as a whole
    word: the wrong option of "red or blue? Answer in one word", so an answer that names both options hedges
    and fails), `min_lines` (non-empty lines), `regex`."""
    words = rule.get("any", [])
    flags = 0 if rule.get("case") else re.IGNORECASE
    patterns = [re.compile(rf"\b{re.escape(w)}\b" if rule.get("word") else re.escape(w), flags) for w in words]
    excluded = [re.compile(rf"\b{re.escape(w)}\b", flags) for w in rule.get("none", [])]
    pattern = re.compile(rule["regex"]) if "regex" in rule else None

    def judge(answer: str) -> bool:
        if patterns and not any(p.search(answer) for p in patterns):
            return False
        if any(p.search(answer) for p in excluded):
            return False
        if "min_lines" in rule and len([line for line in answer.splitlines() if line.strip()]) < rule["min_lines"]:
            return False
        return pattern is None or bool(pattern.search(answer))

    return judge


def load_instruction_items(path: Path = INSTRUCTIONS["test"]) -> list[CheckItem]:
    """The shipped everyday instructions, validated: each row is {"prompt": str, "rule": {...}}."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise RRError(f"{path}: cannot read the general check ({exc}); reinstall rr") from exc
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise RRError(f"{path}:{number}: not JSON ({exc})") from exc
        rule = row.get("rule") if isinstance(row, dict) else None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(rule, dict) \
                or not rule or set(rule) - RULE_KEYS:
            raise RRError(f"{path}:{number}: expected {{\"prompt\": str, \"rule\": {{...}}}} with rule keys from "
                          f"{sorted(RULE_KEYS)}")
        try:
            judge = _rule_judge(rule)
        except re.error as exc:
            raise RRError(f"{path}:{number}: rule regex does not compile ({exc})") from exc
        items.append(CheckItem(f"instruction-{number}", "instruction", Prompt.chat(row["prompt"]),
                               _not_an_echo(row["prompt"], judge)))
    return items


def _not_an_echo(prompt: str, judge: Callable[[str], bool]) -> Callable[[str], bool]:
    """`judge`, failing every answer that repeats the instruction's first sentence (words compared, case and
    punctuation aside): an echo of "Write a sentence that contains the word 'umbrella'." names the umbrella but
    does not answer, and a model whose unlearning left it echoing would otherwise pass such items."""
    first = " ".join(words(re.split(r"(?<=[.?!])\s", prompt.strip(), maxsplit=1)[0]))

    def judged(answer: str) -> bool:
        return first not in " ".join(words(answer)) and judge(answer)

    return judged


def arithmetic_check_items(items: Sequence[ArithmeticItem]) -> list[CheckItem]:
    """Each arithmetic item in the two wordings no split and no retain example uses."""
    out = []
    for index, item in enumerate(items):
        def judge(answer: str, gold=item.answer) -> bool:
            return is_correct(answer, gold)

        out.append(CheckItem(f"arithmetic-{index}-tutor", "arithmetic", Prompt.chat(item.question, system=TUTOR_SYSTEM),
                             judge))
        out.append(CheckItem(f"arithmetic-{index}-raw", "arithmetic",
                             Prompt.raw(f"Question: {item.question}\nAnswer: The answer is"), judge))
    return out


def run_general_check(model, items: Sequence[CheckItem], max_new_tokens: int) -> tuple[dict, dict, dict]:
    """(metrics, intervals, counts) of the general check on `model` (greedy): the pass rate overall and per
    kind. A raw answer continues "The answer is", so it is judged with that text in front."""
    if not items:
        return {}, {}, {}
    answers = model.generate([item.prompt for item in items], SamplingParams(max_new_tokens=max_new_tokens))
    if len(answers) != len(items):
        raise RRError(f"the model returned {len(answers)} completion lists for {len(items)} prompts")
    passed = {}
    for item, completions in zip(items, answers):
        answer = completions[0] if completions else ""
        if item.prompt.is_completion:
            answer = "The answer is " + answer
        passed[item.id] = (item.kind, bool(item.judge(answer)))
    metrics, intervals, counts = {}, {}, {}
    for name, kinds in (("general_check", ("instruction", "arithmetic")), ("general_check_instructions", ("instruction",)),
                        ("general_check_arithmetic", ("arithmetic",))):
        outcomes = [ok for kind, ok in passed.values() if kind in kinds]
        if not outcomes:
            continue
        metrics[name] = sum(outcomes) / len(outcomes)
        intervals[name] = wilson_interval(sum(outcomes), len(outcomes))
        counts[f"{name}_items"], counts[f"{name}_passed"] = len(outcomes), sum(outcomes)
    return metrics, intervals, counts
