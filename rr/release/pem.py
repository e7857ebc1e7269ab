"""Train one PEM: a LoRA fine-tuned to imitate (prompt, response) pairs on top of the current composed model.

A forget PEM imitates the self-generated forget data and is applied with a negative weight; a retain PEM is
trained on retain data and applied with a positive one (ARCHITECTURE.md, "Release"). The loss covers the
response tokens only. A forget PEM may be *anchored* (release.forget_anchor): it then also minimizes β ×
KL(model without it ‖ model with it negated at release.forget_anchor_at) on the retain examples' responses, so
the negation it is trained for leaves those answers as they were. The caller's model is left exactly as it
was: PEFT wraps its target Linears for the duration of training (any composition hooks on them stay active, so the new PEM learns on top of the
composed model) and is unloaded afterwards. Plain torch by default; DeepSpeed ZeRO-2/3 on request.
"""

from __future__ import annotations

import copy
import json
import os
import socket
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from rr.config import LoraTrainingConfig  # the `release.lora` block
from rr.core import profile
from rr.core.files import atomic_write
from rr.core.tokens import IGNORE_INDEX, collate, encode_examples, pad_token_id
from rr.errors import RRError
from rr.release.ledger import Pem
from rr.tasks.base import Example

ADAPTER_NAME = "default"


# ---- data ------------------------------------------------------------------------------------------------


def response_loss(model: nn.Module, tokenizer, examples: Sequence[Example], max_length: int = 384,
                  chat_template: bool = True, batch_size: int = 8) -> float:
    """Mean per-token loss of the responses given their prompts (what train_pem minimizes)."""
    encoded = encode_examples(tokenizer, examples, max_length, chat_template)
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            batch = collate(encoded[start:start + batch_size], pad_token_id(tokenizer), device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            targets = batch["labels"][:, 1:]
            losses = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets,
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
            total += float(losses)
            tokens += int((targets != IGNORE_INDEX).sum())
    return total / tokens


# ---- training --------------------------------------------------------------------------------------------


def train_pem(model: nn.Module, tokenizer, examples: Sequence[Example], config: LoraTrainingConfig, name: str,
              kind: str, out_dir: Path, seed: int, chat_template: bool = True,
              checkpoints: Sequence[int] = (), anchor: Sequence[Example] = (), anchor_weight: float = 0.0,
              anchor_scale: float = 1.0) -> Pem:
    """Fine-tune a LoRA on `examples` on top of `model` as it is now (with its composition hooks), save it
    to `out_dir` as a PEFT adapter and return it. `model` is unchanged afterwards: same modules, hooks,
    weights, requires_grad flags and train/eval mode.

    `checkpoints` (optimizer updates, e.g. 5, 20, 50): the LoRA is also saved after each of them in
    `out_dir/step-N`, and training stops after the last, however many epochs that takes (the audit's
    relearning attack reads one run at several budgets).

    `anchor` with `anchor_weight` β > 0 (forget PEMs only): each update also minimizes β × the mean per-token
    KL(model without the LoRA ‖ model with the LoRA applied at weight −`anchor_scale`) on a batch of `anchor`'s
    responses, cycled.
    """
    from peft import LoraConfig, get_peft_model

    if kind not in ("forget", "retain", "relearn"):
        raise RRError(f"train_pem: kind {kind!r} must be 'forget', 'retain' or 'relearn'")
    checkpoints = sorted(set(int(n) for n in checkpoints))
    if checkpoints and (checkpoints[0] < 1 or config.deepspeed_stage or _data_parallel()[0] > 1):
        raise RRError("train_pem: checkpoints are positive update counts, for one process without DeepSpeed")
    if anchor_weight < 0 or anchor_scale <= 0 or (anchor_weight > 0 and (kind != "forget" or not anchor)):
        raise RRError("train_pem: an anchor (β > 0 with anchor examples) is for forget PEMs only")
    if config.deepspeed_stage or _data_parallel()[0] > 1:
        _import_deepspeed(config.deepspeed_stage)  # fail before any work if it is missing
    encoded = encode_examples(tokenizer, examples, config.max_length, chat_template)
    anchor_encoded = encode_examples(tokenizer, anchor, config.max_length, chat_template) if anchor_weight else []
    device = next(model.parameters()).device
    lora_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                             target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM")
    # ZeRO-3 partitions every parameter of the module it is given: it gets a copy (forward hooks are
    # shared with the copy, so the composition still applies), and the caller's model is never touched.
    train_model = copy.deepcopy(model) if config.deepspeed_stage == 3 else model
    requires_grad = {param: param.requires_grad for param in train_model.parameters()}
    was_training = model.training
    rng_devices = [device] if device.type == "cuda" else []
    peft_model = None
    try:
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed)  # LoRA init and dropout
            try:
                peft_model = get_peft_model(train_model, lora_config)
            except ValueError as error:
                raise RRError(f"release.lora.target_modules={config.target_modules} do not fit the model "
                              f"({error}); name Linear layers it has, e.g. q_proj, v_proj") from error
            def save_checkpoint(updates: int) -> None:
                if updates in checkpoints:
                    _extract_pem(peft_model, f"{name}-step{updates}", kind, config).save(Path(out_dir) / f"step-{updates}")

            anchor_term = _Anchor(anchor_encoded, anchor_weight, anchor_scale, seed) if anchor_weight else None
            epoch_losses = _fit(peft_model, encoded, config, seed, pad_token_id(tokenizer), device,
                                max_updates=checkpoints[-1] if checkpoints else None, on_update=save_checkpoint,
                                anchor=anchor_term)
            pem = _extract_pem(peft_model, name, kind, config)
    finally:
        # unload puts the original Linears (and their hooks) back
        restore_after_lora(model, train_model, peft_model, requires_grad, was_training, merge=False)
    log = {"name": name, "kind": kind, "seed": seed, "examples": len(examples), "trained_on": len(encoded),
           "epoch_losses": epoch_losses, "config": config.model_dump()}
    if anchor_weight:
        log.update(anchor_examples=len(anchor_encoded), anchor_weight=anchor_weight, anchor_scale=anchor_scale,
                   anchor_kl=anchor_term.epoch_kl)
    atomic_write(Path(out_dir) / "training.json", lambda tmp: Path(tmp).write_text(json.dumps(log, indent=1)))
    pem.save(out_dir)  # last: its pem.json marks the directory complete for a resume (Pem.is_saved)
    return pem


