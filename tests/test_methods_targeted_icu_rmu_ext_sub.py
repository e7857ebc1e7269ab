"""The release methods beyond fine-tuning (targeted IDK/DPO/AP, ICU, RMU, Ext-Sub): each loss on hand-checked values and a
few steps on a tiny model doing what the method intends."""

import math

import numpy as np
import pytest
import torch
from support import FORGET, RETAIN, char_embed, char_tokenizer, learned_model

from rr.config import CompareConfig, IcuConfig, JobConfig, RmuConfig, TargetedConfig
from rr.errors import RRError
from rr.methods import METHODS, TARGETED_METHODS, get_method
from rr.methods.ext_sub import deficiency, ext_sub_delta
from rr.methods.icu import forgotten, icu_objective, nearest_neighbours, train_icu
from rr.methods.rmu import control_vector, layer_activations, rmu_loss, train_rmu
from rr.methods.targeted import ap_loss, dpo_loss, load_refusals, train_targeted, with_refusals
from rr.core.tokens import collate, encode_examples
from rr.release.pem import response_loss
from rr.tasks.base import Example


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- registry and config ---------------------------------------------------------------------------------

def test_targeted_icu_rmu_and_ext_sub_are_registered_with_their_config_blocks():
    assert set(TARGETED_METHODS) == {"idk+gd", "idk+ap", "dpo", "dpo+gd", "dpo+ap"}
    assert {"icu", "rmu", "ext-sub"} <= set(METHODS)
    assert get_method("idk+ap").forget_loss == "idk" and get_method("idk+ap").retain_loss == "ap"
    config = CompareConfig(methods=["icu", "idk+ap", "rmu", "ext-sub"])
    assert config.icu.learn_weight == 0.5 and config.icu.kl_weight == 1.0  # papers/003 §5.4
    assert config.icu.similarity_threshold == 0.3 and config.icu.bleu_threshold == 0.01
    assert config.ext_sub.weights == [0.5, 1.0, 2.0, 3.0, 4.0]
    with pytest.raises(Exception):
        IcuConfig(similarity="rouge")
    with pytest.raises(Exception):
        CompareConfig(ext_sub={"weights": [0.0]})

    from types import SimpleNamespace

    from rr.compare import method_settings
    job = SimpleNamespace(config=JobConfig())
    assert method_settings(job, config, get_method("icu")) == {"compare.icu": config.icu.model_dump(mode="json")}
    assert method_settings(job, config, get_method("rmu"))["compare.rmu"]["layer"] == 7
    assert method_settings(job, config, get_method("ext-sub"))["release.lora"] == \
        job.config.release.lora.model_dump(mode="json")


# ---- targeted: IDK, DPO, AP --------------------------------------------------------------------------------

def test_ap_and_dpo_losses_by_hand():
    beta = 0.1
    refusal, answer = torch.tensor([math.log(0.25)]), torch.tensor([math.log(0.5)])
    # −(1/β)·log σ(−β·(log p(y'|x) − log p(y|x))) with the log-ratio log ½
    expected = -(1 / beta) * math.log(1 / (1 + math.exp(beta * math.log(0.5))))
    assert ap_loss(refusal, answer, beta).item() == pytest.approx(expected)
    # at the reference DPO is (2/β)·log 2, as NPO
    x = torch.tensor([-3.0, -7.0])
    assert dpo_loss(x, x + 1, x, x + 1, beta).item() == pytest.approx(2 / beta * math.log(2))
    # margin (−1 − (−2)) − (−5 − (−4)) = 2
    value = dpo_loss(torch.tensor([-1.0]), torch.tensor([-5.0]), torch.tensor([-2.0]), torch.tensor([-4.0]), beta)
    assert value.item() == pytest.approx(-(2 / beta) * math.log(1 / (1 + math.exp(-beta * 2))))
    # AP falls as the answer rises above the refusal
    assert ap_loss(refusal, answer + 5, beta) < ap_loss(refusal, answer, beta)


def test_refusals_are_shipped_and_drawn_per_example_with_a_seed():
    refusals = load_refusals("shipped")
    assert len(refusals) == 20 and "I don't know." in refusals
    a, b = with_refusals(FORGET, refusals, 3), with_refusals(FORGET, refusals, 3)
    assert a == b and [e.prompt for e in a] == [e.prompt for e in FORGET]
    assert all(e.response in refusals for e in a)
    with pytest.raises(RRError, match="refusals"):
        load_refusals("/nonexistent/refusals.txt")


