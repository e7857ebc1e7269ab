"""ICU, Iterative Contrastive Unlearning (papers/003): unlearn forget sequences while learning their nearest
analogous samples, and drop each forget sample from training once it is forgotten.

Per step, for a batch of active forget samples x and their paired analogous samples x̂:
    loss = GA(x) + learn_weight·NLL(x̂) + kl_weight·KL(P_θ0 ‖ P_θ) on x̂        (Eqs. 1, 3, 4; α = 0.5, β = 1)
with per-token means where the paper sums. x̂ is x's nearest neighbour (K = 1, cosine of the job's sentence
embedder, as the paper's all-MiniLM-L6-v2) in the retain pool (the task's retain examples; papers/003 uses a
pool of same-category documents). After each epoch every active forget prompt is answered greedily; a sample
whose answer has similarity < similarity_threshold and BLEU < bleu_threshold to its forget response
(Eq. 5) is forgotten and leaves the later epochs; training ends when none is left, after `epochs`, or at
max_steps. The paper's similarity is BERTScore, whose model is not available offline: the embedder's cosine
is the declared stand-in (compare.icu.similarity: bertscore uses BERTScore F1 where it is installed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from rr.core.prompt import as_prompt
from rr.config import IcuConfig
from rr.errors import RRError
from rr.evaluation.memorization import bleu, embedding_cosine
from rr.methods import Method, MethodRun, ReleaseData
from rr.methods.losses import ga_loss, kl_to_reference, nll_loss
from rr.core.tokens import collate, encode_example, pad_token_id
from rr.tasks.base import Example, SamplingParams

Embed = Callable[[list[str]], np.ndarray]


def nearest_neighbours(forget_vectors: np.ndarray, pool_vectors: np.ndarray) -> list[int]:
    """For each forget row, the index of the pool row with the highest cosine similarity (papers/003 Eq. 2)."""
    f = forget_vectors / np.maximum(np.linalg.norm(forget_vectors, axis=1, keepdims=True), 1e-12)
    p = pool_vectors / np.maximum(np.linalg.norm(pool_vectors, axis=1, keepdims=True), 1e-12)
    return [int(i) for i in (f @ p.T).argmax(axis=1)]


def forgotten(similarities: Sequence[float], bleus: Sequence[float], similarity_threshold: float,
              bleu_threshold: float) -> list[bool]:
    """The gate of papers/003 Eq. 5: forgotten when both the similarity and BLEU are below their thresholds."""
    return [s < similarity_threshold and b < bleu_threshold for s, b in zip(similarities, bleus, strict=True)]


def _text(example: Example) -> str:
    return f"{as_prompt(example.prompt).user}\n{example.response}"


def _similarity(config: IcuConfig, embed: Embed, predictions: list[str], references: list[str]) -> list[float]:
    if config.similarity == "embedder-cosine":
        return embedding_cosine(embed, predictions, references)
    try:
        from bert_score import score
    except ImportError:
        raise RRError("compare.icu.similarity: bertscore needs the bert_score package and its model (roberta-large) "
                      "in the model cache; install it, or use embedder-cosine (the offline stand-in)") from None
    return [float(f) for f in score(predictions, references, lang="en", verbose=False)[2]]


def train_icu(model, tokenizer, forget_examples: Sequence[Example], pool: Sequence[Example], config: IcuConfig,
              embed: Embed, seed: int = 0, progress: Callable[[str], None] = lambda _: None) -> dict:
    """Unlearn `forget_examples` from `model` in place; returns the step losses, pairs and gate history."""
    from rr.generation.hf import HFGenerator
    from rr.methods.session import training_session

    if not pool:
        raise RRError("ICU learns analogous samples from a retain pool, but the task gave no retain examples")
    neighbours = nearest_neighbours(embed([_text(e) for e in forget_examples]), embed([_text(e) for e in pool]))
    encoded = []
    for index, example in enumerate(forget_examples):
        pair = (encode_example(tokenizer, example, config.max_length),
                encode_example(tokenizer, pool[neighbours[index]], config.max_length))
        if all(any(t != -100 for t in labels) for _, labels in pair):
            encoded.append((index, pair))
    if not encoded:
        raise RRError(f"compare.icu.max_length={config.max_length} leaves no response token: raise it")
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    active = [index for index, _ in encoded]
    by_index = dict(encoded)
    step_losses: list[dict[str, float]] = []
    gates: list[dict] = []
    with training_session(model, config, seed, needs_reference=config.kl_weight > 0) as (policy, reference,
                                                                                          optimizer):
        for epoch in range(config.epochs):
            generator = torch.Generator().manual_seed(seed + epoch)
            permutation = torch.randperm(len(active), generator=generator).tolist()
            for start in range(0, len(active), config.batch_size):
                if config.max_steps is not None and len(step_losses) >= config.max_steps:
                    break
                rows = [by_index[active[i]] for i in permutation[start:start + config.batch_size]]
                forget_batch = collate([r[0] for r in rows], pad, device)
                learn_batch = collate([r[1] for r in rows], pad, device)
                losses = icu_objective(config, policy, reference, forget_batch, learn_batch)
                losses["total"].backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step_losses.append({name: float(value.detach()) for name, value in losses.items()})
            # Iterative unlearning refinement: answer every active forget prompt, drop what is forgotten.
            policy.eval()
            prompts = [forget_examples[i].prompt for i in active]
            answers = HFGenerator(policy, tokenizer, batch_size=max(config.batch_size, 16)).generate(
                prompts, SamplingParams(max_new_tokens=config.gate_max_new_tokens, temperature=0.0))
            policy.train()
            answers = [a[0] for a in answers]
            references = [forget_examples[i].response for i in active]
            similarity = _similarity(config, embed, answers, references)
            bleus = [bleu(a, r) for a, r in zip(answers, references)]
            gone = forgotten(similarity, bleus, config.similarity_threshold, config.bleu_threshold)
            gates.append({"epoch": epoch + 1, "active": len(active), "forgotten": sum(gone),
                          "mean_similarity": float(np.mean(similarity)), "mean_bleu": float(np.mean(bleus))})
            progress(f"icu: epoch {epoch + 1}: {sum(gone)} of {len(active)} active forget samples forgotten "
                     f"(mean similarity {gates[-1]['mean_similarity']:.3f}, BLEU {gates[-1]['mean_bleu']:.3f})")
            active = [i for i, g in zip(active, gone) if not g]
            if not active or (config.max_steps is not None and len(step_losses) >= config.max_steps):
                break
    return {"step_losses": step_losses, "gates": gates, "remaining": len(active), "neighbours": neighbours}


def icu_objective(config: IcuConfig, policy, reference, forget_batch, learn_batch) -> dict[str, torch.Tensor]:
    """GA on the forget batch + learn_weight·NLL + kl_weight·KL(ref ‖ θ) on the paired analogous batch."""
    forget = ga_loss(policy(input_ids=forget_batch["input_ids"], attention_mask=forget_batch["attention_mask"]).logits,
                     forget_batch["labels"])
    learn_logits = policy(input_ids=learn_batch["input_ids"], attention_mask=learn_batch["attention_mask"]).logits
    learn = nll_loss(learn_logits, learn_batch["labels"])
    losses = {"forget": forget, "learn": learn, "total": config.forget_weight * forget + config.learn_weight * learn}
    if config.kl_weight > 0:
        kl = kl_to_reference(learn_logits, reference(learn_batch), learn_batch["labels"])
        losses["kl"] = kl
        losses["total"] = losses["total"] + config.kl_weight * kl
    return losses


def run_method(job, method: Method, data: ReleaseData, out_dir: Path, progress: Callable[[str], None]) -> MethodRun:
    from rr.config import CompareConfig
    from rr.methods.session import unlearn_a_copy

    config = (job.config.compare or CompareConfig()).icu
    progress(f"icu: {config.weights} fine-tuning on {len(data.forget)} {data.source} forget examples, each paired "
             f"with its nearest of {len(data.retain)} retain examples")
    result = {}

    def train(model):
        result.update(train_icu(model, job.tokenizer, data.forget, data.retain, config, job.embed, job.config.seed,
                                progress))
        (out_dir / "gates.json").parent.mkdir(parents=True, exist_ok=True)
        (out_dir / "gates.json").write_text(json.dumps(result["gates"], indent=1))
        return result["step_losses"]

    test, wall_time, step_losses = unlearn_a_copy(job, method.name, out_dir, progress, train)
    return MethodRun(method.name, test, wall_time,
                     {"steps": len(result["step_losses"]), "weights": config.weights, "similarity": config.similarity,
                      "gates": result["gates"], "remaining_forget_samples": result["remaining"],
                      "final_losses": result["step_losses"][-1] if result["step_losses"] else {}})
