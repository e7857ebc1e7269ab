"""General retain data: the base model's answers to the shipped everyday prompts, made once per job."""

from types import SimpleNamespace

import pytest

from rr.errors import RRError
from rr.release.general_retain import general_retain_examples, load_general_prompts


class RecordingExecutor:
    def __init__(self):
        self.calls = []

    def generate(self, prompts, params, seeds=None, composition=None):
        self.calls.append((list(prompts), composition))
        return [[f"answer to: {p}"] for p in prompts]


def _job(tmp_path):
    (tmp_path / "release").mkdir()
    return SimpleNamespace(dir=tmp_path, executor=RecordingExecutor())


def test_shipped_prompts_ask_for_neither_code_nor_arithmetic_nor_the_perplexity_text():
    from rr.tasks.code_problems import load_perplexity_paragraphs

    prompts = load_general_prompts()
    assert len(prompts) >= 60 and len(set(prompts)) == len(prompts)
    assert not any(word in p.lower() for p in prompts for word in ("python", "function", "code", "calculate"))
    paragraphs = " ".join(load_perplexity_paragraphs())
    assert not any(p in paragraphs for p in prompts)


def test_base_model_answers_are_made_once_and_read_back_on_resume(tmp_path):
    job = _job(tmp_path)
    first = general_retain_examples(job, 5, progress=lambda _: None)
    assert [e.prompt for e in first] == load_general_prompts()[:5]
    assert all(e.response == f"answer to: {e.prompt}" for e in first)
    assert job.executor.calls == [(load_general_prompts()[:5], ())]  # the base model: an empty composition
    assert general_retain_examples(job, 5, progress=lambda _: None) == first
    assert len(job.executor.calls) == 1
    assert general_retain_examples(job, 0, progress=lambda _: None) == []


def test_asking_for_more_prompts_than_shipped_names_the_key(tmp_path):
    with pytest.raises(RRError, match="release.general_retain_prompts: 1000 asked"):
        general_retain_examples(_job(tmp_path), 1000, progress=lambda _: None)