def _targeted(**overrides) -> TargetedConfig:
    return TargetedConfig(**{"learning_rate": 1e-2, "batch_size": 4, "epochs": 10, "refusals": "shipped",
                             **overrides})


@pytest.mark.parametrize("method", ["idk+gd", "idk+ap", "dpo"])
def test_targeted_methods_teach_refusals_on_forget_questions(learned_state, method, tmp_path):
    tokenizer, model = char_tokenizer(), learned_model(learned_state)
    refusals = tmp_path / "refusals.txt"
    refusals.write_text("I don't know.\n")
    idk = [Example(e.prompt, "I don't know.") for e in FORGET]
    before_refusal, before_answer = response_loss(model, tokenizer, idk), response_loss(model, tokenizer, FORGET)
    losses = train_targeted(model, tokenizer, FORGET, RETAIN, method, _targeted(refusals=str(refusals)))
    assert len(losses) == 10
    if method.startswith("idk"):
        assert response_loss(model, tokenizer, idk) < before_refusal / 2
    else:  # DPO widens the margin between the refusal and the forget answer
        after_margin = response_loss(model, tokenizer, FORGET) - response_loss(model, tokenizer, idk)
        assert after_margin > (before_answer - before_refusal) + 0.5


def test_answer_preservation_keeps_retain_answers_above_refusals(learned_state, tmp_path):
    """After IDK training with AP, retain questions still prefer their own answers over the refusal (by at least
    as much as with GD, within a margin)."""
    tokenizer = char_tokenizer()
    refusals = tmp_path / "refusals.txt"
    refusals.write_text("I don't know.\n")
    retain_idk = [Example(e.prompt, "I don't know.") for e in RETAIN]
    margins = {}
    for method in ("idk+gd", "idk+ap"):
        model = learned_model(learned_state)
        train_targeted(model, tokenizer, FORGET, RETAIN, method, _targeted(refusals=str(refusals)))
        margins[method] = response_loss(model, tokenizer, retain_idk) - response_loss(model, tokenizer, RETAIN)
    assert margins["idk+ap"] > 0  # the retain answer is still far likelier than the refusal
    assert margins["idk+ap"] > margins["idk+gd"] - 0.5


# ---- ICU ------------------------------------------------------------------------------------------------

def test_knn_pairs_each_forget_sample_with_its_most_similar_pool_sample():
    forget = np.array([[1.0, 0.1], [0.0, 2.0]])
    pool = np.array([[0.0, 1.0], [5.0, 0.0], [1.0, 1.0]])
    assert nearest_neighbours(forget, pool) == [1, 0]  # cosine, not distance: the norm of [5, 0] does not matter


def test_the_forgetting_gate_needs_both_scores_below_their_thresholds():
    assert forgotten([0.1, 0.1, 0.5, 0.5], [0.0, 0.5, 0.0, 0.5], 0.3, 0.01) == [True, False, False, False]


