"""The toxicity task and the toxicity oracles: splits, evaluation numbers, seeds, loaders, config errors."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error

import pytest
from pydantic import ValidationError

from rr.errors import RRError
from rr.generation.base import request_seed
from rr.tasks.base import SPLITS, Task
from rr.tasks.oracles import (LexiconToxicityOracle, PerspectiveOracle, TextClassifierOracle,
                              build_toxicity_oracle, perspective_request_body)
from rr.tasks.registry import build_task
from rr.tasks.toxicity import (CONTINUE_INSTRUCTION, SHIPPED_PROMPTS, ToxicityTask, ToxicityTaskConfig, assign_splits,
                               load_prompt_file, rtp_row_to_prompt, sentence_pairs)

GENERAL_TEXT = "\n\n".join(
    f"Paragraph {i} talks about the weather in town number {i}. It was sunny in the morning of day {i}. "
    f"By the evening of day {i}, light rain had started to fall." for i in range(12))


class FakeModel:
    """A ModelHandle with canned answers: answer(prompt, j) for the j-th time a prompt is asked in a call."""

    def __init__(self, answer, perplexity_value=8.0):
        self.answer = answer
        self.perplexity_value = perplexity_value
        self.calls = []
        self.perplexity_texts = None

    def generate(self, prompts, params, seeds=None):
        self.calls.append((list(prompts), params, list(seeds)))
        seen: dict[str, int] = {}
        out = []
        for prompt in prompts:
            j = seen.get(prompt, 0)
            seen[prompt] = j + 1
            out.append([self.answer(prompt, j) for _ in range(params.n)])
        return out

    def perplexity(self, texts):
        self.perplexity_texts = list(texts)
        return self.perplexity_value


class NumberOracle:
    """Reads the toxicity straight out of the response text ("0.85" → 0.85)."""

    name = "number"

    def score(self, texts):
        return [float(t) for t in texts]


def _write_prompts(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def general_text(tmp_path):
    path = tmp_path / "general.txt"
    path.write_text(GENERAL_TEXT)
    return path


def test_shipped_splits_are_disjoint_cover_everything_and_each_hold_challenge_prompts():
    task = ToxicityTask(ToxicityTaskConfig(), seed=0)
    assert isinstance(task, Task)
    ids = {split: [c.id for c in task.contexts(split)] for split in SPLITS}
    assert len(ids["validation"]) == 24 and len(ids["test"]) == 36
    all_ids = [i for split in SPLITS for i in ids[split]]
    assert len(all_ids) == len(set(all_ids)) == len(load_prompt_file(SHIPPED_PROMPTS))
    for split in SPLITS:
        assert any(p.challenging for p in task.prompts(split)), split
    exemplar_prompts = {e.prompt for e in task.exemplars()}
    assert exemplar_prompts and exemplar_prompts <= {c.prompt for c in task.contexts("reveal")}
    assert all(c.prompt.startswith(CONTINUE_INSTRUCTION + "\n") for c in task.contexts("test"))
    # The split does not depend on the job seed, only on split_seed.
    assert [c.id for c in ToxicityTask(ToxicityTaskConfig(), seed=7).contexts("test")] == ids["test"]


def test_assign_splits_keeps_strata_proportional_and_refuses_an_empty_reveal():
    items = [("c", i) for i in range(10)] + [("n", i) for i in range(30)]
    splits = assign_splits(items, n_validation=8, n_test=20, seed=3, stratum=lambda x: x[0])
    assert sum(x[0] == "c" for x in splits["test"]) == 5
    assert sum(x[0] == "c" for x in splits["validation"]) == 2
    with pytest.raises(RRError, match="n_validation"):
        assign_splits(items, n_validation=20, n_test=20, seed=3)


def test_evaluate_computes_the_rtp_aggregates_for_canned_outputs(tmp_path, general_text):
    rows = [{"id": f"c{i}", "text": f"challenge prefix {i}", "challenging": True} for i in range(3)]
    rows += [{"id": f"n{i}", "text": f"neutral prefix {i}", "challenging": False} for i in range(3)]
    config = ToxicityTaskConfig(prompts=str(_write_prompts(tmp_path / "p.jsonl", rows)), n_validation=1, n_test=4,
                                samples_per_prompt=2, perplexity_text=str(general_text))
    task = ToxicityTask(config, seed=11, oracle=NumberOracle())
    test = task.prompts("test")
    challenge = [p for p in test if p.challenging]
    neutral = [p for p in test if not p.challenging]
    assert len(challenge) == 2 and len(neutral) == 2
    # Hand-set toxicities: per prompt, [sample 0, sample 1].
    canned = {challenge[0].text: [0.9, 0.2], challenge[1].text: [0.3, 0.6],
              neutral[0].text: [0.1, 0.0], neutral[1].text: [0.85, 0.4]}
    model = FakeModel(lambda prompt, j: str(canned[prompt.split("\n", 1)[1]][j]), perplexity_value=8.0)

    result = task.evaluate(model, "test")

    # challenge maxima 0.9, 0.6; non-challenge maxima 0.1, 0.85
    assert result.forget_score == pytest.approx(0.75)
    assert result.metrics["challenge/expected_max_toxicity"] == pytest.approx(0.75)
    assert result.metrics["challenge/toxicity_probability"] == pytest.approx(1.0)
    assert result.metrics["challenge/severe_toxicity_rate"] == pytest.approx(0.5)
    assert result.metrics["non_challenge/expected_max_toxicity"] == pytest.approx(0.475)
    assert result.metrics["non_challenge/toxicity_probability"] == pytest.approx(0.5)
    assert result.metrics["non_challenge/severe_toxicity_rate"] == pytest.approx(0.5)
    assert result.metrics["forget_on_all_prompts"] == 0.0
    assert result.metrics["perplexity"] == 8.0 and result.utility_score == pytest.approx(0.125)
    low, high = result.intervals["challenge/severe_toxicity_rate"]
    assert low < 0.5 < high
    assert result.counts["prompts/challenge"] == 2 and result.counts["samples_per_prompt"] == 2
    # Perplexity is measured on the test share of the general text, never on the reveal share.
    assert model.perplexity_texts == task.general_text("test")
    assert not set(task.general_text("test")) & set(task.general_text("reveal"))


def test_each_prompt_and_sample_gets_its_own_stable_seed(tmp_path, general_text):
    rows = [{"id": f"p{i}", "text": f"prefix {i}", "challenging": i % 2 == 0} for i in range(8)]
    config = ToxicityTaskConfig(prompts=str(_write_prompts(tmp_path / "p.jsonl", rows)), n_validation=2, n_test=3,
                                samples_per_prompt=3, perplexity_text=str(general_text))
    task = ToxicityTask(config, seed=5, oracle=NumberOracle())
    model = FakeModel(lambda prompt, j: "0.0")
    task.evaluate(model, "validation")
    task.evaluate(model, "validation")
    prompts, params, seeds = model.calls[0]
    expected = [request_seed(5, "toxicity-eval", p.id, j) for p in task.prompts("validation") for j in range(3)]
    assert seeds == expected and len(set(seeds)) == 6 and len(prompts) == 6
    assert model.calls[1][2] == seeds  # same split, same seeds: candidates are compared on the same draws
    assert (params.n, params.max_new_tokens, params.temperature, params.top_p) == (1, 20, 1.0, 0.9)
    other = FakeModel(lambda prompt, j: "0.0")
    ToxicityTask(config, seed=6, oracle=NumberOracle()).evaluate(other, "validation")
    assert other.calls[0][2] != seeds


def test_forget_score_falls_back_to_all_prompts_without_challenge_prompts(tmp_path, general_text):
    rows = [{"id": f"n{i}", "text": f"neutral {i}", "challenging": False} for i in range(5)]
    config = ToxicityTaskConfig(prompts=str(_write_prompts(tmp_path / "p.jsonl", rows)), n_validation=1, n_test=2,
                                samples_per_prompt=1, perplexity_text=str(general_text))
    task = ToxicityTask(config, seed=0, oracle=NumberOracle())
    result = task.evaluate(FakeModel(lambda prompt, j: "0.4"), "test")
    assert result.metrics["forget_on_all_prompts"] == 1.0
    assert result.forget_score == pytest.approx(0.4)
    assert "challenge/expected_max_toxicity" not in result.metrics


def test_retain_examples_are_neutral_sentence_pairs_from_the_reveal_share(general_text):
    task = ToxicityTask(ToxicityTaskConfig(perplexity_text=str(general_text)), seed=0)
    examples = task.retain_examples()
    reveal_text = " ".join(task.general_text("reveal"))
    assert examples
    for example in examples:
        assert example.prompt.startswith(CONTINUE_INSTRUCTION + "\n")
        assert example.prompt.split("\n", 1)[1] in reveal_text and example.response in reveal_text
    assert sentence_pairs(["One sentence here is long. Then a second sentence follows it."]) == [
        ("One sentence here is long.", "Then a second sentence follows it.")]


def test_relevance_uses_the_oracle_and_the_task_is_registered():
    task = build_task(ToxicityTaskConfig(), seed=0)
    contexts = task.contexts("reveal")[:2]
    neutral, toxic = task.relevance(contexts, ["The bakery opens at nine.", "Shut up, you stupid idiot."])
    assert neutral == 0.0 and toxic > 0.5


def test_rtp_rows_convert_and_bad_rows_name_index_and_field():
    prompt = rtp_row_to_prompt({"prompt": {"text": " Corruption involving the contractors ", "toxicity": 0.3},
                                "continuation": {"text": "ignored"}, "challenging": False}, 4)
    assert (prompt.id, prompt.text, prompt.challenging) == ("rtp-4", "Corruption involving the contractors", False)
    with pytest.raises(RRError, match=r"row 7.*prompt\.text"):
        rtp_row_to_prompt({"prompt": {"text": ""}, "challenging": True}, 7)
    with pytest.raises(RRError, match=r"row 8.*prompt\.text"):
        rtp_row_to_prompt({"challenging": True}, 8)
    with pytest.raises(RRError, match=r"row 9.*challenging"):
        rtp_row_to_prompt({"prompt": {"text": "hello"}, "challenging": None}, 9)


def test_bad_prompt_files_name_the_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "text": "ok", "challenging": true}\n{"id": "b", "text": "", "challenging": false}\n')
    with pytest.raises(RRError, match=r"bad\.jsonl:2.*'text'"):
        load_prompt_file(path)
    path.write_text('{"id": "a", "text": "ok", "challenging": "yes"}\n')
    with pytest.raises(RRError, match=r"bad\.jsonl:1.*'challenging'"):
        load_prompt_file(path)
    path.write_text("not json\n")
    with pytest.raises(RRError, match=r"bad\.jsonl:1.*JSON"):
        load_prompt_file(path)
    with pytest.raises(RRError, match="task.prompts"):
        ToxicityTask(ToxicityTaskConfig(prompts=str(tmp_path / "missing.jsonl")), seed=0)


def test_missing_general_text_is_a_clear_error(tmp_path):
    task = ToxicityTask(ToxicityTaskConfig(perplexity_text=str(tmp_path / "nope.txt")), seed=0)
    with pytest.raises(RRError, match="task.perplexity_text"):
        task.general_text("test")


@pytest.mark.parametrize("field, value", [("samples_per_prompt", 0), ("max_new_tokens", 0), ("top_p", 1.5),
                                          ("top_p", 0.0), ("temperature", -1.0), ("n_test", 0),
                                          ("oracle", "bogus"), ("oracle", "hf:"), ("oracle_device", "tpu"),
                                          ("unknown_field", 1)])
def test_bad_config_values_fail_naming_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        ToxicityTaskConfig(**{field: value})


def test_greedy_with_many_samples_is_refused():
    with pytest.raises(ValidationError, match="samples_per_prompt"):
        ToxicityTaskConfig(temperature=0.0, samples_per_prompt=5)
    assert ToxicityTaskConfig(temperature=0.0, samples_per_prompt=1).temperature == 0.0


# ---- oracles -------------------------------------------------------------------------------------


def test_lexicon_standin_orders_obvious_cases_and_saturates():
    oracle = LexiconToxicityOracle()
    assert "STAND-IN" in LexiconToxicityOracle.__doc__ and oracle.name == "lexicon-standin"
    neutral, mild, strong, piled = oracle.score([
        "The museum opens a new exhibit about ancient maps next week.",
        "That was a damn long meeting.",
        "You are a stupid idiot.",
        "Shut up, you stupid, worthless idiot. You pathetic loser, everyone hates you."])
    assert neutral == 0.0 < mild < strong < piled < 1.0
    assert strong > 0.5 and piled > 0.9
    assert oracle.score_one("Hello, shell skills and a diet") == 0.0  # whole words only


def test_text_classifier_oracle_returns_the_configured_label_and_loads_lazily():
    calls = []

    def factory(task, model, device, top_k):
        calls.append((task, model, device, top_k))

        def pipe(texts, batch_size, truncation, max_length):
            return [[{"label": "neutral", "score": 0.8}, {"label": "toxic", "score": 0.2}] if "nice" in t else
                    [{"label": "toxic", "score": 0.9}, {"label": "neutral", "score": 0.1}] for t in texts]
        return pipe

    oracle = TextClassifierOracle("some/classifier", label="TOXIC", pipeline_factory=factory)
    assert calls == []
    assert oracle.score(["nice day", "awful"]) == [0.2, 0.9]
    assert oracle.score(["nice"]) == [0.2] and len(calls) == 1
    assert calls[0] == ("text-classification", "some/classifier", "cpu", None)
    wrong = TextClassifierOracle("some/classifier", label="insult", pipeline_factory=factory)
    with pytest.raises(RRError, match=r"oracle_label.*neutral"):
        wrong.score(["x"])


def test_text_classifier_oracle_runs_a_real_pipeline_on_a_tiny_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "you", "are", "an", "idiot", "nice", "day"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=64,
                                     id2label={0: "neutral", 1: "toxic"}, label2id={"neutral": 0, "toxic": 1})
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path)
    texts = ["you are an idiot", "nice day", "nice " * 200, ""]  # the long one must be truncated
    toxic = TextClassifierOracle(str(tmp_path), label="toxic", batch_size=2, max_length=64).score(texts)
    neutral = TextClassifierOracle(str(tmp_path), label="neutral", max_length=64).score(texts)
    assert all(0.0 <= p <= 1.0 for p in toxic)
    assert [a + b for a, b in zip(toxic, neutral)] == pytest.approx([1.0] * 4, abs=1e-5)


class FakeTransport:
    def __init__(self, answers):
        self.answers = list(answers)
        self.requests = []

    def __call__(self, url, body, timeout):
        self.requests.append((url, json.loads(body)))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return json.dumps(answer).encode()


def _perspective_answer(value):
    return {"attributeScores": {"TOXICITY": {"summaryScore": {"value": value, "type": "PROBABILITY"}}}}


def test_perspective_oracle_builds_requests_and_parses_answers(monkeypatch):
    monkeypatch.setenv("RR_TEST_PERSPECTIVE", "secret-key")
    transport = FakeTransport([_perspective_answer(0.73)])
    oracle = PerspectiveOracle("RR_TEST_PERSPECTIVE", min_interval_s=0, transport=transport, sleep=lambda s: None)
    assert oracle.score(["you fool", "   "]) == [0.73, 0.0]  # empty text: no request
    (url, body), = transport.requests
    assert url.endswith("?key=secret-key") and url.startswith("https://commentanalyzer.googleapis.com/")
    assert body["comment"]["text"] == "you fool" and "TOXICITY" in body["requestedAttributes"]
    assert json.loads(perspective_request_body("x"))["languages"] == ["en"]


def test_perspective_oracle_retries_on_429_and_hides_the_key(monkeypatch):
    monkeypatch.setenv("RR_TEST_PERSPECTIVE", "secret-key")
    too_many = urllib.error.HTTPError("https://x?key=secret-key", 429, "quota", {}, None)
    sleeps = []
    transport = FakeTransport([too_many, _perspective_answer(0.1)])
    oracle = PerspectiveOracle("RR_TEST_PERSPECTIVE", min_interval_s=0, transport=transport, sleep=sleeps.append)
    assert oracle.score(["hello"]) == [0.1] and sleeps == [1.0]
    forbidden = urllib.error.HTTPError("https://x?key=secret-key", 403, "denied", {}, None)
    oracle = PerspectiveOracle("RR_TEST_PERSPECTIVE", min_interval_s=0, transport=FakeTransport([forbidden]),
                               sleep=lambda s: None)
    with pytest.raises(RRError, match="403") as error:
        oracle.score(["hello"])
    assert "secret-key" not in str(error.value)
    bad = PerspectiveOracle("RR_TEST_PERSPECTIVE", min_interval_s=0, transport=FakeTransport([{"oops": 1}]))
    with pytest.raises(RRError, match="summaryScore"):
        bad.score(["hello"])


def test_perspective_without_a_key_names_the_variable(monkeypatch):
    monkeypatch.delenv("RR_TEST_PERSPECTIVE", raising=False)
    with pytest.raises(RRError, match="RR_TEST_PERSPECTIVE"):
        PerspectiveOracle("RR_TEST_PERSPECTIVE")


def test_oracle_specs():
    assert isinstance(build_toxicity_oracle("lexicon-standin"), LexiconToxicityOracle)
    hf = build_toxicity_oracle("hf:s-nlp/roberta_toxicity_classifier", label="toxic")
    assert isinstance(hf, TextClassifierOracle) and hf.model_id == "s-nlp/roberta_toxicity_classifier"
    with pytest.raises(RRError, match="task.oracle"):
        build_toxicity_oracle("bogus")


def test_task_modules_do_not_import_torch():
    code = ("import sys, rr.tasks.toxicity, rr.tasks.ner, rr.tasks.oracles; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True)
