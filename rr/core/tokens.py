"""Tokenisation for training and scoring: (prompt, response) pairs to masked token ids, right-padded batches,
and the shifted (log-prob, target, mask) view every loss and metric reads."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Protocol, Sequence

from rr.core.prompt import Prompt, as_prompt
from rr.errors import RRError

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100  # label value the causal-LM loss skips (prompt and padding tokens)


class PromptResponse(Protocol):
    """What encoding reads from an example (rr.tasks.base.Example is one)."""

    prompt: "str | Prompt"
    response: str


def encode_example(tokenizer, example: PromptResponse, max_length: int,
                   chat_template: bool = True) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with the prompt masked: the prompt is a user turn (or a Prompt's turns), the response
    the assistant's; a raw-completion Prompt is continued by the response, without the chat template."""
    prompt = as_prompt(example.prompt)
    if prompt.is_completion:
        response_text = example.response + (tokenizer.eos_token or "")
        prompt_ids = tokenizer(prompt.render(tokenizer), add_special_tokens=False)["input_ids"]  # as generators do
    elif chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise RRError("the tokenizer has no chat template: train with chat_template=False (plain prompt + "
                          "response), or load the model's instruct tokenizer (model.name_or_path)")
        user = prompt.message_dicts()
        prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": example.response}],
                                                  tokenize=False)
        # Templates render the prompt identically in both; if one does not, the response alone is the target.
        response_text = full_text[len(prompt_text):] if full_text.startswith(prompt_text) else \
            example.response + (tokenizer.eos_token or "")
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    else:
        response_text = example.response + (tokenizer.eos_token or "")
        plain = "\n\n".join(turn.content for turn in prompt.messages)  # every turn's text, no template
        prompt_ids = tokenizer(plain, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return input_ids, labels


def encode_examples(tokenizer, examples: Sequence[PromptResponse], max_length: int,
                    chat_template: bool = True) -> list[tuple[list[int], list[int]]]:
    """Encoded examples that keep at least one response token within max_length."""
    if not examples:
        raise RRError("a PEM needs at least one training example (the forget set or the task's retain data is empty)")
    encoded = [encode_example(tokenizer, e, max_length, chat_template) for e in examples]
    kept = [pair for pair in encoded if any(label != IGNORE_INDEX for label in pair[1])]
    if not kept:
        raise RRError(f"every example's prompt fills release.lora.max_length={max_length} tokens, leaving no "
                      "response token to train on: raise release.lora.max_length")
    if len(kept) < len(encoded):  # said, not silent: a long form (few-shot) can lose its examples this way
        logging.getLogger("rr").warning(
            "%d of %d training examples dropped: their prompt fills max_length=%d tokens, leaving no response token; "
            "raise the max_length setting (release.lora.max_length for PEMs) to train on them",
            len(encoded) - len(kept), len(encoded), max_length)
    return kept


def collate(encoded: Sequence[tuple[list[int], list[int]]], pad_token_id: int,
            device: "torch.device | str" = "cpu") -> "dict[str, torch.Tensor]":
    """Right-padded input_ids / attention_mask / labels (padding is masked out of the loss)."""
    import torch

    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, labs) in enumerate(encoded):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
        labels[row, :len(labs)] = torch.tensor(labs)
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), "labels": labels.to(device)}


def batches(n: int, size: int, generator: "torch.Generator") -> Iterator[list[int]]:
    """Index batches over endless shuffled passes; each pass yields ceil(n / size) batches."""
    import torch

    while True:
        order = torch.randperm(n, generator=generator).tolist()
        for start in range(0, n, size):
            yield order[start:start + size]


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its end-of-sequence token, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


class TokenStatsUnavailable(RRError):
    """A backend that cannot give per-token statistics (vLLM: its prompt log-probs are top-k only)."""


@dataclass(frozen=True)
class TokenStats:
    """One answer's tokens under a model, teacher-forced after its prompt: each token's log-probability, and
    the mean and variance of log p over the vocabulary at its position (μ = Σ p·log p, σ² = Σ p·(log p)² − μ²),
    which MinK++ standardises by. The answer's text rides along (ZLib compresses it)."""

    text: str
    logprobs: tuple[float, ...]
    means: tuple[float, ...]
    variances: tuple[float, ...]

    @property
    def answer_logprob(self) -> float:
        """log P(answer | prompt): the sum over its tokens."""
        return float(sum(self.logprobs))

    @property
    def answer_probability(self) -> float:
        """The mean token probability (papers/004's P)."""
        import math

        return sum(math.exp(lp) for lp in self.logprobs) / len(self.logprobs) if self.logprobs else 0.0


def token_stats_of(logits: "torch.Tensor", labels: "torch.Tensor", texts: Sequence[str]) -> list[TokenStats]:
    """TokenStats of each row of a right-padded batch (the label ≠ IGNORE_INDEX positions are the answer's). Only
    the answer's positions are normalised over the vocabulary: a long prompt costs its forward pass, nothing more."""
    from torch.nn import functional as F

    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    log_probs = F.log_softmax(logits[:, :-1][mask].float(), dim=-1)  # (answer tokens, vocabulary)
    token = log_probs.gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)
    import torch

    probs = log_probs.exp()
    live = probs > 0  # a −inf logit (a masked vocabulary entry) adds nothing, rather than 0·∞ = NaN
    mean = torch.where(live, probs * log_probs, 0.0).sum(-1)
    variance = torch.where(live, probs * (log_probs - mean.unsqueeze(-1)).square(), 0.0).sum(-1)
    out, start = [], 0
    for row, text in enumerate(texts):
        end = start + int(mask[row].sum())
        out.append(TokenStats(text, tuple(token[start:end].tolist()), tuple(mean[start:end].tolist()),
                              tuple(variance[start:end].tolist())))
        start = end
    return out


def shifted(logits: "torch.Tensor", labels: "torch.Tensor") -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
    """(log-probs, targets, mask) of the scored positions: logits at t predict labels at t + 1."""
    from torch.nn import functional as F

    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return log_probs, targets.clamp(min=0), mask
