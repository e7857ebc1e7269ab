"""The fine-tuning unlearning objectives as pure functions of a causal LM's logits and labels.

Every function takes logits (batch, seq, vocab) and labels (batch, seq) in the Hugging Face convention: the
logits at position t score the label at t + 1, and a label of -100 (IGNORE_INDEX: prompt and padding tokens)
is not scored. Names map to the papers as follows:

- GA  (gradient ascent):   `ga_loss` = −NLL of the forget tokens.
- GD  (gradient descent):  `nll_loss` = NLL of the retain tokens.
- KL  (to the reference):  `kl_to_reference` = KL(π_ref ‖ π_θ) per retain token, averaged.
- NPO (Zhang et al. 2024): `npo_loss` = −(2/β)·E[log σ(−β·(log π_θ(y|x) − log π_ref(y|x)))], with the
  sequence log-probabilities summed over the scored (response) tokens.
- ME  (papers/004, Eq. 6): `me_loss` = mean over scored tokens of KL(P_t ‖ U_[K]) = log K − H(P_t), so
  minimizing it maximizes the entropy of every next-token prediction (0 exactly at the uniform prediction).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from rr.core.tokens import shifted


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    # clamp: a batch with no scored token contributes 0 rather than NaN
    return (values * mask).sum() / mask.sum().clamp(min=1)


def sequence_log_probs(logits: Tensor, labels: Tensor) -> Tensor:
    """log π(y|x) of each row: the log-probabilities of its scored tokens, summed. Shape (batch,)."""
    log_probs, targets, mask = shifted(logits, labels)
    token_log_probs = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (token_log_probs * mask).sum(dim=-1)


def nll_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean negative log-likelihood per scored token (the GD term on retain data; the usual LM loss)."""
    log_probs, targets, mask = shifted(logits, labels)
    return _masked_mean(-log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1), mask)


def ga_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Gradient ascent on the forget tokens: minimizing it raises their NLL (unbounded below)."""
    return -nll_loss(logits, labels)


def npo_loss(logits: Tensor, labels: Tensor, reference_log_probs: Tensor, beta: float = 0.1) -> Tensor:
    """Negative Preference Optimization. `reference_log_probs` is `sequence_log_probs` of the frozen reference
    model on the same batch. Equals (2/β)·log 2 where θ = ref and tends to 0 as π_θ(y|x) → 0: bounded,
    unlike GA."""
    log_ratio = sequence_log_probs(logits, labels) - reference_log_probs.to(logits.device).float()
    return -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()


def kl_to_reference(logits: Tensor, reference_logits: Tensor, labels: Tensor) -> Tensor:
    """KL(π_ref ‖ π_θ) of the next-token distributions, averaged over the scored tokens (0 where θ = ref)."""
    log_probs, _, mask = shifted(logits, labels)
    reference_log_probs = F.log_softmax(reference_logits[:, :-1].float(), dim=-1)
    per_token = (reference_log_probs.exp() * (reference_log_probs - log_probs)).sum(dim=-1)
    return _masked_mean(per_token, mask)


def me_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Maximizing Entropy (papers/004 Eq. 6 and Appendix B): mean over the scored tokens of
    KL(P_t ‖ U_[K]) = log K − H(P_t). Bounded in [0, log K]; 0 exactly when every prediction is uniform."""
    log_probs, _, mask = shifted(logits, labels)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return _masked_mean(torch.log(torch.tensor(float(logits.shape[-1]))) - entropy, mask)


def mean_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean entropy H(P_t) of the next-token predictions at the scored tokens (what ME raises)."""
    log_probs, _, mask = shifted(logits, labels)
    return _masked_mean(-(log_probs.exp() * log_probs).sum(dim=-1), mask)
