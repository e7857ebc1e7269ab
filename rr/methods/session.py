"""One fine-tuning session for the methods that bring their own objective (targeted, ICU): the model is
wrapped in a LoRA (or trained in full), the caller runs its own steps, and on exit the model is the trained
one (LoRA merged) with its flags and mode restored; on an error it is left as it was.

finetune.train_unlearning uses it too, so each method's file reads as its objective and its loop.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from rr.config import FineTuneConfig
from rr.errors import RRError
from rr.release.pem import restore_after_lora

Batch = dict[str, torch.Tensor]
Reference = Callable[[Batch], torch.Tensor]


@contextmanager
def training_session(model: nn.Module, config: FineTuneConfig, seed: int,
                     needs_reference: bool) -> Iterator[tuple[nn.Module, Reference | None, torch.optim.Optimizer]]:
    """Yields (policy, reference logits function or None, AdamW over the trainable parameters)."""
    device = next(model.parameters()).device
    requires_grad = {param: param.requires_grad for param in model.parameters()}
    was_training = model.training
    peft_model, trained = None, False
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)  # LoRA init and dropout
            if config.weights == "lora":
                peft_model = _wrap_lora(model, config)
                policy, reference = peft_model, _adapter_off_reference(peft_model)
            else:
                frozen = copy.deepcopy(model).eval().requires_grad_(False) if needs_reference else None
                model.requires_grad_(True)
                policy, reference = model, (_frozen_reference(frozen) if frozen is not None else None)
            params = [p for p in policy.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
            policy.train()
            yield policy, reference, optimizer
            trained = True
    finally:
        restore_after_lora(model, model, peft_model, requires_grad, was_training, merge=trained)


def step_count(examples: int, config: FineTuneConfig) -> int:
    """config.epochs passes of config.batch_size, capped by config.max_steps."""
    steps = -(-examples // config.batch_size) * config.epochs
    return steps if config.max_steps is None else min(steps, config.max_steps)


def _wrap_lora(model: nn.Module, config: FineTuneConfig):
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                             target_modules=list(config.lora_target_modules), bias="none", task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora_config)
    except ValueError as error:
        raise RRError(f"compare.finetune.lora_target_modules={config.lora_target_modules} do not fit the model "
                      f"({error}); name Linear layers it has, e.g. q_proj, v_proj") from error


def _adapter_off_reference(peft_model) -> Callable[[Batch], torch.Tensor]:
    """The starting model is the LoRA model with its adapter switched off: no copy needed."""
    def logits(batch: Batch) -> torch.Tensor:
        with torch.no_grad(), peft_model.disable_adapter():
            return peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits


def _frozen_reference(frozen: nn.Module) -> Callable[[Batch], torch.Tensor]:
    def logits(batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            return frozen(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits


def unlearn_a_copy(job, name: str, out_dir, progress: Callable[[str], None],
                   train: Callable[[nn.Module], list[dict]]) -> tuple[dict, float, list[dict]]:
    """`rr compare`'s frame for the methods that train weights: `train(copy of the job's base model)` unlearns the
    copy in place and returns its per-step losses (written to out_dir/losses.json); the copy is then scored on the
    test split and dropped. Returns (test evaluation_dict, training wall time, step losses)."""
    import json
    import time

    from rr.generation.hf import job_generator
    from rr.release.loop import evaluation_dict

    model = copy.deepcopy(job.model)
    started = time.perf_counter()
    step_losses = train(model)
    wall_time = time.perf_counter() - started
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "losses.json").write_text(json.dumps(step_losses))
    progress(f"{name}: {len(step_losses)} steps in {wall_time:.0f}s; scoring the test split")
    test = evaluation_dict(job.task.evaluate(job_generator(job, model), "test"))
    del model
    return test, wall_time, step_losses
