"""Ext-Sub (Hu et al. 2024; papers/000 §2): subtract only the deficiency part of an anti-expert PEM.

An expert PEM E (trained on the task's retain data) and an anti-expert PEM A (trained on the forget set), both
LoRAs trained as release.lora says, are made dense per target module: ΔE = s·B_E·A_E, ΔA = s·B_A·A_A. Row by
row (each output unit's weight vector), the shared "general capability" direction is
    g = normalize(ΔE_row / ‖ΔE_row‖ + ΔA_row / ‖ΔA_row‖),
the anti-expert's projection on it, (ΔA_row·g)·g, is its general part, and the rest is its deficiency:
    D = ΔA − proj_g(ΔA).
The released model is Φ0 + ΔE − α·D (the extraction-before-subtraction of the authors' code), with α chosen
on the validation split by the paper's μ rule among compare.ext_sub.weights (widened once, as pem-negation's).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from rr.errors import RRError
from rr.methods import Method, MethodRun, ReleaseData


def deficiency(expert_delta: Tensor, anti_expert_delta: Tensor) -> Tensor:
    """ΔA minus its row-wise projection on the normalized sum of the two rows' unit vectors."""
    e, a = expert_delta.float(), anti_expert_delta.float()
    eps = 1e-12
    common = e / e.norm(dim=-1, keepdim=True).clamp(min=eps) + a / a.norm(dim=-1, keepdim=True).clamp(min=eps)
    common = common / common.norm(dim=-1, keepdim=True).clamp(min=eps)
    return a - (a * common).sum(-1, keepdim=True) * common


def ext_sub_delta(expert_delta: Tensor, anti_expert_delta: Tensor, alpha: float) -> Tensor:
    """ΔE − α·D: the update Ext-Sub adds to the base weight of one module."""
    return expert_delta.float() - alpha * deficiency(expert_delta, anti_expert_delta)


def dense_deltas(pem) -> dict[str, Tensor]:
    """Per target module, the PEM's dense weight update s·B·A."""
    return {module: pem.scaling * (b.float() @ a.float()) for module, (a, b) in pem.tensors.items()}


def run_method(job, method: Method, data: ReleaseData, out_dir: Path, progress: Callable[[str], None]) -> MethodRun:
    from rr.compare import base_scores
    from rr.config import CompareConfig
    from rr.generation.hf import job_generator
    from rr.release.ledger import Pem
    from rr.release.loop import evaluation_dict
    from rr.release.pem import train_pem
    from rr.release.weight_search import search_weight
    from rr.release.weights import (RULE_FORGET_TARGET, CandidateResult, WeightChoice, choose_forget_weight,
                                    utility_floor)

    config = (job.config.compare or CompareConfig()).ext_sub
    lora = job.config.release.lora
    started = time.perf_counter()
    pems = {}
    for kind, examples, name in (("retain", data.retain, "expert"), ("forget", data.forget, "anti_expert")):
        pem_dir = out_dir / name
        if Pem.is_saved(pem_dir):  # its marker, not its weights: a kill mid-save retrains
            pems[name] = Pem.load(pem_dir)
        else:
            progress(f"ext-sub: training the {name.replace('_', '-')} LoRA on {len(examples)} {kind} examples")
            pems[name] = train_pem(job.model, job.tokenizer, examples, lora, f"ext-sub-{name}", kind, pem_dir,
                                   seed=job.config.seed + (2 if name == "expert" else 1))
    expert, anti = dense_deltas(pems["expert"]), dense_deltas(pems["anti_expert"])
    if set(expert) != set(anti):
        raise RRError("ext-sub: the expert and anti-expert PEMs target different modules; train both with one "
                      "release.lora.target_modules")
    model = copy.deepcopy(job.model)
    modules = dict(model.named_modules())
    original = {name: modules[name].weight.detach().clone() for name in expert}
    deficiencies = {name: deficiency(expert[name], anti[name]) for name in expert}

    def apply(alpha: float) -> None:
        with torch.no_grad():
            for name, weight in original.items():
                update = expert[name] - alpha * deficiencies[name]
                modules[name].weight.copy_((weight.float() + update.to(weight.device)).to(weight.dtype))

    generator = job_generator(job, model)  # follows the copy's weights as apply() edits them
    base = base_scores(job, "validation")

    def choose(candidates: list[CandidateResult]) -> WeightChoice:
        return choose_forget_weight(candidates, base["forget_score"], base["utility_score"],
                                    job.config.release.forget_fraction,
                                    utility_floor(job.config.release.forget_utility_floor, base["utility_score"]))

    def score(todo: list[float], on_result, stop) -> None:
        # Ext-Sub's model is a dense edit of a copy (Φ0 + ΔE − α·D), not a PEM the executor scales: scored here.
        for alpha in todo:
            if stop():
                return
            apply(alpha)
            evaluation = job.task.evaluate(generator, "validation")
            on_result(alpha, (evaluation.forget_score, evaluation.utility_score))
            progress(f"  ext-sub α={alpha:g}: forget {evaluation.forget_score:.3f}, "
                     f"utility {evaluation.utility_score:.3f}")

    tried: dict = {}
    # as pem-negation: the grid, widened once by release.widen_factor when no α reaches the forget target
    choice = search_weight(config.weights, choose, lambda c: c.rule == RULE_FORGET_TARGET, score, tried,
                           job.config.release.widen_factor,
                           lambda choice, wider: progress(f"ext-sub: no α reached the forget target; widening to "
                                                          f"{sorted(wider)}"))
    if choice.weight is None:
        raise RRError(f"ext-sub: no α in {sorted(tried)} lowers the validation forget score enough "
                      f"({choice.reason}); widen compare.ext_sub.weights")
    apply(choice.weight)
    wall_time = time.perf_counter() - started
    progress(f"ext-sub: α={choice.weight:g} ({choice.rule}); scoring the test split")
    test = evaluation_dict(job.task.evaluate(generator, "test"))
    del model
    return MethodRun(method.name, test, wall_time,
                     {"alpha": choice.weight, "rule": choice.rule, "reason": choice.reason,
                      "candidates": [asdict(r) for r in choice.evaluated],
                      "pem_dirs": [str(out_dir / "expert"), str(out_dir / "anti_expert")]})
