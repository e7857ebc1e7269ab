"""RMU, Representation Misdirection for Unlearning (Li et al. 2024, WMDP): scramble the model's internal
representation of forget data at one layer, and leave it alone on retain data.

With h_ℓ(x) the output of decoder layer ℓ (compare.rmu.layer) at each token, u a fixed random unit vector
(seeded, uniform in [0, 1)^d then normalized, as WMDP draws it) and c the steering coefficient:
    loss = MSE(h_ℓ^θ(x_forget), c·u) + retain_weight·MSE(h_ℓ^θ(x_retain), h_ℓ^θ0(x_retain))
with MSE the mean over tokens (padding aside) and hidden units. Only mlp.down_proj of update_layers
(default ℓ−2 … ℓ, as WMDP) is trained, in full. The forward pass stops at layer ℓ, and the frozen model's
retain activations are computed once before training, so no second model is held.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from rr.config import RmuConfig
from rr.errors import RRError
from rr.methods import Method, MethodRun, ReleaseData
from rr.core.tokens import batches, collate, encode_examples, pad_token_id
from rr.tasks.base import Example


def rmu_loss(forget_activations: Tensor, forget_mask: Tensor, control: Tensor, retain_activations: Tensor,
             frozen_retain_activations: Tensor, retain_mask: Tensor, retain_weight: float) -> dict[str, Tensor]:
    """RMU's two terms from layer activations (batch, seq, d) and token masks (batch, seq); `control` is c·u."""
    forget = _masked_mse(forget_activations, control.expand_as(forget_activations), forget_mask)
    retain = _masked_mse(retain_activations, frozen_retain_activations, retain_mask)
    return {"forget": forget, "retain": retain, "total": forget + retain_weight * retain}


def _masked_mse(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    per_token = ((a.float() - b.float()) ** 2).mean(-1)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def control_vector(hidden_size: int, steering_coefficient: float, seed: int) -> Tensor:
    u = torch.rand(hidden_size, generator=torch.Generator().manual_seed(seed))
    return steering_coefficient * u / u.norm()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        module = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return module
    raise RRError(f"RMU: cannot find the decoder layers of {type(model).__name__} (model.layers or transformer.h)")


class _Stop(Exception):
    pass


def layer_activations(model: nn.Module, layer: int, batch: dict) -> Tensor:
    """The output hidden states of decoder layer `layer`; the forward pass stops there."""
    captured = {}

    def hook(_module, _inputs, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["h"]


def check_layers(model: nn.Module, config: RmuConfig) -> nn.ModuleList:
    """The model's decoder layers, if compare.rmu.layer is one of them (update_layers ≤ layer is checked at load);
    `rr compare` calls it before any method runs, so a bad layer does not fail after the other methods."""
    layers = decoder_layers(model)
    if not 0 <= config.layer < len(layers):
        raise RRError(f"compare.rmu.layer={config.layer}: the model has layers 0 … {len(layers) - 1}; choose one")
    return layers


def train_rmu(model: nn.Module, tokenizer, forget_examples: Sequence[Example], retain_examples: Sequence[Example],
              config: RmuConfig, seed: int = 0) -> list[dict[str, float]]:
    """Unlearn in place with RMU; every token of prompt and response is steered (padding aside)."""
    layers = check_layers(model, config)
    update = config.update_layers if config.update_layers is not None else \
        list(range(max(0, config.layer - 2), config.layer + 1))
    if any(not 0 <= i <= config.layer for i in update):
        raise RRError(f"compare.rmu.update_layers={update}: layers after layer {config.layer} cannot change its "
                      f"output; choose layers 0 … {config.layer}")
    if not retain_examples:
        raise RRError("RMU keeps retain activations in place and needs retain data, but none was given")
    forget = encode_examples(tokenizer, forget_examples, config.max_length)
    retain = encode_examples(tokenizer, retain_examples, config.max_length)
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    control = control_vector(model.config.hidden_size, config.steering_coefficient, seed).to(device)
    with torch.no_grad():  # the frozen model's retain activations, one tensor per example
        frozen = []
        for start in range(0, len(retain), config.batch_size):
            batch = collate(retain[start:start + config.batch_size], pad, device)
            h = layer_activations(model, config.layer, batch)
            frozen += [h[i, :int(batch["attention_mask"][i].sum())].clone() for i in range(h.shape[0])]

    params = [layers[i].mlp.down_proj.weight for i in update]
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    steps = -(-len(forget) // config.batch_size) * config.epochs
    steps = steps if config.max_steps is None else min(steps, config.max_steps)
    forget_order = batches(len(forget), config.batch_size, torch.Generator().manual_seed(seed))
    retain_order = batches(len(retain), config.batch_size, torch.Generator().manual_seed(seed + 1))
    step_losses = []
    try:
        model.train()
        for _ in range(steps):
            f_idx, r_idx = next(forget_order), next(retain_order)
            forget_batch = collate([forget[i] for i in f_idx], pad, device)
            retain_batch = collate([retain[i] for i in r_idx], pad, device)
            frozen_batch = torch.zeros(len(r_idx), retain_batch["input_ids"].shape[1], control.shape[0], device=device)
            for row, i in enumerate(r_idx):
                frozen_batch[row, :frozen[i].shape[0]] = frozen[i]
            losses = rmu_loss(layer_activations(model, config.layer, forget_batch), forget_batch["attention_mask"],
                              control, layer_activations(model, config.layer, retain_batch), frozen_batch,
                              retain_batch["attention_mask"], config.retain_weight)
            losses["total"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_losses.append({name: float(value.detach()) for name, value in losses.items()})
    finally:
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return step_losses


def run_method(job, method: Method, data: ReleaseData, out_dir: Path, progress: Callable[[str], None]) -> MethodRun:
    from rr.config import CompareConfig
    from rr.methods.session import unlearn_a_copy

    config = (job.config.compare or CompareConfig()).rmu
    progress(f"rmu: steering layer {config.layer} on {len(data.forget)} {data.source} forget examples, holding it "
             f"on {len(data.retain)} retain examples")
    test, wall_time, step_losses = unlearn_a_copy(job, method.name, out_dir, progress, lambda model: train_rmu(
        model, job.tokenizer, data.forget, data.retain, config, job.config.seed))
    return MethodRun(method.name, test, wall_time,
                     {"steps": len(step_losses), "layer": config.layer,
                      "steering_coefficient": config.steering_coefficient,
                      "final_losses": step_losses[-1] if step_losses else {}})
