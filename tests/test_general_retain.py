"""General retain data: the base model's answers to the shipped everyday prompts, made once per job, and the
shipped retain prose."""

import re
from types import SimpleNamespace

import pytest

from rr.errors import RRError
from rr.release.general_retain import (general_retain_examples, load_general_prompts, load_retain_prose,
                                      prose_retain_examples)


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


def _word_runs(text: str, n: int = 8) -> set[tuple[str, ...]]:
    words = re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_retain_prose_shares_no_eight_word_run_with_either_perplexity_text():
    """Retain PEMs train on this prose, and perplexity is measured on the other two: a shared run would be a leak."""
    from rr.tasks.code_problems import GENERAL_TEXT, VALIDATION_GENERAL_TEXT, load_perplexity_paragraphs

    prose = load_retain_prose()
    assert len(prose) >= 48 and len(set(prose)) == len(prose)
    retain_runs = _word_runs(" ".join(prose))
    for path in (GENERAL_TEXT, VALIDATION_GENERAL_TEXT):
        measured = _word_runs(" ".join(load_perplexity_paragraphs(path)))
        assert not retain_runs & measured, path
    assert not any(word in p.lower() for p in prose for word in ("python", "function", "code", "calculate"))


def test_retain_prose_becomes_raw_completions_that_rebuild_each_paragraph():
    examples = prose_retain_examples(5)
    assert len(examples) == 5
    for example, paragraph in zip(examples, load_retain_prose()):
        assert example.prompt.is_completion  # no chat template: the text as perplexity reads it
        assert example.prompt.completion + example.response == paragraph
        assert example.prompt.completion.endswith((".", "!", "?")) and example.response.strip()
    assert prose_retain_examples(0) == []
    with pytest.raises(RRError, match="release.general_retain_paragraphs: 1000 asked"):
        prose_retain_examples(1000)


def test_the_release_loop_trains_retain_pems_on_the_configured_prose(tmp_path):
    from rr.config import ReleaseConfig
    from rr.release.stage import job_release_loop
    from rr.tasks.base import Example

    task = SimpleNamespace(retain_examples=lambda: [Example("1 + 1?", "2")])
    config = SimpleNamespace(release=ReleaseConfig(general_retain_prompts=2, general_retain_paragraphs=3), seed=0,
                             model=SimpleNamespace(name_or_path="tiny"))
    job = SimpleNamespace(dir=tmp_path, executor=RecordingExecutor(), task=task, config=config)
    loop = job_release_loop(job, [Example("forget", "this")], progress=lambda _: None)
    examples = loop.make_retain_examples()
    assert [e.prompt for e in examples[:3]] == ["1 + 1?", *load_general_prompts()[:2]]
    assert examples[3:] == prose_retain_examples(3)
