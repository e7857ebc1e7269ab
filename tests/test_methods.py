"""Release methods: each fine-tuning loss on hand-checked logits, and a few steps on a tiny model move the
forget and retain losses the way each method intends."""

import math

import pytest
import torch
from pydantic import ValidationError
from torch.nn import functional as F
from support import FORGET, RETAIN, char_tokenizer, finetune, learned_model

from rr.config import CompareConfig, FineTuneConfig, JobConfig, dump_config, load_config
from rr.errors import RRError
from rr.methods import FINETUNE_METHODS, METHODS, get_method
from rr.methods.finetune import objective, train_unlearning
from rr.methods.losses import (ga_loss, kl_to_reference, me_loss, mean_entropy, nll_loss, npo_loss,
                               sequence_log_probs)
from rr.core.tokens import IGNORE_INDEX, collate, encode_examples
from rr.release.pem import response_loss

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the losses on hand-checked logits -------------------------------------------------------------------

def test_losses_at_uniform_predictions():
    vocab = 8
    logits = torch.zeros(2, 5, vocab)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5], [IGNORE_INDEX, 1, 2, IGNORE_INDEX, IGNORE_INDEX]])
    assert nll_loss(logits, labels).item() == pytest.approx(math.log(vocab))
    assert ga_loss(logits, labels).item() == pytest.approx(-math.log(vocab))
    assert me_loss(logits, labels).item() == pytest.approx(0.0, abs=1e-6)  # uniform is ME's optimum
    assert mean_entropy(logits, labels).item() == pytest.approx(math.log(vocab))
    # sequence log-probs sum the scored tokens: 3 in the first row, 2 in the second
    assert sequence_log_probs(logits, labels).tolist() == pytest.approx([-3 * math.log(vocab), -2 * math.log(vocab)])


def test_at_the_reference_kl_is_zero_and_npo_is_two_log_two_over_beta():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[:, :2] = IGNORE_INDEX
    assert kl_to_reference(logits, logits.clone(), labels).item() == pytest.approx(0.0, abs=1e-6)
    reference = sequence_log_probs(logits, labels)
    for beta in (0.1, 0.5):
        assert npo_loss(logits, labels, reference, beta).item() == pytest.approx(2 / beta * math.log(2), rel=1e-5)


def test_losses_on_a_two_token_case_worked_by_hand():
    # One scored token: the logits at position 0 (p = [1/4, 3/4]) predict label 1 at position 1. The logits
    # at the last position predict nothing and those at an ignored label are never scored: both are noise.
    logits = torch.tensor([[[0.0, math.log(3)], [5.0, -5.0], [9.0, 1.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, IGNORE_INDEX]])
    reference_logits = torch.tensor([[[0.0, 0.0], [-7.0, 2.0], [3.0, 3.0]]])  # p_ref = [1/2, 1/2]
    assert nll_loss(logits, labels).item() == pytest.approx(-math.log(0.75))
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert me_loss(logits, labels).item() == pytest.approx(math.log(2) - entropy)
    assert kl_to_reference(logits, reference_logits, labels).item() == pytest.approx(
        0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75))
    beta, log_ratio = 0.1, math.log(0.75) - math.log(0.5)
    expected = -(2 / beta) * math.log(1 / (1 + math.exp(beta * log_ratio)))  # log σ(−β·ratio)
    reference = sequence_log_probs(reference_logits, labels)
    assert reference.item() == pytest.approx(math.log(0.5))
    assert npo_loss(logits, labels, reference, beta).item() == pytest.approx(expected)


def test_me_is_papers_004_kl_from_the_prediction_to_uniform():
    """Eq. 6 of papers/004 is KL(P_t ‖ U) (= log K − H(P_t), Appendix B), not KL(U ‖ P_t)."""
    torch.manual_seed(1)
    logits = torch.randn(3, 7, 13) * 3
    labels = torch.randint(0, 13, (3, 7))
    labels[0, 3:] = IGNORE_INDEX
    log_p = F.log_softmax(logits[:, :-1], dim=-1)
    per_token = (log_p.exp() * (log_p - math.log(1 / 13))).sum(-1)
    mask = labels[:, 1:] != IGNORE_INDEX
    assert me_loss(logits, labels).item() == pytest.approx(per_token[mask].mean().item(), rel=1e-5)
    assert 0 < me_loss(logits, labels).item() < math.log(13)


