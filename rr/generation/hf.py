"""Batched generation with transformers: a KV-cached decode loop with per-request seeds (CPU or GPU)."""

from __future__ import annotations

import inspect
from typing import Sequence

import torch

from rr.core import profile
from rr.core.prompt import Prompt, as_prompt
from rr.core.tokens import TokenStats, collate, encode_example, pad_token_id, token_stats_of
from rr.evaluation.metrics import perplexity_from_losses
from rr.generation.base import request_seed, tidy_answer
from rr.tasks.base import Example, SamplingParams, per_prompt


def _stop_token_ids(tokenizer, model) -> set[int]:
    ids = set()
    for candidate in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(candidate, int):
            ids.add(candidate)
        elif isinstance(candidate, (list, tuple)):
            ids.update(candidate)
    for token in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id >= 0:
            ids.add(token_id)
    return ids


def _cache_keyword(model) -> str:
    """The forward argument that takes the KV cache: `cache` from transformers 5.24 (where
    `past_key_values` is deprecated, to be removed in 5.40), `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def _cache_of(out):
    """The KV cache a forward returned, under the name this transformers version gives it."""
    return out["cache"] if "cache" in out else out.past_key_values


def _worth_compacting(finished: torch.Tensor) -> bool:
    """Drop finished rows once they are a quarter of the batch: a smaller batch makes every later step
    cheaper, and the cache copy a compaction costs is paid at most a few times per batch."""
    done = int(finished.sum())
    return done > 0 and 4 * done >= finished.numel()


def _select_rows(cache, keep: torch.Tensor) -> bool:
    """Keep only rows `keep` of a KV cache, in place; False where the cache type cannot (it then stays)."""
    if not hasattr(cache, "batch_select_indices"):
        return False
    cache.batch_select_indices(keep)
    return True


def _pick_next(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator] | None) -> torch.Tensor:
    if params.temperature == 0 or generators is None:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(dim=-1) - sorted_probs < params.top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    # One generator per request: a request's tokens do not depend on what else shares its batch.
    picks = [torch.multinomial(probs[i], 1, generator=generators[i]) for i in range(probs.shape[0])]
    return torch.cat(picks)


class HFGenerator:
    """Generates for chat prompts with whatever adapters/hooks are attached to `model`."""

    per_prompt_params = True  # generate takes one SamplingParams per prompt (rr.tasks.base.per_prompt)

    def __init__(self, model, tokenizer, batch_size: int = 16, system_prompt: str | None = None,
                 max_prompt_tokens: int = 1024, shrink_finished: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.system_prompt = system_prompt
        self.max_prompt_tokens = max_prompt_tokens
        self.shrink_finished = shrink_finished  # False only to measure what shrinking saves (bench/)
        self.device = next(model.parameters()).device
        self.stop_ids = _stop_token_ids(tokenizer, model)
        self.cache_keyword = _cache_keyword(model)

    # ---- prompts -------------------------------------------------------------------------
    def chat_text(self, prompt: "str | Prompt") -> str:
        """The text to tokenize: a str is one user turn (after the generator's system prompt) in the chat
        template; a Prompt renders itself (its own turns, or a raw completion without the template)."""
        return as_prompt(prompt, self.system_prompt).render(self.tokenizer)

    # ---- decoding ------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor,
               params: "SamplingParams | Sequence[SamplingParams]", seeds: Sequence[int] | None = None,
               inputs_embeds: torch.Tensor | None = None, return_last_hidden: bool = False):
        """Decode a left-padded batch; returns token-id lists (and the prompt's last hidden state). With params per
        row, each row ends at its own stop strings and max_new_tokens."""
        batch = attention_mask.shape[0]
        each = per_prompt(params, batch)
        params = each[0]  # how every row samples (per_prompt checked that they agree)
        limits, stops = [p.max_new_tokens for p in each], [p.stop for p in each]
        generators = None
        if params.temperature > 0:
            seeds = seeds if seeds is not None else list(range(batch))
            generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        profile.count(prefill_tokens=int(attention_mask.sum()), prefill_positions=attention_mask.numel())
        out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                         position_ids=position_ids, use_cache=True, output_hidden_states=return_last_hidden,
                         logits_to_keep=1)  # only the last position's logits are needed
        last_hidden = out.hidden_states[-1][:, -1, :].float().cpu() if return_last_hidden else None
        past, logits = _cache_of(out), out.logits[:, -1, :]
        next_position = position_ids[:, -1:] + 1
        # The batch shrinks as requests finish: `rows` maps each live row to its request.
        rows = list(range(batch))
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        tokens: list[list[int]] = [[] for _ in range(batch)]
        stop = torch.tensor(sorted(self.stop_ids), device=self.device)
        for step in range(max(limits, default=0)):
            next_tokens = _pick_next(logits, params, generators)
            live = torch.nonzero(~finished).flatten().tolist()
            for i in live:
                tokens[rows[i]].append(int(next_tokens[i]))
            profile.count(generated_tokens=len(live))
            finished |= torch.isin(next_tokens, stop)
            for i in live:  # a row at its own max_new_tokens is done
                if len(tokens[rows[i]]) >= limits[rows[i]]:
                    finished[i] = True
            if step % 4 == 3 and any(stops):  # decoding every row each step would cost more than it saves
                for i in torch.nonzero(~finished).flatten().tolist():
                    if stops[rows[i]] and any(s in self.tokenizer.decode(tokens[rows[i]]) for s in stops[rows[i]]):
                        finished[i] = True
            if bool(finished.all()):
                break
            keep = torch.nonzero(~finished).flatten() if self.shrink_finished and _worth_compacting(finished) else None
            if keep is not None and _select_rows(past, keep):
                # Finished rows leave the batch: each later step computes only the live ones.
                rows = [rows[i] for i in keep.tolist()]
                attention_mask, next_position = attention_mask[keep], next_position[keep]
                next_tokens, finished = next_tokens[keep], finished[keep]
                generators = [generators[i] for i in keep.tolist()] if generators is not None else None
            next_tokens = next_tokens.masked_fill(finished, self.tokenizer.pad_token_id)
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            profile.count(decode_positions=next_tokens.shape[0])
            out = self.model(input_ids=next_tokens[:, None], attention_mask=attention_mask,
                             position_ids=next_position, use_cache=True, **{self.cache_keyword: past})
            past, logits = _cache_of(out), out.logits[:, -1, :]
            next_position = next_position + 1
        return (tokens, last_hidden) if return_last_hidden else tokens

    def _text(self, token_ids: list[int], stop: tuple[str, ...] = (), prompt: "str | Prompt" = "") -> str:
        """The answer's text: cut after the first stop string and tidied for its prompt (tidy_answer)."""
        ids = [t for t in token_ids if t not in self.stop_ids]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        # Cut right after the first stop string, as vLLM does with include_stop_str_in_output.
        ends = [text.find(s) + len(s) for s in stop if s in text]
        return tidy_answer(text[:min(ends)] if ends else text, prompt)

    def generate(self, prompts: Sequence[str], params: "SamplingParams | Sequence[SamplingParams]",
                 seeds: Sequence[int] | None = None) -> list[list[str]]:
        if not prompts:
            return []
        each = per_prompt(params, len(prompts))
        n = each[0].n
        seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
        requests = [(i, j, self.chat_text(p), request_seed(seeds[i], j))
                    for i, p in enumerate(prompts) for j in range(n)]
        encoded = [self.tokenizer(text, add_special_tokens=False).input_ids[-self.max_prompt_tokens:]
                   for _, _, text, _ in requests]
        # Longest first, so each batch pads little and the slowest batch starts first.
        order = sorted(range(len(requests)), key=lambda k: -len(encoded[k]))
        results: list[list[str]] = [[""] * n for _ in prompts]
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            width = max(len(encoded[k]) for k in chunk)
            pad = self.tokenizer.pad_token_id
            input_ids = torch.tensor([[pad] * (width - len(encoded[k])) + encoded[k] for k in chunk], device=self.device)
            mask = torch.tensor([[0] * (width - len(encoded[k])) + [1] * len(encoded[k]) for k in chunk], device=self.device)
            token_lists = self.decode(input_ids, mask, [each[requests[k][0]] for k in chunk],
                                      [requests[k][3] for k in chunk])
            for k, token_ids in zip(chunk, token_lists):
                i, j = requests[k][0], requests[k][1]
                results[i][j] = self._text(token_ids, each[i].stop, prompts[i])
        return results

    @torch.no_grad()
    def perplexity(self, texts: Sequence[str], max_length: int = 512) -> float:
        total_nll, total_tokens = 0.0, 0
        tokenizer = self.tokenizer
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start:start + self.batch_size])
            encoded = [tokenizer(t, add_special_tokens=False).input_ids[:max_length] for t in chunk]
            width = max(len(e) for e in encoded)
            pad = tokenizer.pad_token_id
            # Right padding here: no generation, and positions then start at 0 for every row.
            input_ids = torch.tensor([e + [pad] * (width - len(e)) for e in encoded], device=self.device)
            mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded], device=self.device)
            profile.count(scored_tokens=int(mask.sum()), scored_positions=mask.numel())
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
            targets = input_ids[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            valid = mask[:, 1:].bool()
            total_nll += float(nll[valid].sum())
            total_tokens += int(valid.sum())
        return perplexity_from_losses(total_nll, total_tokens)

    @torch.no_grad()
    def token_stats(self, prompts: Sequence["str | Prompt"], answers: Sequence[str],
                    max_length: int = 1024) -> list[TokenStats]:
        """Each answer teacher-forced after its prompt, encoded as a PEM trains on it (rr.core.tokens.encode_example;
        the end-of-turn token is the answer's last). Small batches: every position's full distribution is read."""
        if len(prompts) != len(answers):
            raise ValueError(f"token_stats: {len(prompts)} prompts but {len(answers)} answers")
        encoded = [encode_example(self.tokenizer, Example(as_prompt(p, self.system_prompt), a), max_length)
                   for p, a in zip(prompts, answers)]
        out: list[TokenStats] = []
        step = max(1, self.batch_size // 4)
        for start in range(0, len(encoded), step):
            batch = collate(encoded[start:start + step], pad_token_id(self.tokenizer), self.device)
            profile.count(scored_tokens=int(batch["attention_mask"].sum()), scored_positions=batch["attention_mask"].numel())
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            out += token_stats_of(logits, batch["labels"], answers[start:start + step])
        return out

    def count_tokens(self, texts: Sequence[str]) -> int:
        return sum(len(self.tokenizer(t, add_special_tokens=False).input_ids) for t in texts)


def job_generator(job, model=None, tokenizer=None) -> HFGenerator:
    """The transformers generator for a model this process holds, with the job's generation settings: the job's
    own model (Job.generator), a dense copy a method trained or edits in place (it follows the weights), or a
    separate instruction model with its `tokenizer`. The one place a job builds an HFGenerator; models on the
    executor (compositions of PEMs, on Ray replicas too) come from `executor.model(composition)` instead."""
    return HFGenerator(job.model if model is None else model, job.tokenizer if tokenizer is None else tokenizer,
                       batch_size=job.config.generation.batch_size)
