"""General retain data: the base model's own answers to everyday prompts, so retain PEMs hold general
language (perplexity) as well as the task's utility data. Generated once per job and kept in its directory."""

from __future__ import annotations

import json
from pathlib import Path

from rr.errors import RRError
from rr.core.files import atomic_write, read_lines
from rr.tasks.base import Example, SamplingParams

GENERAL_PROMPTS = Path(__file__).resolve().parents[1] / "tasks" / "data" / "general_prompts.txt"
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
    prompts = load_general_prompts()
    if count > len(prompts):
        raise RRError(f"release.general_retain_prompts: {count} asked, but {GENERAL_PROMPTS} has {len(prompts)} "
                      "prompts; lower it")
    prompts = prompts[:count]
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
