"""One fine-tuning session for the methods that bring their own objective (targeted, ICU): the model is
wrapped in a LoRA (or trained in full), the caller runs its own steps, and on exit the model is the trained
one (LoRA merged) with its flags and mode restored; on an error it is left as it was.

It is finetune.train_unlearning's setup and teardown without its loop, so each method's file reads as its
objective and its loop.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from rr.config import FineTuneConfig
from rr.methods.finetune import _adapter_off_reference, _frozen_reference, _wrap_lora
from rr.release.pem import restore_after_lora

Reference = Callable[[dict], torch.Tensor]


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