def restore_after_lora(model: nn.Module, wrapped: nn.Module, peft_model, requires_grad: dict, was_training: bool,
                       merge: bool) -> None:
    """Put a model back as it was before a LoRA was wrapped around `wrapped` (the model or its inner LM):
    the LoRA merged into the weights (`merge`) or taken out, PEFT's marks dropped, requires_grad flags and
    train/eval mode restored."""
    if peft_model is not None:
        peft_model.merge_and_unload() if merge else peft_model.unload()
        for attribute in ("peft_config", "_hf_peft_config_loaded"):
            if attribute in wrapped.__dict__:
                delattr(wrapped, attribute)
    for param, flag in requires_grad.items():
        param.requires_grad_(flag)
    model.train(was_training)


class _Anchor:
    """The anchor term of a forget PEM: anchor batches in a seeded cycle, the KL of each, its mean per epoch."""

    def __init__(self, encoded: list, weight: float, scale: float, seed: int):
        if not encoded:
            raise RRError("train_pem: no anchor example fits release.lora.max_length")
        self.encoded, self.weight, self.scale = encoded, weight, scale
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.queue: list[int] = []
        self.epoch_kl: list[float] = []
        self._kls: list[float] = []

    def loss(self, forward, peft_model, batch_size: int, pad_token_id: int, device, share) -> torch.Tensor:
        """β × KL on the next anchor batch (its rows shared out like the training batch's)."""
        while len(self.queue) < batch_size:
            self.queue += torch.randperm(len(self.encoded), generator=self.generator).tolist()
        rows, self.queue = self.queue[:batch_size], self.queue[batch_size:]
        batch = collate([self.encoded[i] for i in (share(rows) or rows[:1])], pad_token_id, device)
        kl = negation_kl(forward, peft_model, batch, self.scale)
        self._kls.append(float(kl.detach()))
        return self.weight * kl

    def end_epoch(self) -> None:
        self.epoch_kl.append(sum(self._kls) / max(len(self._kls), 1))
        self._kls = []