def test_icu_objective_has_no_kl_at_the_start_and_training_forgets(learned_state):
    tokenizer, model = char_tokenizer(), learned_model(learned_state)
    config = IcuConfig(learning_rate=1e-2, batch_size=4, epochs=10, similarity_threshold=-1.0)  # gate never fires
    forget_batch = collate(encode_examples(tokenizer, FORGET, 64), tokenizer.pad_token_id)
    learn_batch = collate(encode_examples(tokenizer, RETAIN, 64), tokenizer.pad_token_id)
    with torch.no_grad():
        losses = icu_objective(config, model, lambda b: model(input_ids=b["input_ids"],
                                                                 attention_mask=b["attention_mask"]).logits,
                               forget_batch, learn_batch)
    assert losses["kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["total"].item() == pytest.approx(losses["forget"].item() + 0.5 * losses["learn"].item(), rel=1e-5)

    before_forget, before_retain = response_loss(model, tokenizer, FORGET), response_loss(model, tokenizer, RETAIN)
    result = train_icu(model, tokenizer, FORGET, RETAIN, config, char_embed)
    assert len(result["step_losses"]) == 10 and len(result["gates"]) == 10 and result["remaining"] == 4
    assert response_loss(model, tokenizer, FORGET) > before_forget + 0.5
    assert response_loss(model, tokenizer, RETAIN) < before_retain + 0.5  # the paired learning holds retain data


def test_icu_drops_forgotten_samples_and_stops_when_none_is_left(learned_state, monkeypatch):
    # The gate's verdict is forced (every sample forgotten after epoch 1): this checks what the loop does with it;
    # `forgotten` itself is tested above. (Thresholds above 1 once forced it; the config now bounds them to 1.)
    import rr.methods.icu as icu

    monkeypatch.setattr(icu, "forgotten", lambda similarities, bleus, *_: [True] * len(similarities))
    tokenizer, model = char_tokenizer(), learned_model(learned_state)
    config = IcuConfig(learning_rate=1e-2, batch_size=2, epochs=5)
    result = train_icu(model, tokenizer, FORGET, RETAIN, config, char_embed)
    assert result["gates"] == [{**result["gates"][0], "epoch": 1, "active": 4, "forgotten": 4}]
    assert len(result["step_losses"]) == 2 and result["remaining"] == 0  # one epoch of 4 / 2 batches
    with pytest.raises(RRError, match="retain pool"):
        train_icu(model, tokenizer, FORGET, [], config, char_embed)


# ---- RMU ------------------------------------------------------------------------------------------------

def test_rmu_loss_by_hand():
    control = torch.tensor([3.0, 4.0])
    forget = torch.tensor([[[3.0, 4.0], [0.0, 0.0]]])  # token 0 is on target, token 1 is masked out
    retain, frozen = torch.tensor([[[1.0, 1.0]]]), torch.tensor([[[1.0, 3.0]]])
    losses = rmu_loss(forget, torch.tensor([[1, 0]]), control, retain, frozen, torch.tensor([[1]]), 10.0)
    assert losses["forget"].item() == pytest.approx(0.0)
    assert losses["retain"].item() == pytest.approx((0 + 4) / 2)
    assert losses["total"].item() == pytest.approx(20.0)
    # masked token counted: ((9 + 16) / 2) averaged with 0 over two tokens
    assert rmu_loss(forget, torch.tensor([[1, 1]]), control, retain, frozen, torch.tensor([[1]]), 0.0)[
        "forget"].item() == pytest.approx(12.5 / 2)
    vector = control_vector(16, 7.0, seed=0)
    assert vector.norm().item() == pytest.approx(7.0) and (vector >= 0).all()
    assert torch.equal(vector, control_vector(16, 7.0, seed=0))


def test_rmu_steers_forget_activations_and_trains_only_the_chosen_down_projections(learned_state):
    tokenizer, model = char_tokenizer(), learned_model(learned_state)
    batch = collate(encode_examples(tokenizer, FORGET, 64), tokenizer.pad_token_id)
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        assert torch.allclose(layer_activations(model, 0, batch), full.hidden_states[1], atol=1e-6)
    config = RmuConfig(layer=1, update_layers=[0, 1], steering_coefficient=10.0, retain_weight=1.0,
                       learning_rate=1e-2, batch_size=4, epochs=15)
    losses = train_rmu(model, tokenizer, FORGET, RETAIN, config)
    assert len(losses) == 15 and losses[-1]["forget"] < losses[0]["forget"] / 2
    changed = {name for name, t in model.state_dict().items() if not torch.equal(t, learned_state[name])}
    assert changed == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    assert not any(p.requires_grad for p in model.parameters())  # flags restored
    with pytest.raises(RRError, match="compare.rmu.layer=9: the model has layers 0 … 1"):
        train_rmu(model, tokenizer, FORGET, RETAIN, RmuConfig(layer=9))
    with pytest.raises(ValueError, match="update_layers"):  # a later layer cannot change the steered one: at load
        RmuConfig(layer=0, update_layers=[1])


# ---- Ext-Sub --------------------------------------------------------------------------------------------

def test_ext_sub_removes_the_anti_experts_shared_direction_by_hand():
    expert, anti = torch.tensor([[1.0, 0.0], [2.0, 2.0]]), torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    d = deficiency(expert, anti)
    # row 0: shared direction (1, 1)/√2, projection of (0, 1) is (½, ½) → deficiency (−½, ½)
    assert d[0].tolist() == pytest.approx([-0.5, 0.5])
    # row 1: the anti-expert row lies on the shared direction: nothing is deficiency
    assert d[1].tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    assert ext_sub_delta(expert, anti, 2.0)[0].tolist() == pytest.approx([2.0, -1.0])
    torch.manual_seed(0)
    e, a = torch.randn(5, 7), torch.randn(5, 7)
    common = e / e.norm(dim=1, keepdim=True) + a / a.norm(dim=1, keepdim=True)
    assert (deficiency(e, a) * common).sum(1).abs().max().item() < 1e-5  # orthogonal to the shared direction
