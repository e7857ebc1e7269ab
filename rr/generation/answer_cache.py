"""Nothing generated twice: a job's generate calls answered from its own cache when the same call was made before.

A key covers everything that decides the answers: the base model (its weights' hash), each composed PEM's content
hash and weight, the prompts in order, every decoding setting, the seeds, the backend, the batch size, the dtype,
device and thread count, and the versions of rr and torch. A whole call is one entry, so a hit returns exactly what
that call returned: answers are never reassembled from other calls, where the batch around a prompt (its padding,
its neighbours) could move a floating-point near-tie. Repeats happen when a weight candidate stopped early is
scored in full, when a killed run is rerun, and when a model already scored is asked the same items again.

Entries live in JOB_DIR/cache/answers (owner-only: they hold forget data), each a JSON file checked on read; a
corrupt entry is recomputed with a one-line warning. The directory is bounded (generation.answer_cache_mb): the
least recently used entries go first. The in-process executor wraps its model in a CachedModel; on Ray the
generator pool (on the driver's node) keeps the cache for the driver's calls and the weight search's trials alike,
under keys that also name the executor, so neither answers for the other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from rr.core.files import atomic_write_text
from rr.core.prompt import Prompt, prompt_to_json
from rr.tasks.base import SamplingParams, per_prompt

log = logging.getLogger("rr")
ANSWER_CACHE_FORMAT = 1  # raise when what decides an answer changes in rr's generators (a decode fix, a new rule)


class AnswerCache:
    """Whole generate calls' answers by key, in `directory` (created 0700), at most `max_bytes` in all."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.hits = self.misses = 0

    @staticmethod
    def key(identity: dict) -> str:
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def get(self, key: str, prompts: int, samples: int) -> list[list[str]] | None:
        path = self._path(key)
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            self.misses += 1
            return None
        except OSError as exc:
            log.warning("answer cache: %s unreadable (%s); generating again", path.name, exc.strerror or exc)
            self.misses += 1
            return None
        try:
            entry = json.loads(raw)
            answers = entry["answers"]
            if entry.get("key") != key or not isinstance(answers, list) or len(answers) != prompts or not all(
                    isinstance(a, list) and len(a) == samples and all(isinstance(t, str) for t in a) for a in answers):
                raise ValueError("its content does not match its key")
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("answer cache: %s is corrupt (%s); generating again", path.name, exc)
            path.unlink(missing_ok=True)
            self.misses += 1
            return None
        os.utime(path)  # recently used: evicted last
        self.hits += 1
        return answers

    @classmethod
    def call_key(cls, identity: dict, prompts: Sequence["str | Prompt"], params: "SamplingParams | Sequence[SamplingParams]",
                 seeds: Sequence[int] | None) -> str:
        """The key of one generate call made under `identity` (the model, its composition, backend and settings)."""
        return cls.key({**identity, "prompts": [prompt_to_json(p) for p in prompts],
                        "params": [asdict(p) for p in params] if isinstance(params, (list, tuple)) else asdict(params),
                        "seeds": None if seeds is None else list(seeds)})

    def put(self, key: str, answers: list[list[str]]) -> None:
        if self.max_bytes <= 0:
            return
        if not self.directory.exists():
            self.directory.mkdir(parents=True, mode=0o700, exist_ok=True)
            os.chmod(self.directory, 0o700)
        text = json.dumps({"key": key, "answers": answers})
        if len(text.encode()) > self.max_bytes:
            return
        atomic_write_text(self._path(key), text)
        os.chmod(self._path(key), 0o600)
        self._evict()

    def _evict(self) -> None:
        entries = []
        for path in self.directory.glob("*.json"):
            try:
                info = path.stat()
            except FileNotFoundError:
                continue
            entries.append((info.st_mtime, info.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size


def composition_identity(composition) -> list:
    """The composed PEMs as the cache keys them: each one's content hash and signed weight."""
    from rr.release.ledger import pem_digest

    return [(pem_digest(weighted.pem), float(weighted.merge_weight)) for weighted in composition]


def base_identity(job, hashes_weights: bool, **settings) -> dict:
    """What decides an answer besides the composition and the call: the format, rr's and torch's versions, the
    model as configured and, with `hashes_weights`, its weights' hash (from the job's model in this process; off
    where the serving process alone holds the weights, e.g. vLLM), and the serving `settings` (backend, batch
    size, device, threads, ...) of the executor that generates."""
    import torch

    import rr
    from rr.release.ledger import tensors_digest

    model = job.config.model
    weights = tensors_digest(sorted(job.model.state_dict().items())) if hashes_weights else None
    return {"format": ANSWER_CACHE_FORMAT, "rr": rr.__version__, "torch": torch.__version__,
            "model": [model.name_or_path, model.revision, model.gguf_file, model.dtype], "weights": weights, **settings}


class CachedModel:
    """A ModelHandle whose generate calls go through `cache` under `identity` (the model and its composition, the
    backend and settings); perplexity and token statistics are computed as before (they are cheap)."""

    def __init__(self, handle, cache: AnswerCache, identity: dict):
        self.handle, self.cache, self.identity = handle, cache, identity

    def generate(self, prompts: Sequence["str | Prompt"], params: "SamplingParams | Sequence[SamplingParams]",
                 seeds: Sequence[int] | None = None) -> list[list[str]]:
        if not prompts:
            return []
        key = self.cache.call_key(self.identity, prompts, params, seeds)
        answers = self.cache.get(key, len(prompts), per_prompt(params, len(prompts))[0].n)
        if answers is None:
            answers = self.handle.generate(prompts, params, seeds)
            self.cache.put(key, [list(a) for a in answers])
        return answers

    def perplexity(self, texts):
        return self.handle.perplexity(texts)

    def token_stats(self, prompts, answers):
        return self.handle.token_stats(prompts, answers)

    def __getattr__(self, name):  # anything else a caller reads of the generator (count_tokens, tokenizer, ...)
        return getattr(self.handle, name)
