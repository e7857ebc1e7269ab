"""Targeted unlearning of papers/004: the model should answer forget questions with a refusal.

Forget losses (x a forget prompt, y its forget answer, y' a refusal drawn for it from D_IDK):
- IDK (Eq. 3):  −log p(y'|x), the NLL of the refusal (`nll_loss` on the relabelled batch).
- DPO (§2.3):   −(2/β)·log σ(β·[(log π(y'|x) − log π_ref(y'|x)) − (log π(y|x) − log π_ref(y|x))]), the refusal
  preferred over the forget answer; scaled by 2/β like NPO, so it is (2/β)·log 2 at the reference.
Retain losses ((x, y) a retain example, y' a refusal):
- GD:           −log p(y|x).
- AP (Eq. 8):   −(1/β)·log σ(−β·(log p(y'|x) − log p(y|x))): keep the answer above the refusal.
The step minimizes forget_weight·forget + retain_weight·retain (compare.targeted).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from rr.config import TargetedConfig
from rr.errors import RRError
from rr.methods import Method, MethodRun, ReleaseData, get_method
from rr.methods.losses import nll_loss, sequence_log_probs
from rr.core.files import read_lines
from rr.core.tokens import batches, collate, encode_example, pad_token_id
from rr.tasks.base import Example

SHIPPED_REFUSALS = Path(__file__).resolve().parent.parent / "tasks" / "data" / "refusals.txt"


def ap_loss(refusal_log_probs: Tensor, answer_log_probs: Tensor, beta: float) -> Tensor:
    """Answer preservation (papers/004 Eq. 8) from sequence log-probabilities log p(y'|x) and log p(y|x)."""
    return -(1.0 / beta) * F.logsigmoid(-beta * (refusal_log_probs - answer_log_probs)).mean()


def dpo_loss(chosen: Tensor, rejected: Tensor, reference_chosen: Tensor, reference_rejected: Tensor,
             beta: float) -> Tensor:
    """DPO with the refusal as the chosen answer and the forget answer as the rejected one (sequence log-probs)."""
    margin = (chosen - reference_chosen) - (rejected - reference_rejected)
    return -(2.0 / beta) * F.logsigmoid(beta * margin).mean()


def load_refusals(source: str) -> list[str]:
    path = SHIPPED_REFUSALS if source == "shipped" else Path(source)
    if not path.is_file():
        raise RRError(f"compare.targeted.refusals: {path} does not exist; give a text file with one refusal per "
                      f"line, or 'shipped'")
    refusals = read_lines(path, "compare.targeted.refusals (one refusal per line)")
    if not refusals:
        raise RRError(f"compare.targeted.refusals: {path} holds no refusal")
    return refusals


def with_refusals(examples: Sequence[Example], refusals: Sequence[str], seed: int) -> list[Example]:
    """Each example's prompt with a refusal drawn for it (seeded), as papers/004 draws y' ~ D_IDK."""
    rng = random.Random(seed)
    return [Example(e.prompt, rng.choice(list(refusals))) for e in examples]


def _encode_pairs(tokenizer, first: Sequence[Example], second: Sequence[Example], max_length: int):
    """Encoded (first[i], second[i]) pairs, dropping a pair where either keeps no response token."""
    pairs = []
    for a, b in zip(first, second, strict=True):
        ea, eb = encode_example(tokenizer, a, max_length), encode_example(tokenizer, b, max_length)
        if any(t != -100 for t in ea[1]) and any(t != -100 for t in eb[1]):
            pairs.append((ea, eb))
    if not pairs:
        raise RRError(f"no example keeps a response token within max_length={max_length}: raise it")
    return pairs


def _logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def targeted_objective(spec: Method, config: TargetedConfig, policy, reference, forget_batch, refusal_batch,
                       retain_batch, retain_refusal_batch) -> dict[str, Tensor]:
    """forget_weight·forget loss + retain_weight·retain loss of one step, with its parts. `refusal_batch` holds
    the forget prompts with their refusals (row i pairs with forget_batch row i); likewise the retain batches."""
    refusal_logits = _logits(policy, refusal_batch)
    if spec.forget_loss == "idk":
        forget = nll_loss(refusal_logits, refusal_batch["labels"])
    elif spec.forget_loss == "dpo":
        chosen = sequence_log_probs(refusal_logits, refusal_batch["labels"])
        rejected = sequence_log_probs(_logits(policy, forget_batch), forget_batch["labels"])
        forget = dpo_loss(chosen, rejected, sequence_log_probs(reference(refusal_batch), refusal_batch["labels"]),
                          sequence_log_probs(reference(forget_batch), forget_batch["labels"]), config.dpo_beta)
    else:
        raise RRError(f"method {spec.name!r}: no targeted forget loss {spec.forget_loss!r}")
    losses = {"forget": forget, "total": config.forget_weight * forget}
    if spec.retain_loss is not None:
        answer_logits = _logits(policy, retain_batch)
        if spec.retain_loss == "gd":
            retain = nll_loss(answer_logits, retain_batch["labels"])
        elif spec.retain_loss == "ap":
            retain = ap_loss(sequence_log_probs(_logits(policy, retain_refusal_batch), retain_refusal_batch["labels"]),
                             sequence_log_probs(answer_logits, retain_batch["labels"]), config.ap_beta)
        else:
            raise RRError(f"method {spec.name!r}: no targeted retain loss {spec.retain_loss!r}")
        losses["retain"] = retain
        losses["total"] = losses["total"] + config.retain_weight * retain
    return losses


def train_targeted(model, tokenizer, forget_examples: Sequence[Example], retain_examples: Sequence[Example],
                   method: str, config: TargetedConfig, seed: int = 0) -> list[dict[str, float]]:
    """Unlearn in place with a targeted method (idk+gd, idk+ap, dpo, ...); returns the per-step losses."""
    from rr.methods.session import step_count, training_session

    spec = get_method(method)
    if spec.family != "targeted":
        raise RRError(f"train_targeted runs the targeted methods; {method!r} is run by rr/methods/{spec.family}")
    if spec.retain_loss is not None and not retain_examples:
        raise RRError(f"method {method!r} has a retain term and needs retain data, but none was given")
    refusals = load_refusals(config.refusals)
    forget = _encode_pairs(tokenizer, forget_examples, with_refusals(forget_examples, refusals, seed),
                           config.max_length)
    retain = _encode_pairs(tokenizer, retain_examples, with_refusals(retain_examples, refusals, seed + 1),
                           config.max_length) if spec.retain_loss is not None else []
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    step_losses = []
    with training_session(model, config, seed, needs_reference=spec.forget_loss == "dpo") as (policy, reference,
                                                                                                optimizer):
        forget_order = batches(len(forget), config.batch_size, torch.Generator().manual_seed(seed))
        retain_order = batches(len(retain), config.batch_size, torch.Generator().manual_seed(seed + 1)) \
            if retain else None
        for _ in range(step_count(len(forget), config)):
            rows = [forget[i] for i in next(forget_order)]
            step_batches = [collate([r[0] for r in rows], pad, device), collate([r[1] for r in rows], pad, device)]
            if retain_order is not None:
                rows = [retain[i] for i in next(retain_order)]
                step_batches += [collate([r[0] for r in rows], pad, device), collate([r[1] for r in rows], pad, device)]
            else:
                step_batches += [None, None]
            losses = targeted_objective(spec, config, policy, reference, *step_batches)
            losses["total"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_losses.append({name: float(value.detach()) for name, value in losses.items()})
    return step_losses


def run_method(job, method: Method, data: ReleaseData, out_dir: Path, progress: Callable[[str], None]) -> MethodRun:
    """`rr compare`: a copy of the base model unlearned with `method` (compare.targeted), scored on test."""
    from rr.config import CompareConfig
    from rr.methods.session import unlearn_a_copy

    config = (job.config.compare or CompareConfig()).targeted
    progress(f"{method.name}: {config.weights} fine-tuning on {len(data.forget)} {data.source} forget examples"
             + (f" and {len(data.retain)} retain examples" if method.retain_loss else ""))
    test, wall_time, step_losses = unlearn_a_copy(job, method.name, out_dir, progress, lambda model: train_targeted(
        model, job.tokenizer, data.forget, data.retain, method.name, config, job.config.seed))
    return MethodRun(method.name, test, wall_time,
                     {"steps": len(step_losses), "weights": config.weights, "learning_rate": config.learning_rate,
                      "final_losses": step_losses[-1] if step_losses else {}})
