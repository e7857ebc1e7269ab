"""Fine-tuning release methods: GA, NPO or ME on the forget set, alone or with a GD or KL term on retain data.

`train_unlearning` is the whole loop. Each step takes a batch of forget examples (and, for a method with a
retain term, a batch of retain examples), computes forget_weight·forget loss + retain_weight·retain loss
(rr/methods/losses.py) and takes an AdamW step, on a LoRA or on the full weights. The caller's model is the
unlearned model afterwards: a LoRA is merged into its weights, and its modules, requires_grad flags and
train/eval mode are as they were. Data are encoded as PEMs are (rr/release/pem.py): a chat-template prompt,
and the response as the only target.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from rr.config import FineTuneConfig  # a `compare.finetune` block
from rr.errors import RRError
from rr.methods import Method, MethodRun, ReleaseData, get_method
from rr.methods.losses import ga_loss, kl_to_reference, me_loss, nll_loss, npo_loss, sequence_log_probs
from rr.methods.session import step_count, training_session, unlearn_a_copy
from rr.core.tokens import IGNORE_INDEX, batches, collate, encode_examples, pad_token_id
from rr.tasks.base import Example

Batch = dict[str, torch.Tensor]


@dataclass
class UnlearningResult:
    """What one run of a fine-tuning method did: per step, the total, forget and retain losses."""

    method: str
    steps: int
    wall_time_s: float
    forget_examples: int
    retain_examples: int
    step_losses: list[dict[str, float]] = field(default_factory=list)


def train_unlearning(model: nn.Module, tokenizer, forget_examples: Sequence[Example],
                     retain_examples: Sequence[Example], method: str, config: FineTuneConfig, seed: int = 0,
                     chat_template: bool = True) -> UnlearningResult:
    """Unlearn `forget_examples` from `model` in place with the fine-tuning method `method` (a name in
    rr.methods.METHODS, e.g. "me+gd"). `retain_examples` are used only by methods with a retain term.
    Runs config.epochs passes over the forget set, or config.max_steps steps if that comes first."""
    spec = get_method(method)
    if spec.family != "finetune":
        raise RRError(f"train_unlearning runs the fine-tuning methods; {method!r} is run by rr/methods/{spec.family}")
    if spec.needs_retain_data and not retain_examples:
        raise RRError(f"method {method!r} has a retain term and needs retain data, but none was given: give the "
                      f"task's retain examples, or choose {spec.forget_loss!r} (no retain term)")
    started = time.perf_counter()
    forget = encode_examples(tokenizer, forget_examples, config.max_length, chat_template)
    retain = encode_examples(tokenizer, retain_examples, config.max_length, chat_template) \
        if spec.needs_retain_data else []
    with training_session(model, config, seed, spec.needs_reference) as (policy, reference, optimizer):
        step_losses = _fit(spec, config, policy, reference, optimizer, forget, retain, seed,
                           pad_token_id(tokenizer), next(model.parameters()).device)
    return UnlearningResult(method=method, steps=len(step_losses), wall_time_s=time.perf_counter() - started,
                            forget_examples=len(forget), retain_examples=len(retain), step_losses=step_losses)


def _fit(spec: Method, config: FineTuneConfig, policy: nn.Module, reference, optimizer: torch.optim.Optimizer,
         forget, retain, seed: int, pad_token_id: int, device: torch.device) -> list[dict[str, float]]:
    steps = step_count(len(forget), config)
    forget_order = batches(len(forget), config.batch_size, torch.Generator().manual_seed(seed))
    retain_order = batches(len(retain), config.batch_size, torch.Generator().manual_seed(seed + 1)) \
        if retain else None
    step_losses = []
    for _ in range(steps):
        forget_batch = collate([forget[i] for i in next(forget_order)], pad_token_id, device)
        retain_batch = collate([retain[i] for i in next(retain_order)], pad_token_id, device) if retain_order else None
        losses = objective(spec, config, policy, reference, forget_batch, retain_batch)
        losses["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_losses.append({name: float(value.detach()) for name, value in losses.items()})
    return step_losses


def objective(spec: Method, config: FineTuneConfig, policy: nn.Module,
              reference: Callable[[Batch], torch.Tensor] | None, forget_batch: Batch,
              retain_batch: Batch | None) -> dict[str, torch.Tensor]:
    """forget_weight·forget loss (+ retain_weight·retain loss) of one step, with its parts."""
    labels = forget_batch["labels"]
    if spec.forget_loss == "me" and config.me_tokens == "all":
        # papers/004 scores every token of prompt ∘ response, padding aside
        labels = forget_batch["input_ids"].masked_fill(forget_batch["attention_mask"] == 0, IGNORE_INDEX)
    logits = policy(input_ids=forget_batch["input_ids"], attention_mask=forget_batch["attention_mask"]).logits
    if spec.forget_loss == "ga":
        forget_loss = ga_loss(logits, labels)
    elif spec.forget_loss == "npo":
        forget_loss = npo_loss(logits, labels, sequence_log_probs(reference(forget_batch), labels), config.npo_beta)
    elif spec.forget_loss == "me":
        forget_loss = me_loss(logits, labels)
    else:
        raise RRError(f"method {spec.name!r}: no forget loss {spec.forget_loss!r} in rr/methods/losses.py")
    losses = {"forget": forget_loss, "total": config.forget_weight * forget_loss}
    if spec.retain_loss is not None:
        retain_logits = policy(input_ids=retain_batch["input_ids"],
                               attention_mask=retain_batch["attention_mask"]).logits
        if spec.retain_loss == "gd":
            retain_loss = nll_loss(retain_logits, retain_batch["labels"])
        elif spec.retain_loss == "kl":
            retain_loss = kl_to_reference(retain_logits, reference(retain_batch), retain_batch["labels"])
        else:
            raise RRError(f"method {spec.name!r}: no retain loss {spec.retain_loss!r} in rr/methods/losses.py")
        losses["retain"] = retain_loss
        losses["total"] = losses["total"] + config.retain_weight * retain_loss
    return losses


def run_method(job, method: Method, data: ReleaseData, out_dir: Path, progress: Callable[[str], None]) -> MethodRun:
    """`rr compare`: a copy of the job's base model unlearned with `method` (compare.finetune), scored on test."""
    config = job.config.compare.finetune if job.config.compare is not None else FineTuneConfig()
    progress(f"{method.name}: fine-tuning ({config.weights}) on {len(data.forget)} {data.source} forget examples"
             + (f" and {len(data.retain)} retain examples" if method.needs_retain_data else ""))
    test, wall_time, step_losses = unlearn_a_copy(job, method.name, out_dir, progress, lambda model: train_unlearning(
        model, job.tokenizer, data.forget, data.retain, method.name, config, job.config.seed).step_losses)
    return MethodRun(method.name, test, wall_time,
                     {"steps": len(step_losses), "weights": config.weights, "learning_rate": config.learning_rate,
                      "epochs": config.epochs, "final_losses": step_losses[-1] if step_losses else {}})
