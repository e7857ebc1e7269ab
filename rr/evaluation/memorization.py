"""Unlearning metrics of papers/003 (ICU) and papers/004 (Closer Look), usable by any task.

Pure functions of strings, token ids or (logits, labels), plus thin model helpers that feed them:

- ROUGE-L recall (papers/004 "R"): LCS of the word sequences / words of the reference.
- answer probability (papers/004 "P"): P(y|x) = (1/T)·Σ_t p(y_t | x∘y_<t), the mean token probability of
  the gold answer, as papers/004 §2.2 writes it.
- token entropy (papers/004 "TE"): Shannon entropy of the output's token frequencies, divided by log of its
  length, so it lies in [0, 1] (1: no token repeats; 0: one token repeated). Papers/004's text has no
  formula for TE; this is the normalized form of its released code, declared here.
- EL_n (papers/003 Eq. 7, Jang et al.): mean over prefixes x_<t of OVERLAP_n(f(x_<t), x_≥t), the share of
  the greedy continuation's n-grams that occur in the true suffix.
- MA (papers/003 Eq. 9): the share of positions whose argmax next-token prediction is the true token.
- BLEU (papers/003 Eq. 5's gate): BLEU-4 with brevity penalty; an order without a match counts ε matches
  (default 1e-9: near 0, as the values below 0.01 that papers/003 reports, ~1e-78; ε = 0.1 is NLTK's
  smoothing method 1).
- MU / FE (papers/004 §2.2): MU = harmonic mean of the retain-set metrics, FE = 1 − arithmetic mean of the
  forget-set metrics.

Papers/004's truth ratio (TR) needs perturbed answers and its entailment score (ES) an NLI model; neither
is computed here. Its cosine similarity (CS) is `embedding_cosine` with the job's sentence embedder.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import TYPE_CHECKING, Callable, Sequence

from rr.core.tokens import collate, encode_examples, pad_token_id, shifted

if TYPE_CHECKING:  # torch is imported where a model is scored: importing this module (tasks do) stays light
    from torch import Tensor

_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased word tokens (ROUGE's and BLEU's unit here)."""
    return _WORD.findall(text.lower())


def _lcs_length(a: Sequence, b: Sequence) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall: LCS(prediction words, reference words) / number of reference words (0 for an empty
    reference)."""
    ref = words(reference)
    if not ref:
        return 0.0
    return _lcs_length(words(prediction), ref) / len(ref)


def _ngrams(tokens: Sequence, n: int) -> list[tuple]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def bleu(prediction: str, reference: str, max_n: int = 4, epsilon: float = 1e-9) -> float:
    """Sentence BLEU-max_n of word tokens: brevity penalty × geometric mean of the clipped n-gram precisions,
    a zero match count replaced by `epsilon`. 0 for an empty prediction."""
    pred, ref = words(prediction), words(reference)
    if not pred or not ref:
        return 0.0
    log_precisions = []
    for n in range(1, max_n + 1):
        pred_ngrams = Counter(_ngrams(pred, n))
        total = sum(pred_ngrams.values())
        if total == 0:  # prediction shorter than n: the n-gram precision is undefined; count it as ε / 1
            log_precisions.append(math.log(epsilon))
            continue
        ref_ngrams = Counter(_ngrams(ref, n))
        matches = sum(min(count, ref_ngrams[gram]) for gram, count in pred_ngrams.items())
        log_precisions.append(math.log((matches if matches else epsilon) / total))
    brevity = 1.0 if len(pred) > len(ref) else math.exp(1 - len(ref) / len(pred))
    return brevity * math.exp(sum(log_precisions) / max_n)


def token_entropy(tokens: Sequence) -> float:
    """Normalized Shannon entropy of the token frequencies: H / log(len) in [0, 1]; 0 for fewer than 2 tokens."""
    if len(tokens) < 2:
        return 0.0
    counts = Counter(tokens)
    total = len(tokens)
    entropy = -sum(c / total * math.log(c / total) for c in counts.values())
    return entropy / math.log(total)


def overlap_n(generated: Sequence, target: Sequence, n: int) -> float:
    """OVERLAP_n (papers/003 Eq. 8): share of `generated`'s n-grams that are among `target`'s (0 if it has none)."""
    generated_ngrams = _ngrams(generated, n)
    if not generated_ngrams:
        return 0.0
    target_ngrams = set(_ngrams(target, n))
    return sum(gram in target_ngrams for gram in generated_ngrams) / len(generated_ngrams)


def extraction_likelihood(target: Sequence[int], continuations: Sequence[Sequence[int]], n: int) -> float:
    """EL_n (papers/003 Eq. 7) of one sequence x of T tokens: `continuations[t - 1]` is the model's greedy
    continuation of the prefix x_<t+1 (its first t tokens), for t = 1 … T − n. EL_n is the mean of
    OVERLAP_n(continuation, x_≥t+1) over those T − n prefixes."""
    count = len(target) - n
    if count <= 0:
        raise ValueError(f"EL_{n} needs a sequence longer than {n} tokens, got {len(target)}")
    if len(continuations) != count:
        raise ValueError(f"EL_{n} of a {len(target)}-token sequence needs {count} continuations, got {len(continuations)}")
    return sum(overlap_n(continuations[t - 1], target[t:], n) for t in range(1, count + 1)) / count


def answer_probability(logits: Tensor, labels: Tensor) -> Tensor:
    """Per row: (1/T)·Σ_t p(y_t | x∘y_<t) over the scored (label ≠ −100) tokens. Shape (batch,)."""
    log_probs, targets, mask = shifted(logits, labels)
    probs = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).exp()
    return (probs * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def memorization_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Per row: MA (papers/003 Eq. 9), the share of scored tokens that are the argmax prediction. Shape (batch,)."""
    log_probs, targets, mask = shifted(logits, labels)
    hits = (log_probs.argmax(-1) == targets) & mask
    return hits.sum(-1).float() / mask.sum(-1).clamp(min=1)


