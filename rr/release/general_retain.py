"""General retain data, so retain PEMs hold general language (perplexity) as well as the task's utility data:
the base model's own answers to everyday prompts (generated once per job and kept in its directory) and
shipped prose paragraphs that no perplexity measurement reads."""

from __future__ import annotations

import json
import re
from pathlib import Path

from rr.errors import RRError
from rr.core.files import atomic_write, read_lines
from rr.core.prompt import Prompt
from rr.tasks.base import Example, SamplingParams

GENERAL_PROMPTS = Path(__file__).resolve().parents[1] / "tasks" / "data" / "general_prompts.txt"
# Project-written prose on topics of its own: shares no 8-word run with general_text.txt (the test split's
# perplexity text) or general_text_validation.txt (the validation split's), which tests/test_general_retain.py checks.
RETAIN_PROSE = Path(__file__).resolve().parents[1] / "tasks" / "data" / "general_text_retain.txt"
ANSWER_TOKENS = 160  # a paragraph: about what a retain example of the code task holds


def load_general_prompts(path: Path = GENERAL_PROMPTS) -> list[str]:
    """The shipped everyday prompts (explain, describe, advise, a short story), one per non-empty line.
    None asks for code or arithmetic, and none is drawn from the perplexity text."""
    return read_lines(path, "the general prompts (reinstall rr)")


def general_retain_examples(job, count: int, progress) -> list[Example]:
    """The base model's greedy answers to the first `count` general prompts (none when 0). Read back from
    release/general_retain.jsonl when a run already made them, so a resumed job trains on the same data."""
    if count == 0:
        return []
    prompts = _first(load_general_prompts(), count, "release.general_retain_prompts", GENERAL_PROMPTS, "prompts")
    path = job.dir / "release" / "general_retain.jsonl"
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if [row["prompt"] for row in rows] == prompts:
            return [Example(row["prompt"], row["response"]) for row in rows]
    progress(f"release: the base model answers {count} general prompts (general retain data)")
    answers = job.executor.generate(prompts, SamplingParams(max_new_tokens=ANSWER_TOKENS), composition=())
    rows = [{"prompt": prompt, "response": texts[0] if texts else ""} for prompt, texts in zip(prompts, answers)]
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(row) + "\n" for row in rows)))
    return [Example(row["prompt"], row["response"]) for row in rows]


def load_retain_prose(path: Path = RETAIN_PROSE) -> list[str]:
    """The shipped retain prose: one paragraph per non-empty line."""
    return read_lines(path, "the retain prose (reinstall rr)")


def prose_retain_examples(count: int) -> list[Example]:
    """The first `count` retain prose paragraphs as raw completions (no chat template, as perplexity reads
    text): the first sentence is the prompt, the rest the response the retain PEM learns to continue with."""
    if count == 0:
        return []
    examples = []
    for paragraph in _first(load_retain_prose(), count, "release.general_retain_paragraphs", RETAIN_PROSE, "paragraphs"):
        match = re.match(r"(.+?[.!?])\s+(\S.*)", paragraph)
        if match is None:
            raise RRError(f"{RETAIN_PROSE}: a paragraph of one sentence ({paragraph[:60]!r}…) leaves nothing to "
                          "continue; reinstall rr")
        examples.append(Example(Prompt.raw(match.group(1)), " " + match.group(2)))
    return examples


def _first(items: list[str], count: int, key: str, path: Path, unit: str) -> list[str]:
    """The first `count` of a shipped list, or an error naming the setting that asked for more."""
    if count > len(items):
        raise RRError(f"{key}: {count} asked, but {path} has {len(items)} {unit}; lower it")
    return items[:count]
