"""The composition ledger: merged == base + Σ w·(α/r)·B·A, and hooks, rank-sum adapter and merged export agree."""

import copy
import json

import pytest
import torch
from peft import PeftModel
from support import tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

from rr.errors import RRError
from rr.release.ledger import (ComposedModel, Ledger, LedgerEntry, Pem, WeightedPem, export_adapter, export_merged,
                               merged_state_dict, rank_sum_adapter)

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ("q_proj", "v_proj")


def random_pem(model, name: str, rank: int, alpha: float, seed: int, targets=TARGETS, kind="forget") -> Pem:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module_name, module in model.named_modules():
        if module_name.rsplit(".", 1)[-1] in targets:
            a = torch.randn(rank, module.in_features, generator=generator) * 0.2
            b = torch.randn(module.out_features, rank, generator=generator) * 0.2
            tensors[module_name] = (a, b)
    return Pem(name, kind, rank, alpha, sorted(targets), tensors)


def mixed_composition(model) -> list[WeightedPem]:
    """Signed weights of both signs and three different ranks (and alphas)."""
    return [WeightedPem(random_pem(model, "f0", 8, 16.0, seed=1), -2.5),
            WeightedPem(random_pem(model, "r1", 4, 4.0, seed=2, kind="retain"), 0.7),
            WeightedPem(random_pem(model, "f2", 2, 8.0, seed=3), -1.0)]


def batch():
    return torch.randint(0, 96, (3, 11), generator=torch.Generator().manual_seed(7))


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_merged_weights_equal_base_plus_weighted_lora_products():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    entries = mixed_composition(model)
    merged = merged_state_dict(model, entries)
    for key, base in before.items():
        module = key.removesuffix(".weight")
        if module not in entries[0].pem.tensors:
            assert torch.equal(merged[key], base), key
            continue
        a_b = [(p.tensors[module][0].double(), p.tensors[module][1].double()) for p, _ in entries]
        expected = base.double() + sum(w * (p.alpha / p.rank) * (b @ a) for (p, w), (a, b) in zip(entries, a_b))
        relative = (merged[key].double() - expected).abs().max() / expected.abs().max()
        assert relative < 1e-5, (key, float(relative))
        assert not torch.equal(merged[key], base)
    for key, base in before.items():  # the caller's live model keeps its weights
        assert torch.equal(model.state_dict()[key], base)


def test_hooks_rank_sum_adapter_and_merged_export_give_the_same_logits(tmp_path):
    base = tiny_model()
    untouched = copy.deepcopy(base)
    entries = mixed_composition(base)
    ids = batch()

    composed = ComposedModel(base)
    for pem, weight in entries:
        composed.append(pem, weight)
    hooked = logits(base, ids)
    assert not torch.allclose(hooked, logits(untouched, ids), atol=1e-3)  # the composition does something

    adapter_dir = export_adapter(entries, tmp_path / "adapter", base_model_name="tiny-llama")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 14 and config["lora_alpha"] == 14 and config["base_model_name_or_path"] == "tiny-llama"
    peft_model = PeftModel.from_pretrained(copy.deepcopy(untouched), str(adapter_dir)).eval()
    torch.testing.assert_close(logits(peft_model, ids), hooked, atol=1e-5, rtol=1e-5)

    merged_dir = export_merged(base, entries, tmp_path / "merged")
    reloaded = LlamaForCausalLM.from_pretrained(str(merged_dir)).eval()
    torch.testing.assert_close(logits(reloaded, ids), hooked, atol=1e-5, rtol=1e-5)

    # the same through a saved ledger: adapters on disk, resolved relative to the ledger's directory
    ledger = Ledger("tiny-llama", [])
    for step, (pem, weight) in enumerate(entries, start=1):
        pem.save(tmp_path / "pems" / pem.name)
        ledger.entries.append(LedgerEntry(pem.name, f"pems/{pem.name}", pem.kind, weight, step))
    ledger.save(tmp_path / "ledger.json")
    from_ledger = export_adapter(Ledger.load(tmp_path / "ledger.json"), tmp_path / "adapter2", "tiny-llama",
                                 ledger_root=tmp_path)
    again = PeftModel.from_pretrained(copy.deepcopy(untouched), str(from_ledger)).eval()
    torch.testing.assert_close(logits(again, ids), hooked, atol=1e-5, rtol=1e-5)


def test_set_weight_changes_logits_exactly_as_reattaching_with_the_new_weight():
    model, fresh = tiny_model(), tiny_model()
    entries = mixed_composition(model)
    composed = ComposedModel(model)
    for pem, weight in entries:
        composed.append(pem, weight)
    ids = batch()
    first = logits(model, ids)
    composed.set_weight(-1, 3.0)
    rescaled = logits(model, ids)
    assert not torch.allclose(first, rescaled)
    assert composed.merge_weights == [-2.5, 0.7, 3.0]

    reattached = ComposedModel(fresh)
    for pem, weight in entries[:-1] + [WeightedPem(entries[-1].pem, 3.0)]:
        reattached.append(pem, weight)
    assert torch.equal(rescaled, logits(fresh, ids))


def test_pop_and_detach_restore_base_logits_bit_exactly():
    model = tiny_model()
    ids = batch()
    base_logits = logits(model, ids)
    entries = mixed_composition(model)
    composed = ComposedModel(model)
    composed.append(*entries[0])
    one = logits(model, ids)
    composed.append(*entries[1])
    assert composed.pop().pem.name == "r1"
    assert torch.equal(logits(model, ids), one)
    composed.pop()
    assert torch.equal(logits(model, ids), base_logits)
    for pem, weight in entries:
        composed.append(pem, weight)
    composed.detach()
    assert torch.equal(logits(model, ids), base_logits)
    assert all(not m._forward_hooks for m in model.modules())
    assert len(composed) == 0


