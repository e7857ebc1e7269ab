"""Model resolution errors, a local-directory load, and the batched generator on the real embedded model."""

from pathlib import Path

import pytest

from rr.errors import RRError
from rr.models import resolve_embedder, resolve_model


def test_embedded_defaults_resolve_to_their_wheels():
    source = resolve_model("embedded:smollm2")
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolve_embedder("embedded:all-minilm-l6-v2").endswith("model")
    assert resolve_model("meta-llama/Meta-Llama-3-8B-Instruct").path == "meta-llama/Meta-Llama-3-8B-Instruct"


def test_bad_model_paths_are_named(tmp_path):
    with pytest.raises(RRError, match="unknown embedded model"):
        resolve_model("embedded:gpt5")
    with pytest.raises(RRError, match="GGUF file .* does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(RRError, match="directory .* does not exist"):
        resolve_model(str(tmp_path / "no-such-dir"))
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(RRError, match="not a .gguf"):
        resolve_model(str(tmp_path / "weights.bin"))


@pytest.mark.slow
def test_the_embedded_model_loads_from_its_cached_hf_directory_with_the_gguf_weights(tmp_path, monkeypatch, caplog):
    """load_model_and_tokenizer reads a GGUF model from its HF directory in the model cache (hf_model_dir): the
    same weights, bit for bit, and the same tokens as parsing the GGUF file; a damaged copy is written again."""
    import shutil

    import torch

    from rr import models

    source = models.resolve_model("embedded:smollm2")
    parsed, parsed_tokenizer = models._load(source, "float32", "cpu", None, "HF_TOKEN", "embedded:smollm2")
    cached, cached_tokenizer = models.load_model_and_tokenizer("embedded:smollm2")
    assert cached.config._name_or_path.startswith(str(models.model_cache_dir()))
    expected = parsed.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in cached.state_dict().items())
    text = "<|im_start|>user\nWrite a Python function.<|im_end|>\n```python\ndef f(x):\n    return x\n```"
    assert cached_tokenizer(text).input_ids == parsed_tokenizer(text).input_ids
    assert cached.generation_config.to_dict() == parsed.generation_config.to_dict()

    # A damaged copy (here a truncated weights file, in a cache of this test's own) is removed and written again
    # from the GGUF file: the parse above stands in for the second one (19 s), the rest runs as it is.
    directory = models.hf_model_dir("embedded:smollm2")
    monkeypatch.setenv("RR_MODEL_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "cache" / Path(directory).name
    shutil.copytree(directory, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    real_load, parses = models._load, []
    monkeypatch.setattr(models, "_load", lambda source, *args: parses.append(source) or (
        (parsed, parsed_tokenizer) if source.gguf_file else real_load(source, *args)))
    with caplog.at_level("WARNING", logger="rr"):
        reloaded, _ = models.load_model_and_tokenizer("embedded:smollm2")
    assert "is damaged" in caplog.text and weights.stat().st_size > 4096
    assert [source.gguf_file for source in parses] == [None, source.gguf_file, None]  # damaged, parsed, rewritten
    assert all(torch.equal(tensor, expected[name]) for name, tensor in reloaded.state_dict().items())


@pytest.fixture(scope="module")
def smollm2():
    from rr.generation.hf import HFGenerator
    from rr.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("embedded:smollm2")
    return model, tokenizer, HFGenerator(model, tokenizer, batch_size=8)


def test_local_directory_round_trip(smollm2, tmp_path):
    import torch

    from rr.models import load_model_and_tokenizer

    model, tokenizer, _ = smollm2
    model.save_pretrained(tmp_path / "local")
    tokenizer.save_pretrained(tmp_path / "local")
    loaded, loaded_tokenizer = load_model_and_tokenizer(str(tmp_path / "local"))
    ids = tokenizer("def add(a, b):", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-5)
    assert loaded_tokenizer.padding_side == "left" and loaded_tokenizer.pad_token is not None


@pytest.mark.slow
def test_batched_greedy_equals_one_at_a_time_and_seeds_follow_requests(smollm2):
    from rr.tasks.base import SamplingParams

    _, _, generator = smollm2
    prompts = ["Write a Python function that adds two numbers.", "What is 7 + 5?", "Name a colour.",
               "Write a function to reverse a string in Python."]
    greedy = SamplingParams(max_new_tokens=24)
    batched = generator.generate(prompts, greedy)
    alone = [generator.generate([p], greedy)[0] for p in prompts]
    assert batched == alone
    sampled = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, n=2)
    together = generator.generate(prompts[:2], sampled, seeds=[11, 12])
    first_alone = generator.generate(prompts[:1], sampled, seeds=[11])
    assert together[0] == first_alone[0]
    assert generator.generate(prompts[:1], sampled, seeds=[13])[0] != first_alone[0]


def test_greedy_answers_equal_transformers_generate_with_its_own_cache(smollm2):
    """rr's decode loop (finished rows leave the batch, stop tokens, left padding) answers as transformers'
    generate() does on the same left-padded batch, greedy: the same tokens."""
    import torch

    from rr.tasks.base import SamplingParams

    model, tokenizer, generator = smollm2
    prompts = ["Write a Python function that adds two numbers.", "Name a colour.",
               "Explain in detail how a bicycle works, step by step."]
    ours = generator.generate(prompts, SamplingParams(max_new_tokens=40))
    texts = [generator.chat_text(p) for p in prompts]
    encoded = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    width = max(map(len, encoded))
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=40, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(generator.stop_ids))
    theirs = [generator._text([t for t in row.tolist() if t != tokenizer.pad_token_id], (), p)
              for row, p in zip(out[:, width:], prompts)]
    assert [a[0] for a in ours] == theirs