def negation_kl(forward, peft_model, batch: dict, scale: float = 1.0) -> torch.Tensor:
    """Mean over `batch`'s response tokens of KL(p without the LoRA ‖ p with the LoRA at weight −`scale`): how
    far the negation moves these answers (0 when it leaves them as they were)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    with torch.no_grad(), peft_model.disable_adapter():
        reference = torch.log_softmax(forward(**inputs).logits[:, :-1][mask].float(), dim=-1)
    with _negated(peft_model, scale):
        negated = torch.log_softmax(forward(**inputs).logits[:, :-1][mask].float(), dim=-1)
    return (reference.exp() * (reference - negated)).sum(dim=-1).mean()


@contextmanager
def _negated(peft_model, scale: float):
    """The LoRA applied with weight −`scale` (its scaling multiplied by it) for the duration."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer) and ADAPTER_NAME in m.scaling]
    saved = [layer.scaling[ADAPTER_NAME] for layer in layers]
    for layer, scaling in zip(layers, saved):
        layer.scaling[ADAPTER_NAME] = -scale * scaling
    try:
        yield
    finally:
        for layer, scaling in zip(layers, saved):
            layer.scaling[ADAPTER_NAME] = scaling


def _fit(peft_model, encoded, config: LoraTrainingConfig, seed: int, pad_token_id: int,
         device: torch.device, max_updates: int | None = None,
         on_update: Callable[[int], None] | None = None, anchor: _Anchor | None = None) -> list[float]:
    """The epoch loop; returns the mean training loss of each epoch. With `max_updates`, epochs repeat until
    that many optimizer updates are done (the last epoch may be partial); `on_update(n)` follows update n.

    Under several data-parallel workers (Ray Train), every worker walks the same batches and takes its own
    share of each (rows rank, rank + world, ...); DeepSpeed averages the gradients (ZeRO stage 0 is plain
    data parallelism), so a batch is still release.lora.batch_size examples. With an `anchor`, its term is
    added to every micro-batch's loss (the returned losses are the training loss alone)."""
    world, rank = _data_parallel()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    engine = _deepspeed_engine(peft_model, params, config, world) if config.deepspeed_stage or world > 1 else None
    optimizer = None if engine else torch.optim.AdamW(params, lr=config.learning_rate,
                                                      weight_decay=config.weight_decay)
    order_generator = torch.Generator().manual_seed(seed)
    accumulation = config.gradient_accumulation_steps
    batches_per_epoch = -(-len(encoded) // config.batch_size)
    total_micro_steps = batches_per_epoch * config.epochs
    forward = engine if engine is not None else peft_model

    def share(rows: list[int]) -> list[int]:  # this worker's rows of a batch
        return rows[rank::world] if world > 1 else rows

    peft_model.train()
    epoch_losses, micro_step = [], 0
    try:
        updates, epoch = 0, 0
        while (epoch < config.epochs) if max_updates is None else (updates < max_updates):
            epoch += 1
            order = torch.randperm(len(encoded), generator=order_generator).tolist()
            losses = []
            for start in range(0, len(order), config.batch_size):
                if max_updates is not None and updates >= max_updates:
                    break
                rows = order[start:start + config.batch_size]
                mine = share(rows)
                # a worker left without a row (a last batch smaller than the world) still joins the all-reduce
                weight = 1.0 if mine else 0.0
                batch = collate([encoded[i] for i in (mine or rows[:1])], pad_token_id, device)
                micro_step += 1
                profile.count(trained_tokens=int(batch["attention_mask"].sum()),
                              trained_positions=batch["attention_mask"].numel())
                # an update every `accumulation` micro-batches, and one for a last partial group
                boundary = micro_step % accumulation == 0 or (max_updates is None and micro_step == total_micro_steps)
                loss = forward(**batch).loss
                total = loss if anchor is None else loss + anchor.loss(forward, peft_model, config.batch_size,
                                                                       pad_token_id, device, share)
                if engine is not None:
                    engine.set_gradient_accumulation_boundary(boundary)
                    engine.backward(total * weight)  # scales by 1/accumulation itself
                    engine.step()  # steps only at the boundary
                else:
                    (total / accumulation).backward()
                    if boundary:
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        updates += 1
                        if on_update is not None:
                            on_update(updates)
                losses.append(float(loss.detach()))
            epoch_losses.append(sum(losses) / len(losses))
            if anchor is not None:
                anchor.end_epoch()
    finally:
        if engine is not None:
            engine.destroy()
    return epoch_losses


def _extract_pem(peft_model, name: str, kind: str, config: LoraTrainingConfig) -> Pem:
    """Copy the trained A/B out of the PEFT wrapper (gathered first under ZeRO-3, where they are partitioned)."""
    from peft.tuners.lora import LoraLayer

    layers = {module_name: module for module_name, module in peft_model.base_model.model.named_modules()
              if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A}
    weights = [w for m in layers.values() for w in (m.lora_A[ADAPTER_NAME].weight, m.lora_B[ADAPTER_NAME].weight)]
    with _gathered(weights, config.deepspeed_stage):
        tensors = {module_name: (m.lora_A[ADAPTER_NAME].weight.detach().to("cpu", torch.float32).clone(),
                                 m.lora_B[ADAPTER_NAME].weight.detach().to("cpu", torch.float32).clone())
                   for module_name, m in layers.items()}
    for module_name, (a, b) in tensors.items():
        if a.numel() == 0 or b.numel() == 0:
            raise RRError(f"PEM {name}: the trained LoRA of {module_name} is empty (a ZeRO-3 partition was not "
                          "gathered); report this with release.lora.deepspeed_stage")
    return Pem(name=name, kind=kind, rank=config.rank, alpha=config.alpha,
               target_modules=sorted({m.rsplit(".", 1)[-1] for m in tensors}), tensors=tensors)


# ---- DeepSpeed (optional) --------------------------------------------------------------------------------


def _import_deepspeed(stage: int):
    try:
        import deepspeed
    except ImportError as error:
        raise RRError(f"release.lora.deepspeed_stage={stage} needs DeepSpeed, which is not installed: "
                      "pip install 'rr[deepspeed]', or set release.lora.deepspeed_stage: 0") from error
    return deepspeed


def _gathered(params, stage: int):
    """Under ZeRO-3 a parameter's .data is an empty placeholder outside a gather (what makes PEFT's own
    save write empty tensors); gather before reading."""
    if stage == 3:
        return _import_deepspeed(stage).zero.GatheredParameters(params, modifier_rank=None)
    return nullcontext()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _data_parallel() -> tuple[int, int]:
    """(world size, rank) of the process group a launcher (Ray Train, deepspeed) set up; (1, 0) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _deepspeed_engine(peft_model, params, config: LoraTrainingConfig, world: int = 1):
    """A ZeRO engine over the LoRA parameters. Outside a launcher (one process) it brings up a world of size 1
    on gloo; under Ray Train or `deepspeed` the process group already exists and is used as it is."""
    deepspeed = _import_deepspeed(config.deepspeed_stage)
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        for variable, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_SIZE", "1")):
            os.environ.setdefault(variable, value)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    ds_config = {
        "train_micro_batch_size_per_gpu": max(1, -(-config.batch_size // world)),
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        # Persistence 0: every parameter is partitioned, the small LoRA ones included, as on a multi-GPU run,
        # so one process exercises the same gather-before-extract that the cluster needs.
        "zero_optimization": {"stage": config.deepspeed_stage, "stage3_param_persistence_threshold": 0},
        # a client torch AdamW: DeepSpeed would otherwise insist on its compiled CPU Adam on CPU
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
    }
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=peft_model, model_parameters=params, optimizer=optimizer,
                                           config=ds_config)
    return engine
