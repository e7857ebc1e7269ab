"""`rr compare`'s frame for weight-training methods, on a tiny model: each method unlearns a copy of the job's
model (never the model itself), its losses are written, and the trained copy is what gets scored."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from support import FORGET, RETAIN, char_embed, char_tokenizer, learned_model

from rr.config import CompareConfig, FineTuneConfig, IcuConfig, RmuConfig, TargetedConfig
from rr.methods import ReleaseData, get_method
from rr.release.pem import response_loss
from rr.tasks.base import Evaluation, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


class ForgetLossTask:
    """Scores the generator's model by its loss on the forget answers (higher loss: more forgotten)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.scored = tokenizer, []

    def evaluate(self, generator, split, stop_early=None):  # scores in full (the Task protocol allows it)
        loss = response_loss(generator.model, self.tokenizer, FORGET, max_length=64)
        self.scored.append((split, generator.model))
        return Evaluation(forget_score=float(np.exp(-loss)), utility_score=1.0, metrics={"forget_loss": loss})


@pytest.mark.parametrize("name", ["ga+gd", "idk+ap", "icu", "rmu"])
def test_each_method_trains_and_scores_a_copy(name, learned_state, tmp_path: Path):
    tokenizer, model = char_tokenizer(), learned_model(learned_state)
    budget = {"learning_rate": 1e-2, "batch_size": 4, "epochs": 3, "max_length": 64}  # 3 steps of 4 examples
    compare = CompareConfig(finetune=FineTuneConfig(**budget), targeted=TargetedConfig(**budget),
                            icu=IcuConfig(**budget, similarity_threshold=-1.0),
                            rmu=RmuConfig(layer=1, update_layers=[0, 1], steering_coefficient=10.0, retain_weight=1.0,
                                          learning_rate=1e-2, batch_size=4, epochs=3, max_length=64))
    task = ForgetLossTask(tokenizer)
    job = SimpleNamespace(model=model, tokenizer=tokenizer, task=task, embed=char_embed,
                          config=SimpleNamespace(compare=compare, seed=0, generation=SimpleNamespace(batch_size=4)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base_loss = response_loss(model, tokenizer, FORGET, max_length=64)
    method = get_method(name)
    module = __import__(f"rr.methods.{method.family}", fromlist=["run_method"])
    run = module.run_method(job, method, ReleaseData(list(FORGET), list(RETAIN), "self-generated"), tmp_path,
                            lambda message: None)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the job's own model changed"
    assert [split for split, _ in task.scored] == ["test"] and task.scored[0][1] is not model
    assert run.method == name and run.details["steps"] == 3 and run.wall_time_s > 0
    assert len(json.loads((tmp_path / "losses.json").read_text())) == 3
    assert run.test["metrics"]["forget_loss"] != pytest.approx(base_loss, rel=1e-4), "the scored copy was not trained"


def test_the_job_generator_uses_the_jobs_settings_and_follows_a_copy_edited_in_place(learned_state):
    """Methods score the dense copy they trained (and Ext-Sub the weights it edits in place) with the job's
    generation settings; a separate instruction model brings its own tokenizer."""
    from rr.generation.hf import job_generator

    tokenizer, model = char_tokenizer(), learned_model(learned_state)
    job = SimpleNamespace(model=model, tokenizer=tokenizer,
                          config=SimpleNamespace(generation=SimpleNamespace(batch_size=3)))
    own = job_generator(job)
    assert (own.model, own.tokenizer, own.batch_size) == (model, tokenizer, 3)
    copy_model, other_tokenizer = learned_model(learned_state), char_tokenizer()
    handle = job_generator(job, copy_model, other_tokenizer)
    assert (handle.model, handle.tokenizer, handle.batch_size) == (copy_model, other_tokenizer, 3)
    prompts, greedy = [e.prompt for e in FORGET], SamplingParams(max_new_tokens=8)
    before = handle.generate(prompts, greedy)
    with torch.no_grad():
        next(p for p in copy_model.parameters() if p.dim() == 2).mul_(-3.0)  # an in-place edit, as Ext-Sub's apply()
    assert handle.generate(prompts, greedy) != before
