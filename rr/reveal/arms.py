"""Arms of the bandit: Sobol soft prompts decoded into instruction texts by the instruction model (INSTINCT)."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from rr.tasks.base import Example, SamplingParams

INDUCTION_PREFIX = "The instruction was to"
SENTENCE_ENDS = tuple(mark + space for mark in ".!?" for space in " \n")  # where extract_instruction cuts
_INDUCTION_REQUEST = ("I gave a friend an instruction and some inputs. The friend read the instruction and "
                      "wrote an output for every one of the inputs. Here are the input-output pairs:\n\n")


@dataclass
class ArmPool:
    """The decoded pool: one instruction text and one feature vector (standardized hidden state) per arm."""

    points: np.ndarray          # (n_arms, soft_prompt_dim) Sobol points in [0, 1]^d
    instructions: list[str]     # decoded instruction text per arm
    features: np.ndarray        # (n_arms, hidden) standardized last-token hidden states

    def to_npz(self, path) -> None:
        np.savez(path, points=self.points, features=self.features,
                 instructions=np.array(self.instructions, dtype=object))

    @classmethod
    def from_npz(cls, path) -> "ArmPool":
        data = np.load(path, allow_pickle=True)
        return cls(data["points"], [str(s) for s in data["instructions"]], data["features"])


def sobol_points(n_arms: int, dim: int, seed: int) -> np.ndarray:
    from scipy.stats import qmc

    sampler = qmc.Sobol(d=dim, scramble=True, seed=seed)
    # Sobol wants powers of two; draw the next one up and keep the first n_arms points.
    m = int(np.ceil(np.log2(max(n_arms, 2))))
    return sampler.random_base2(m)[:n_arms]


def project_to_embeddings(points: np.ndarray, n_tokens: int, embedding_table: np.ndarray, seed: int) -> np.ndarray:
    """Points → soft-prompt token embeddings with the real embeddings' per-dimension mean and std.

    A raw uniform(−1, 1) projection would be orders of magnitude larger than real token embeddings
    and a small model then decodes noise, so the projection is standardized over the pool and
    rescaled to the embedding table's statistics.
    """
    rng = np.random.default_rng(seed)
    hidden = embedding_table.shape[1]
    projection = rng.standard_normal((points.shape[1], n_tokens * hidden))
    raw = (points - 0.5) @ projection
    raw = (raw - raw.mean()) / (raw.std() + 1e-12)
    raw = raw.reshape(len(points), n_tokens, hidden)
    mean, std = embedding_table.mean(axis=0), embedding_table.std(axis=0)
    return (mean + std * raw).astype(np.float32)


def induction_text(exemplars: Sequence[Example], max_chars: int = 400) -> str:
    """The user turn shown after the soft prompt: input-output pairs whose instruction must be guessed."""
    pairs = "\n\n".join(f"Input: {e.prompt[:max_chars]}\nOutput: {e.response[:max_chars]}" for e in exemplars)
    return _INDUCTION_REQUEST + pairs + "\n\nWhat was the instruction?"


def extract_instruction(decoded: str) -> str:
    """'The instruction was to' + the decoded text, cut at the end of its first sentence."""
    text = " ".join(decoded.split())
    match = re.search(r"(?<=[.!?])\s", text)
    sentence = text[:match.start()] if match else text
    return f"{INDUCTION_PREFIX} {sentence.strip()}".strip()


def exemplar_views(n_exemplars: int, n_views: int, seed: int) -> list[tuple[int, ...]]:
    """Which exemplars, in which order, each group of arms is shown to the instruction model.

    View 0 is every exemplar in the task's order. Further views are other orders and subsets of at least
    two (resampled demonstrations, as in APE): a small instruction model tends to paraphrase one exemplar
    whatever the soft prompt, so with one view most arms decode to the same text (SmolLM2-135M: 5
    distinct instructions among 64 arms). Fewer views than asked when the exemplars do not allow more.
    """
    rng = random.Random(seed)
    everything = tuple(range(n_exemplars))
    views = [everything]
    smallest = min(2, n_exemplars)
    for _ in range(100 * n_views):
        if len(views) >= n_views:
            break
        view = tuple(rng.sample(everything, rng.randint(smallest, n_exemplars)))
        if view not in views:
            views.append(view)
    return views


def decode_arm_pool(model, tokenizer, generator, exemplars: Sequence[Example], n_arms: int, soft_prompt_dim: int,
                    n_prompt_tokens: int, max_instruction_tokens: int, seed: int, batch_size: int = 32,
                    n_views: int = 1, progress=None) -> ArmPool:
    """Decode every arm's instruction greedily and record its feature (the prompt's last hidden state).

    Arm a is shown exemplar view a mod (number of views), after its soft prompt."""
    import torch

    embedding_layer = model.get_input_embeddings()
    table = embedding_layer.weight.detach().float().cpu().numpy()
    points = sobol_points(n_arms, soft_prompt_dim, seed)
    soft = project_to_embeddings(points, n_prompt_tokens, table, seed)
    views = exemplar_views(len(exemplars), n_views, seed)
    device = next(model.parameters()).device
    # Only the first sentence is kept (extract_instruction), so decoding ends at a sentence end.
    params = SamplingParams(max_new_tokens=max_instruction_tokens, temperature=0.0, stop=SENTENCE_ENDS)
    suffixes = []
    for view in views:
        text = induction_text([exemplars[i] for i in view])
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True) if tokenizer.chat_template else text + "\n"
        suffix_ids = tokenizer(chat + INDUCTION_PREFIX, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            suffixes.append(embedding_layer(suffix_ids.to(device))[0])  # (L, hidden)
    instructions: list[str] = [""] * n_arms
    features: list[np.ndarray | None] = [None] * n_arms
    # Arms of every view share batches, longest prompt first and left-padded, as the generator batches text.
    order = sorted(range(n_arms), key=lambda a: -suffixes[a % len(views)].shape[0])
    for start in range(0, n_arms, batch_size):
        chunk_arms = order[start:start + batch_size]
        rows = [torch.cat([torch.from_numpy(soft[a]).to(device=device, dtype=suffixes[0].dtype),
                           suffixes[a % len(views)]]) for a in chunk_arms]
        width = max(row.shape[0] for row in rows)
        embeds = torch.zeros((len(rows), width, rows[0].shape[1]), dtype=rows[0].dtype, device=device)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            embeds[i, width - row.shape[0]:] = row
            mask[i, width - row.shape[0]:] = 1
        tokens, last_hidden = generator.decode(None, mask, params, inputs_embeds=embeds, return_last_hidden=True)
        for arm, t, h in zip(chunk_arms, tokens, last_hidden.numpy()):
            instructions[arm], features[arm] = extract_instruction(generator._text(t)), h
        if progress:
            progress(min(start + batch_size, n_arms), n_arms)
    stacked = np.stack(features)
    stacked = (stacked - stacked.mean(axis=0)) / (stacked.std(axis=0) + 1e-6)
    return ArmPool(points, instructions, stacked.astype(np.float32))