def test_npo_is_bounded_where_ga_is_not():
    logits = torch.zeros(1, 3, 4)
    labels = torch.tensor([[IGNORE_INDEX, 0, 1]])
    forgotten = logits.clone()
    forgotten[0, :2, :] = torch.tensor([-300.0, -300.0, 0.0, 0.0])  # labels 0 and 1 all but impossible
    reference = sequence_log_probs(logits, labels)
    assert npo_loss(forgotten, labels, reference).item() == pytest.approx(0.0, abs=1e-3)
    assert ga_loss(forgotten, labels).item() < -299


# ---- registry and config ---------------------------------------------------------------------------------

def test_registry_lists_the_fine_tuning_methods():
    assert set(FINETUNE_METHODS) == {"ga", "ga+gd", "ga+kl", "npo", "npo+gd", "npo+kl", "me+gd"}
    assert get_method("me+gd").forget_loss == "me" and get_method("me+gd").retain_loss == "gd"
    assert [name for name, m in METHODS.items() if m.needs_reference] == ["ga+kl", "npo", "npo+gd", "npo+kl"]
    with pytest.raises(RRError, match="unknown release method 'sgd'.*me\\+gd"):
        get_method("sgd")


def test_compare_config_is_optional_typed_and_strict(tmp_path):
    assert JobConfig().compare is None  # a job without the section is unchanged
    config = CompareConfig()
    assert config.methods == ["reveal-release", "pem-negation", "ga+gd", "npo+gd", "me+gd"]
    assert config.finetune.npo_beta == 0.1 and config.forget_data == "self-generated"
    with pytest.raises(ValidationError, match="unknown release method"):
        CompareConfig(methods=["ga", "gaa"])
    with pytest.raises(ValidationError, match="listed twice"):
        CompareConfig(methods=["ga", "ga"])
    with pytest.raises(ValidationError):
        FineTuneConfig(weights="half")
    path = tmp_path / "job.yaml"
    path.write_text("compare:\n  methods: [me+gd]\n  finetune:\n    weights: full\n    forget_weight: 0.1\n")
    loaded = load_config(path).compare
    assert loaded.methods == ["me+gd"] and loaded.finetune.weights == "full" and loaded.finetune.forget_weight == 0.1
    path.write_text("compare:\n  finetune:\n    npo_betta: 0.2\n")
    with pytest.raises(RRError, match="compare.finetune.npo_betta: unknown key"):
        load_config(path)


# ---- a few steps on a tiny model -------------------------------------------------------------------------

def forget_entropy(model, tokenizer) -> float:
    batch = collate(encode_examples(tokenizer, FORGET, 64), tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return mean_entropy(logits, batch["labels"]).item()


@pytest.mark.parametrize("method", ["ga", "ga+gd", "ga+kl", "npo", "npo+gd", "npo+kl", "me+gd"])
@pytest.mark.parametrize("weights", ["lora", "full"])
def test_a_few_steps_raise_the_forget_loss(learned_state, method, weights):
    tokenizer, model = char_tokenizer(), learned_model(learned_state)
    before = response_loss(model, tokenizer, FORGET)
    config = finetune(weights=weights, learning_rate=1e-2 if weights == "lora" else 1e-3)
    result = train_unlearning(model, tokenizer, FORGET, RETAIN, method, config)
    assert result.steps == 10 and result.forget_examples == 4
    assert result.retain_examples == (4 if get_method(method).retain_loss else 0)
    assert response_loss(model, tokenizer, FORGET) > before + 0.5


def test_me_raises_the_entropy_of_forget_predictions(learned_state):
    tokenizer, model = char_tokenizer(), learned_model(learned_state)
    before = forget_entropy(model, tokenizer)
    result = train_unlearning(model, tokenizer, FORGET, RETAIN, "me+gd", finetune())
    assert forget_entropy(model, tokenizer) > before + 0.3
    assert result.step_losses[-1]["forget"] < result.step_losses[0]["forget"]  # KL to uniform falls


def test_the_retain_terms_protect_retain_data(learned_state):
    """Same steps and seed: GD keeps the retain NLL lower, KL keeps the retain predictions closer to the start."""
    tokenizer = char_tokenizer()
    reference = learned_model(learned_state)
    retain_batch = collate(encode_examples(tokenizer, RETAIN, 64), tokenizer.pad_token_id)

    def retain_kl(model):
        with torch.no_grad():
            return kl_to_reference(model(input_ids=retain_batch["input_ids"]).logits,
                                   reference(input_ids=retain_batch["input_ids"]).logits, retain_batch["labels"]).item()

    after = {}
    for method in ("ga", "ga+gd", "ga+kl"):
        model = learned_model(learned_state)
        train_unlearning(model, tokenizer, FORGET, RETAIN, method, finetune())
        after[method] = (response_loss(model, tokenizer, RETAIN), retain_kl(model))
    assert after["ga+gd"][0] < after["ga"][0] / 3
    # Gradient ascent is chaotic: the KL ratio moves with the CPU's float kernels (about 1/2.3 on one 2-core machine,
    # under 1/3 on another), so the margin asserted is a half.
    assert after["ga+kl"][1] < after["ga"][1] / 2


def test_lora_is_merged_and_the_model_keeps_its_shape(learned_state):
    tokenizer, model = char_tokenizer(), learned_model(learned_state)
    flags = [p.requires_grad for p in model.parameters()]
    result = train_unlearning(model, tokenizer, FORGET, RETAIN, "npo+kl", finetune(max_steps=2))
    assert result.steps == 2 and len(result.step_losses) == 2 and result.wall_time_s > 0
    assert set(model.state_dict()) == set(learned_state)  # no LoRA modules left: merged into the Linears
    assert not hasattr(model, "peft_config") and not model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, learned_state[name])}
    assert changed and all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in changed)

    full = learned_model(learned_state)
    train_unlearning(full, tokenizer, FORGET, RETAIN, "npo+kl", finetune(weights="full", max_steps=2))
    assert any("mlp" in name and not torch.equal(tensor, learned_state[name])
               for name, tensor in full.state_dict().items())