def test_finished_requests_leave_the_batch_without_changing_any_answer(smollm2, monkeypatch):
    import rr.generation.hf as hf
    from rr.tasks.base import SamplingParams

    _, _, generator = smollm2
    compactions = []
    real_select = hf._select_rows
    monkeypatch.setattr(hf, "_select_rows", lambda cache, keep: compactions.append(len(keep)) or real_select(cache, keep))
    # Short answers end long before the others: the batch drops them and goes on with the rest.
    prompts = ["Reply with the single word: yes.", "Write a Python function that sorts a list of numbers.",
               "Say hi.", "Explain in detail how a bicycle works.", "Reply with the number 4 only."]
    greedy = SamplingParams(max_new_tokens=48)
    batched = generator.generate(prompts, greedy)
    assert compactions, "no request finished early enough for the batch to shrink; pick shorter answers"
    assert all(kept < len(prompts) for kept in compactions)
    compactions.clear()
    assert batched == [generator.generate([p], greedy)[0] for p in prompts]
    sampled = SamplingParams(max_new_tokens=48, temperature=1.0, top_p=0.9)
    together = generator.generate(prompts, sampled, seeds=[1, 2, 3, 4, 5])
    assert [generator.generate([p], sampled, seeds=[s])[0] for p, s in zip(prompts, [1, 2, 3, 4, 5])] == together


@pytest.mark.slow
def test_stop_strings_end_answers_after_the_stop_text(smollm2):
    from rr.tasks.base import SamplingParams

    _, _, generator = smollm2
    prompt = "Write a Python function `square(x)` that returns x squared."
    full = generator.generate([prompt], SamplingParams(max_new_tokens=96))[0][0]
    stopped = generator.generate([prompt], SamplingParams(max_new_tokens=96, stop=("\n```\n",)))[0][0]
    if "\n```\n" in full:
        assert stopped == full[:full.index("\n```\n") + 4].strip()
        assert len(stopped) < len(full)
    else:
        assert stopped == full


@pytest.mark.slow
def test_prompts_with_their_own_stops_and_lengths_answer_in_one_call_as_in_separate_calls(smollm2):
    """generate with one SamplingParams per prompt (the audit's probes: chat forms end at their code block, a raw
    continuation where top-level code resumes, each with its own max_new_tokens): one call, the same answers as each
    prompt's own call; prompts that sample differently cannot share a call."""
    from rr.core.prompt import Prompt
    from rr.tasks.base import SamplingParams
    from rr.tasks.code_forms import CODE_STOP, COMPLETION_STOP

    _, _, generator = smollm2
    prompts = ["Write a Python function `square(x)` that returns x squared.",
               Prompt.raw("User: Write a function that doubles x.\n\nAssistant: Sure.\n\n```python\ndef double(x):\n"),
               "Name a colour.", "Explain in detail how a bicycle works, step by step."]
    params = [SamplingParams(max_new_tokens=64, stop=CODE_STOP), SamplingParams(max_new_tokens=48, stop=COMPLETION_STOP),
              SamplingParams(max_new_tokens=8), SamplingParams(max_new_tokens=24)]
    together = generator.generate(prompts, params)
    assert together == [generator.generate([p], each)[0] for p, each in zip(prompts, params)]
    assert len(generator.tokenizer(together[2][0]).input_ids) <= 8 + 1  # its own limit, not the call's longest
    with pytest.raises(RRError, match="share temperature"):
        generator.generate(prompts[:2], [SamplingParams(), SamplingParams(temperature=0.7)])