def model_utility(values: Sequence[float]) -> float:
    """MU (papers/004): the harmonic mean of the retain-set metrics (0 if any is 0)."""
    if not values:
        raise ValueError("model utility needs at least one metric")
    if any(v < 0 for v in values):
        raise ValueError(f"model utility takes metrics in [0, 1], got {list(values)}")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)


def forget_efficacy(values: Sequence[float]) -> float:
    """FE (papers/004): 1 − the arithmetic mean of the forget-set metrics."""
    if not values:
        raise ValueError("forget efficacy needs at least one metric")
    return 1.0 - sum(values) / len(values)


def embedding_cosine(embed: Callable[[list[str]], "object"], predictions: Sequence[str],
                     references: Sequence[str]) -> list[float]:
    """Cosine similarity of each prediction with its reference under a sentence embedder (papers/004's CS;
    the declared stand-in for BERTScore in ICU's gate). `embed` returns unit-norm rows."""
    import numpy as np

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return []
    vectors = np.asarray(embed(list(predictions) + list(references)), dtype=np.float64)
    a, b = vectors[:len(predictions)], vectors[len(predictions):]
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return [float(x) for x in (a * b).sum(1) / np.maximum(norms, 1e-12)]


# ---- model helpers ---------------------------------------------------------------------------------------


def teacher_forced_scores(model, tokenizer, examples, max_length: int = 384,
                          batch_size: int = 8) -> dict[str, list[float]]:
    """Per example (prompt → gold response): answer probability and MA of the response tokens."""
    import torch

    encoded = encode_examples(tokenizer, examples, max_length)
    device = next(model.parameters()).device
    probability, accuracy = [], []
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            batch = collate(encoded[start:start + batch_size], pad_token_id(tokenizer), device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            probability += answer_probability(logits, batch["labels"]).tolist()
            accuracy += memorization_accuracy(logits, batch["labels"]).tolist()
    return {"answer_probability": probability, "memorization_accuracy": accuracy}


def greedy_continuation(model, prefix: Sequence[int], length: int) -> list[int]:
    """`length` greedy tokens after `prefix` (plain token ids, no chat template)."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([list(prefix)], device=device)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(length):
            next_id = int(model(input_ids=ids).logits[0, -1].argmax())
            out.append(next_id)
            ids = torch.cat([ids, torch.tensor([[next_id]], device=device)], dim=1)
    return out


def model_extraction_likelihood(model, token_ids: Sequence[int], n: int = 10) -> float:
    """EL_n of one token sequence under `model`: greedy continuations of every prefix, as long as the rest."""
    count = len(token_ids) - n
    if count <= 0:
        raise ValueError(f"EL_{n} needs a sequence longer than {n} tokens, got {len(token_ids)}")
    continuations = [greedy_continuation(model, token_ids[:t], len(token_ids) - t) for t in range(1, count + 1)]
    return extraction_likelihood(token_ids, continuations, n)