def test_runs_are_seeded(learned_state):
    tokenizer = char_tokenizer()
    runs = []
    for _ in range(2):
        model = learned_model(learned_state)
        runs.append(train_unlearning(model, tokenizer, FORGET, RETAIN, "me+gd", finetune(max_steps=3), seed=5))
    assert runs[0].step_losses == runs[1].step_losses


def test_bad_inputs_fail_clearly_and_leave_the_model(learned_state):
    tokenizer, model = char_tokenizer(), learned_model(learned_state)
    with pytest.raises(RRError, match="needs retain data"):
        train_unlearning(model, tokenizer, FORGET, [], "me+gd", finetune())
    with pytest.raises(RRError, match="unknown release method"):
        train_unlearning(model, tokenizer, FORGET, RETAIN, "dpoo", finetune())
    with pytest.raises(RRError, match="run by rr/methods/targeted"):
        train_unlearning(model, tokenizer, FORGET, RETAIN, "dpo", finetune())
    with pytest.raises(RRError, match="lora_target_modules"):
        train_unlearning(model, tokenizer, FORGET, RETAIN, "ga", finetune(lora_target_modules=["nope_proj"]))
    assert all(torch.equal(t, learned_state[name]) for name, t in model.state_dict().items())
    train_unlearning(model, tokenizer, FORGET, [], "ga", finetune(max_steps=1))  # no retain term: none needed


def test_me_scores_the_prompt_too_as_papers_004_does(learned_state):
    """papers/004 computes ME over x ∘ y (prompt and response); me_tokens: response keeps to the answer."""
    tokenizer, model = char_tokenizer(), learned_model(learned_state)
    batch = collate(encode_examples(tokenizer, FORGET, 64), tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        every_token = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        losses = {tokens: objective(get_method("me+gd"), finetune(me_tokens=tokens), model, None, batch,
                                    batch)["forget"].item() for tokens in ("all", "response")}
    assert losses["all"] == pytest.approx(me_loss(logits, every_token).item(), rel=1e-5)
    assert losses["response"] == pytest.approx(me_loss(logits, batch["labels"]).item(), rel=1e-5)
    assert losses["all"] != pytest.approx(losses["response"], rel=1e-2)


def test_jobs_without_a_compare_section_dump_as_before(tmp_path):
    """A job directory saved before the section existed resumes: its config.yaml is byte-for-byte unchanged."""
    assert "compare" not in dump_config(JobConfig())
    config = JobConfig(compare=CompareConfig(methods=["me+gd"]))
    path = tmp_path / "job.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config
