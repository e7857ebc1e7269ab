"""The answer cache (rr/generation/answer_cache.py): a repeated generate call is answered from the job's cache and
nothing else is; a corrupt entry is recomputed with a warning; the cache stays owner-only and within its bound."""

import json
import logging
import stat

import torch

from rr.generation.answer_cache import AnswerCache, CachedModel
from rr.release.ledger import Pem, pem_digest
from rr.tasks.base import SamplingParams

GREEDY = SamplingParams(max_new_tokens=8)


class CountingModel:
    """Answers each prompt with its own text reversed (n samples), and counts its generate calls."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, params, seeds=None):
        self.calls.append(list(prompts))
        return [[str(p)[::-1]] * params.n for p in prompts]

    def perplexity(self, texts):
        return 1.0


def cached(tmp_path, identity=None, max_bytes=2**20):
    model = CountingModel()
    return model, CachedModel(model, AnswerCache(tmp_path / "cache", max_bytes), identity or {"model": "m"})


def test_the_same_call_is_answered_from_the_cache_and_any_other_call_is_generated(tmp_path):
    model, handle = cached(tmp_path)
    first = handle.generate(["ab", "cd"], GREEDY)
    assert handle.generate(["ab", "cd"], GREEDY) == first == [["ba"], ["dc"]]
    assert len(model.calls) == 1
    handle.generate(["cd", "ab"], GREEDY)                                   # another order: another batch
    handle.generate(["ab", "cd"], SamplingParams(max_new_tokens=9))         # another decoding setting
    handle.generate(["ab", "cd"], GREEDY, seeds=[1, 2])                     # other seeds
    CachedModel(model, handle.cache, {"model": "m", "composition": [["pem", -1.0]]}).generate(["ab", "cd"], GREEDY)
    assert len(model.calls) == 5


def test_a_corrupt_entry_is_generated_again_with_a_one_line_warning(tmp_path, caplog):
    model, handle = cached(tmp_path)
    handle.generate(["ab"], GREEDY)
    (entry,) = (tmp_path / "cache").glob("*.json")
    for corrupt in ("{not json", json.dumps({"key": entry.stem, "answers": [["x"], ["y"]]}),
                    json.dumps({"key": "another key", "answers": [["x"]]})):
        entry.write_text(corrupt)
        with caplog.at_level(logging.WARNING, logger="rr"):
            assert handle.generate(["ab"], GREEDY) == [["ba"]]
        assert "corrupt" in caplog.text and entry.name in caplog.text
        caplog.clear()
    assert len(model.calls) == 4 and json.loads(entry.read_text())["answers"] == [["ba"]]


def test_the_cache_is_owner_only_and_keeps_the_most_recently_used_within_its_bound(tmp_path):
    model, handle = cached(tmp_path, max_bytes=600)
    for word in ("a" * 100, "b" * 100, "c" * 100):
        handle.generate([word], GREEDY)
    handle.generate(["a" * 100], GREEDY)  # a hit makes it the most recently used
    handle.generate(["d" * 100], GREEDY)
    directory = tmp_path / "cache"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = list(directory.glob("*.json"))
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert sum(f.stat().st_size for f in files) <= 600
    kept = {json.loads(f.read_text())["answers"][0][0][0] for f in files}
    assert "a" in kept and "d" in kept and "b" not in kept


def test_a_pems_digest_follows_its_content_not_its_name():
    def pem(name, value):
        return Pem(name, "forget", 1, 1.0, ["q_proj"], {"q_proj": (torch.full((1, 2), value), torch.ones(2, 1))})

    assert pem_digest(pem("a", 1.0)) == pem_digest(pem("b", 1.0)) != pem_digest(pem("a", 2.0))


def test_a_code_candidate_stopped_early_then_scored_in_full_generates_only_what_it_had_not(tmp_path):
    """The code task's early stop ends at an answer batch; scoring the same candidate in full afterwards asks the
    batches already answered again, word for word, so the cache answers them."""
    from rr.tasks.base import StopEarly
    from rr.tasks.code import CodeTask, CodeTaskConfig

    task = CodeTask(CodeTaskConfig(n_validation=4, n_arithmetic_validation=3, n_general_check_validation=2,
                                   forms=["mbpp", "raw-docstring"], min_validation_items_per_form=1), seed=0)
    model, handle = cached(tmp_path)
    stopped = task.evaluate(handle, "validation", stop_early=StopEarly(utility_below=2.0))  # out after arithmetic
    assert stopped.stopped_early["scored"] == {"code": [0, 4], "arithmetic": [3, 3]} and len(model.calls) == 1
    stopped = task.evaluate(handle, "validation", stop_early=StopEarly(forget_above=-1.0))  # out after a code batch
    done, total = stopped.stopped_early["scored"]["code"]
    assert 0 < done < total == 4 and stopped.stopped_early["scored"]["arithmetic"] == [0, 3]
    full = task.evaluate(handle, "validation")
    assert full.stopped_early is None and full.counts["code_items"] == 4
    asked = [tuple(call) for call in model.calls]
    assert len(asked) == len(set(asked)), "a call was generated twice"
    assert full == task.evaluate(CountingModel(), "validation")  # the cache changes no score