def test_a_model_cannot_carry_two_compositions():
    model = tiny_model()
    pem = random_pem(model, "f0", 4, 8.0, seed=1)
    ComposedModel(model).append(pem, -1.0)
    with pytest.raises(RRError, match="already carries a composition"):
        ComposedModel(model).append(pem, -1.0)


def test_mismatched_target_modules_raise():
    model = tiny_model()
    qv = random_pem(model, "qv", 4, 8.0, seed=1)
    q_only = random_pem(model, "q", 4, 8.0, seed=2, targets=("q_proj",))
    composed = ComposedModel(model)
    composed.append(qv, -1.0)
    with pytest.raises(RRError, match="share target modules"):
        composed.append(q_only, 1.0)
    assert composed.merge_weights == [-1.0]  # the failed append left the composition as it was
    with pytest.raises(RRError, match="share target modules"):
        rank_sum_adapter([WeightedPem(qv, -1.0), WeightedPem(q_only, 1.0)])
    with pytest.raises(RRError, match="empty"):
        rank_sum_adapter([])


def test_a_pem_from_another_base_model_is_refused():
    other = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    pem = random_pem(other, "wide", 4, 8.0, seed=1)
    model = tiny_model()
    with pytest.raises(RRError, match="another base model"):
        ComposedModel(model).append(pem, -1.0)
    assert all(not m._forward_hooks for m in model.modules())  # refused before any hook was registered


def test_pem_round_trips_through_a_peft_adapter_directory(tmp_path):
    model = tiny_model()
    pem = random_pem(model, "step1-forget", 4, 8.0, seed=1)
    pem.save(tmp_path / "pem")
    keys = json.loads((tmp_path / "pem" / "adapter_config.json").read_text())
    assert keys["peft_type"] == "LORA" and keys["r"] == 4 and sorted(keys["target_modules"]) == list(TARGETS)
    loaded = Pem.load(tmp_path / "pem")
    assert (loaded.name, loaded.kind, loaded.rank, loaded.alpha, loaded.target_modules) == \
        ("step1-forget", "forget", 4, 8.0, list(TARGETS))
    assert loaded.tensors.keys() == pem.tensors.keys()
    for module, (a, b) in pem.tensors.items():
        assert torch.equal(loaded.tensors[module][0], a) and torch.equal(loaded.tensors[module][1], b)
    with pytest.raises(RRError, match="not a PEFT adapter directory"):
        Pem.load(tmp_path / "missing")


def test_ledger_json_round_trips_and_saves_atomically(tmp_path):
    ledger = Ledger("HuggingFaceTB/SmolLM2-135M-Instruct",
                    [LedgerEntry("step1-forget", "pems/step1-forget", "forget", -2.0, 1),
                     LedgerEntry("step2-retain", "pems/step2-retain", "retain", 0.5, 2)])
    assert Ledger.from_json(ledger.to_json()) == ledger
    path = tmp_path / "release" / "ledger.json"
    ledger.save(path)
    ledger.entries.append(LedgerEntry("step3-forget", "pems/step3-forget", "forget", -1.0, 3))
    ledger.save(path)
    assert Ledger.load(path) == ledger
    assert sorted(p.name for p in path.parent.iterdir()) == ["ledger.json"]  # no temp files left behind
    path.write_text('{"base_model": "x", "entries": [{"pem_name": "a"}]}')
    with pytest.raises(RRError, match="ledger.json is not a valid rr ledger"):
        Ledger.load(path)
    with pytest.raises(RRError, match="does not exist"):
        Ledger.load(tmp_path / "nope.json")


def test_peft_add_weighted_adapter_cat_is_exact_for_signed_weights_and_linear_is_not(tmp_path):
    """Records PEFT's behaviour on the pinned version (invariant 2); rr exports its own rank-sum either way."""
    model = tiny_model()
    first = random_pem(model, "a", 4, 8.0, seed=1)
    second = random_pem(model, "b", 4, 4.0, seed=2, kind="retain")
    weights = [-2.0, 0.5]
    first.save(tmp_path / "a")
    second.save(tmp_path / "b")
    peft_model = PeftModel.from_pretrained(model, str(tmp_path / "a"), adapter_name="a")
    peft_model.load_adapter(str(tmp_path / "b"), adapter_name="b")
    peft_model.add_weighted_adapter(["a", "b"], weights, "cat", combination_type="cat")
    peft_model.add_weighted_adapter(["a", "b"], weights, "linear", combination_type="linear")
    module_name = "model.layers.0.self_attn.q_proj"
    layer = peft_model.base_model.model.get_submodule(module_name)
    exact = sum(w * p.scaling * (p.tensors[module_name][1] @ p.tensors[module_name][0])
                for p, w in zip((first, second), weights))
    torch.testing.assert_close(layer.get_delta_weight("cat"), exact, atol=1e-6, rtol=1e-5)
    ours = rank_sum_adapter([WeightedPem(first, weights[0]), WeightedPem(second, weights[1])])
    torch.testing.assert_close(ours.tensors[module_name][1] @ ours.tensors[module_name][0], exact,
                               atol=1e-6, rtol=1e-5)
    assert not torch.allclose(layer.get_delta_weight("linear"), exact, atol=1e-3)
