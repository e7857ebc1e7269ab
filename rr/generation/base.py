"""The Generator protocol every backend implements, and how per-request seeds are derived."""

from __future__ import annotations

import hashlib
from typing import Protocol, Sequence

from rr.core.prompt import Prompt
from rr.core.tokens import TokenStats
from rr.tasks.base import SamplingParams


def request_seed(*parts: object) -> int:
    """A stable 63-bit seed from (arm or candidate, context, sample index, ...), independent of batching."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF_FFFF_FFFF


def tidy_answer(text: str, prompt: "str | Prompt") -> str:
    """An answer as the tasks receive it: stripped, except that a raw completion keeps its leading
    whitespace (it continues the prompt's text, e.g. the indented body under a `def` line)."""
    if isinstance(prompt, Prompt) and prompt.is_completion:
        return text.rstrip()
    return text.strip()


class Generator(Protocol):
    """Answers prompts in batches (a str is one user turn; a Prompt a chat or raw completion); implements the
    tasks' ModelHandle too."""

    per_prompt_params: bool  # True: generate takes one SamplingParams per prompt

    def generate(self, prompts: Sequence[str | Prompt], params: "SamplingParams | Sequence[SamplingParams]",
                 seeds: Sequence[int] | None = None) -> list[list[str]]:
        """`params.n` completions per prompt; sample j of prompt i is seeded by request_seed(seeds[i], j). `params`
        may be a list, one per prompt (rr.tasks.base.per_prompt): each prompt then ends at its own stop strings and
        max_new_tokens, and a batch shrinks as its answers end."""

    def perplexity(self, texts: Sequence[str]) -> float:
        """Token-level perplexity of plain texts."""

    def token_stats(self, prompts: Sequence[str | Prompt], answers: Sequence[str]) -> list[TokenStats]:
        """Per-token statistics of each answer after its prompt (rr.core.tokens.TokenStats)."""
