"""PEM training: response-only loss, seeded, trains on top of a composed model, leaves the model as it was."""

import json
import sys

import pytest
import torch
from pydantic import ValidationError
from support import FORGET, RETAIN, char_tokenizer, learned_model, tiny_model

from rr.config import LoraTrainingConfig
from rr.errors import RRError
from rr.release.ledger import ComposedModel, Pem
from rr.core.tokens import IGNORE_INDEX, encode_example
from rr.release.pem import response_loss, train_pem
from rr.tasks.base import Example

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = [Example(f"what is {i} plus {i}?", f"it is {2 * i}.") for i in range(8)]


def fingerprint(model):
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(input_ids=ids).logits


def config(**overrides) -> LoraTrainingConfig:
    return LoraTrainingConfig(**{"epochs": 4, "learning_rate": 1e-2, "batch_size": 4, **overrides})


def test_config_rejects_unknown_keys_and_bad_stages():
    with pytest.raises(ValidationError):
        LoraTrainingConfig(rnak=8)
    with pytest.raises(ValidationError):
        LoraTrainingConfig(deepspeed_stage=1)


def test_prompt_tokens_are_masked_and_the_response_is_the_assistant_turn():
    tokenizer = char_tokenizer()
    ids, labels = encode_example(tokenizer, Example("hi?", "yo"), max_length=64)
    assert tokenizer.decode(ids) == "<|user|>hi?</s>\n<|assistant|>yo</s>\n"
    targets = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(targets) == "yo</s>\n"
    assert labels[:len(ids) - len(targets)] == [IGNORE_INDEX] * (len(ids) - len(targets))
    plain_ids, plain_labels = encode_example(tokenizer, Example("hi?", "yo"), max_length=64, chat_template=False)
    assert tokenizer.decode(plain_ids) == "hi?yo</s>"
    assert tokenizer.decode([t for t, label in zip(plain_ids, plain_labels) if label != IGNORE_INDEX]) == "yo</s>"


def test_a_prompts_turns_are_masked_and_a_raw_completion_is_continued_without_the_template():
    from rr.core.prompt import Prompt

    tokenizer = char_tokenizer()
    framed = Prompt.chat("hi?", system="be brief", shots=[("a?", "b")])
    ids, labels = encode_example(tokenizer, Example(framed, "yo"), max_length=128)
    assert tokenizer.decode(ids).endswith("<|user|>hi?</s>\n<|assistant|>yo</s>\n") and "be brief" in tokenizer.decode(ids)
    assert tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX]) == "yo</s>\n"
    raw_ids, raw_labels = encode_example(tokenizer, Example(Prompt.raw("def f():\n"), "    return 1"), max_length=64)
    assert tokenizer.decode(raw_ids) == "def f():\n    return 1</s>"
    assert tokenizer.decode([t for t, label in zip(raw_ids, raw_labels) if label != IGNORE_INDEX]) == "    return 1</s>"


def test_examples_too_long_to_train_on_are_dropped_with_a_warning_that_names_the_fix(caplog):
    from rr.core.tokens import encode_examples

    tokenizer = char_tokenizer()
    with caplog.at_level("WARNING", logger="rr"):
        kept = encode_examples(tokenizer, [Example("x" * 40, "y"), Example("hi?", "yo")], max_length=32)
    assert len(kept) == 1
    assert "1 of 2 training examples dropped" in caplog.text and "release.lora.max_length" in caplog.text


def test_bad_training_data_names_the_fix(tmp_path):
    tokenizer, model = char_tokenizer(), tiny_model()
    with pytest.raises(RRError, match="release.lora.max_length"):
        train_pem(model, tokenizer, [Example("x" * 40, "y")], config(max_length=16), "p", "forget", tmp_path, 0)
    with pytest.raises(RRError, match="at least one training example"):
        train_pem(model, tokenizer, [], config(), "p", "forget", tmp_path, 0)
    tokenizer.chat_template = None
    with pytest.raises(RRError, match="chat_template=False"):
        train_pem(model, tokenizer, EXAMPLES, config(), "p", "forget", tmp_path, 0)
    with pytest.raises(RRError, match="target_modules"):
        train_pem(model, char_tokenizer(), EXAMPLES, config(target_modules=["nope_proj"]), "p", "forget", tmp_path, 0)
    assert not any("lora" in name for name, _ in model.named_modules())  # a failed run unloads too


def test_a_trained_pem_lowers_its_training_loss_and_leaves_the_model_as_it_was(tmp_path):
    tokenizer, model = char_tokenizer(), tiny_model()
    before = fingerprint(model)
    base_loss = response_loss(model, tokenizer, EXAMPLES)

    pem = train_pem(model, tokenizer, EXAMPLES, config(), "step1-forget", "forget", tmp_path / "pem", seed=0)

    assert torch.equal(fingerprint(model), before)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert not any("lora" in name for name, _ in model.named_modules()) and not hasattr(model, "peft_config")
    assert (pem.rank, pem.alpha, pem.target_modules, len(pem.tensors)) == (8, 16.0, ["q_proj", "v_proj"], 4)
    saved = Pem.load(tmp_path / "pem")
    assert (saved.name, saved.kind) == ("step1-forget", "forget")
    assert all(torch.equal(saved.tensors[m][1], b) for m, (_, b) in pem.tensors.items())

    composed = ComposedModel(model)
    composed.append(pem, 1.0)
    assert response_loss(model, tokenizer, EXAMPLES) < base_loss - 0.1
    composed.detach()
    assert torch.equal(fingerprint(model), before)

    again = train_pem(model, tokenizer, EXAMPLES, config(), "again", "forget", tmp_path / "again", seed=0)
    assert all(torch.equal(again.tensors[m][0], a) for m, (a, _) in pem.tensors.items())  # same seed, same PEM


def test_training_on_top_of_a_composed_model_sees_the_composition(tmp_path):
    """The first step's loss (before any update; LoRA B starts at 0) is the composed model's loss, not the base's."""
    tokenizer, model = char_tokenizer(), tiny_model()
    base_loss = response_loss(model, tokenizer, EXAMPLES)
    forget = train_pem(model, tokenizer, EXAMPLES, config(), "step1-forget", "forget", tmp_path / "f", seed=0)
    composed = ComposedModel(model)
    composed.append(forget, -2.0)
    composed_loss = response_loss(model, tokenizer, EXAMPLES)
    assert abs(composed_loss - base_loss) > 0.1
    hooked = fingerprint(model)

    one_step = LoraTrainingConfig(epochs=1, batch_size=len(EXAMPLES))
    train_pem(model, tokenizer, EXAMPLES, one_step, "step2-retain", "retain", tmp_path / "r", seed=1)
    first_loss = json.loads((tmp_path / "r" / "training.json").read_text())["epoch_losses"][0]
    assert first_loss == pytest.approx(composed_loss, abs=1e-4)
    assert torch.equal(fingerprint(model), hooked)  # hooks intact, nothing left behind
    assert composed.merge_weights == [-2.0]


def negation_shift(model, tokenizer, pem, examples, weight: float = 2.0) -> float:
    """How far applying `pem` with weight −`weight` moves the model's loss on `examples`."""
    before = response_loss(model, tokenizer, examples)
    composed = ComposedModel(model)
    composed.append(pem, -weight)
    after = response_loss(model, tokenizer, examples)
    composed.detach()
    return abs(after - before)


def test_an_anchored_forget_pem_negates_its_data_and_leaves_the_anchors_answers_where_they_were(tmp_path,
                                                                                                learned_state):
    """release.forget_anchor on a model that learned FORGET and RETAIN: the same forget data and seed, with and
    without the anchor (RETAIN, held at weight −2). Negated at −2, the plain PEM raises RETAIN's loss by 0.28
    (more than FORGET's); the anchored one moves FORGET as much and RETAIN by about 0.002."""
    tokenizer, model = char_tokenizer(), learned_model(learned_state)
    before = fingerprint(model)
    plain = train_pem(model, tokenizer, FORGET, config(epochs=10), "plain", "forget", tmp_path / "plain", seed=0)
    anchored = train_pem(model, tokenizer, FORGET, config(epochs=10), "anchored", "forget", tmp_path / "anchored",
                         seed=0, anchor=RETAIN, anchor_weight=1.0, anchor_scale=2.0)
    assert torch.equal(fingerprint(model), before)  # the model is left as it was

    assert negation_shift(model, tokenizer, plain, RETAIN) > 0.1
    assert negation_shift(model, tokenizer, anchored, RETAIN) < 0.1 * negation_shift(model, tokenizer, plain, RETAIN)
    assert negation_shift(model, tokenizer, anchored, FORGET) > 0.5 * negation_shift(model, tokenizer, plain, FORGET)
    log = json.loads((tmp_path / "anchored" / "training.json").read_text())
    assert (log["anchor_examples"], log["anchor_weight"], log["anchor_scale"]) == (len(RETAIN), 1.0, 2.0)
    assert len(log["anchor_kl"]) == 10 and log["anchor_kl"][-1] < 0.01


def test_an_anchor_is_for_forget_pems_with_anchor_examples(tmp_path):
    tokenizer, model = char_tokenizer(), tiny_model()
    with pytest.raises(RRError, match="forget PEMs only"):
        train_pem(model, tokenizer, EXAMPLES, config(), "r", "retain", tmp_path, 0, anchor=RETAIN, anchor_weight=1.0)
    with pytest.raises(RRError, match="forget PEMs only"):
        train_pem(model, tokenizer, EXAMPLES, config(), "f", "forget", tmp_path, 0, anchor=(), anchor_weight=1.0)


def test_missing_deepspeed_names_the_setting_and_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed → ImportError
    with pytest.raises(RRError, match=r"release\.lora\.deepspeed_stage=2.*pip install 'rr\[deepspeed\]'"):
        train_pem(tiny_model(), char_tokenizer(), EXAMPLES, config(deepspeed_stage=2), "p", "forget", tmp_path, 0)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_the_same_non_empty_adapter_on_cpu(tmp_path, stage):
    """Single process, gloo. ZeRO-3 partitions the LoRA weights too: extraction must gather them first."""
    pytest.importorskip("deepspeed")
    tokenizer, model = char_tokenizer(), tiny_model()
    composed = ComposedModel(model)
    composed.append(train_pem(model, tokenizer, EXAMPLES, config(epochs=1), "f", "forget", tmp_path / "f", 0), -1.0)
    before = fingerprint(model)
    # 2 micro-batches an epoch, 4 epochs, updates after micro-batches 3, 6 and the last partial group (8)
    plain = train_pem(model, tokenizer, EXAMPLES, config(gradient_accumulation_steps=3), "plain", "retain",
                      tmp_path / "plain", seed=2)
    zero = train_pem(model, tokenizer, EXAMPLES, config(gradient_accumulation_steps=3, deepspeed_stage=stage), "zero",
                     "retain", tmp_path / "zero", seed=2)
    saved = Pem.load(tmp_path / "zero")
    for module, (a, b) in plain.tensors.items():
        assert saved.tensors[module][0].numel() == a.numel() and saved.tensors[module][1].abs().sum() > 0
        torch.testing.assert_close(zero.tensors[module][0], a, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(zero.tensors[module][1], b, atol=1e-5, rtol=1e-4)
    assert torch.equal(fingerprint(model), before)
    assert not any(p.requires_grad for p in model.parameters())
